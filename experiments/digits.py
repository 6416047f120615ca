"""The embedded default: a VP-SDE score model of scikit-learn's 8x8 handwritten digits.

No download: the 1,797 digits ship with scikit-learn. A small DDPM-style U-Net (0.7M parameters)
trains with continuous denoising score matching (Song et al. 2021) and samples with the
reverse-SDE Euler-Maruyama predictor (1,000 steps).

    python scripts/run.py --config experiments/digits.py --workdir runs/digits

On 2 CPU cores (2.2-4.8 steps/s on the AMD EPYC development machine, on different days) this
trains 1,200 steps in 5 to 10 minutes (loss about 0.085; EMA eval loss 0.086 +- 0.006 over
noise draws of its one batch of 256 at the end, of which the run logs one) and writes grids of
recognisable digits to runs/digits/samples/train_step_600.png and train_step_1200.png. Then
sample again from the EMA checkpoint with a fast sampler, or measure bits/dim on the eval split:

    python scripts/run.py --config experiments/digits.py --workdir runs/digits --mode sample \
        --config.sampling.method=dpm_solver --config.sampling.steps=20
    python scripts/run.py --config experiments/digits.py --workdir runs/digits --mode eval

`--mode eval` also reports FID / KID of 2,000 samples against the 1,497 training digits (needs
the Inception weights, docs/likelihood_and_fid.md): measured FID 6.68, KID 0.87e-3 with the default
sampler (1,000 steps), FID 7.26 with --config.sampling.method=dpm_solver --config.sampling.steps=20
(7.41 after retraining with other random keys).

Beyond the VP SDE with epsilon prediction (docs/flows_v_edm.md; the
same network, steps and optimiser, only the process, parameterisation and loss change):
  :flow  rectified flow x_t = (1 - t) x_0 + t z with velocity prediction, trained by flow
         matching with SD3's logit-normal t (Esser et al. 2024)
  :v     the VP SDE with v-prediction (Salimans & Ho 2022), trained by the same DSM loss
  :edm   EDM (Karras et al. 2022): x_t = x_0 + sigma z (VE, sigma 0.002 .. 80), its
         preconditioning and loss (sigma_data 0.75, the digits' std)
The discrete chain (docs/iddpm.md; Ho et al. 2020, Nichol & Dhariwal 2021), on the same VP SDE's
1,000-level DDPM chain, sampled by the DDPM sampler (respaced with --config.sampling.steps=K):
  :ddpm    L_simple (epsilon MSE at discrete levels), fixed variance
  :hybrid  learned variances, L_simple + 0.001 L_vlb
  :vlb     learned variances, the variational bound itself, importance-sampled levels
Few-step generation (docs/consistency.md): :cd distils the default run (train it first into
runs/digits, or set --config.training.teacher_workdir) into a consistency model sampled in 2
steps (Song et al. 2023); :ct trains one by iCT's consistency training (Song & Dhariwal 2023),
and with --config.training.init_workdir=runs/digits starts from the default run's weights (ECT).
Networks (docs/transformers.md): :dit swaps the U-Net for a DiT (Peebles & Xie 2023; 2x2
patches, 4 adaLN-Zero blocks of width 96, 0.72M parameters), :uvit for a U-ViT (Bao et al.
2023; 7 blocks of width 96 with long skips, 0.84M); each combines with a process variant
(:dit,edm). Measured after 1,200 steps (2,000 DPM-Solver++ samples): FID 15.8 (DiT) and 26.9
(U-ViT) against the U-Net's 7.1.
Variants combine with a comma: --config experiments/digits.py:flow,smoke.

Smoke variant (seconds on a CPU, used by the tests): --config experiments/digits.py:smoke
Useful overrides: --config.sde.name=vesde (with --config.model.noise_input=log_sigma),
--config.training.n_iters=N (more steps give cleaner digits), --config.model.num_res_blocks=2.
"""

from experiments import default


def get_config(arg: str | None = None):
    config = default.get_default_config()
    config.data.dataset = "digits"
    config.data.image_size = 8
    config.data.num_channels = 1
    config.data.random_flip = False       # digits are not mirror-symmetric

    config.model.name = "unet"
    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.1
    config.model.ema_rate = 0.999
    config.model.ema_warmup = True        # our option: short run, keep the EMA off the init

    config.training.batch_size = 128
    config.training.n_iters = 1200
    config.training.snapshot_freq = 600
    config.training.log_freq = 100
    config.training.eval_freq = 600
    config.training.reduce_mean = True

    config.optim.lr = 2e-3
    config.optim.warmup = 200

    config.sampling.batch_size = 64
    config.sampling.num_samples = 64
    config.eval.batch_size = 256
    config.eval.num_batches = 1
    config.eval.fid_num_samples = 2_000   # against the 1,497 training digits
                                          # (docs/likelihood_and_fid.md)

    variants = set(arg.split(",")) if arg else set()
    unknown = variants - {"smoke", *PROCESSES, *NETWORKS}
    if unknown or len(variants & set(PROCESSES)) > 1 or len(variants & set(NETWORKS)) > 1:
        raise ValueError(f"Unknown variant {arg!r} of experiments/digits.py; use at most one "
                         f"of {sorted(PROCESSES)}, at most one of {sorted(NETWORKS)} and/or "
                         f"'smoke', e.g. ':flow,smoke' or ':dit,edm'.")
    for name in variants & set(NETWORKS):
        NETWORKS[name](config)
    for name in variants & set(PROCESSES):
        PROCESSES[name](config)

    if "smoke" in variants:
        if config.model.name == "unet":
            config.model.ch = 8
            config.model.num_res_blocks = 1
        else:   # a transformer: one block (U-ViT: its middle one) of width 16
            config.model.hidden_size = 16
            config.model.depth = 1
            config.model.num_heads = 2
        config.training.batch_size = 16
        config.training.n_iters = 4
        config.training.snapshot_freq = 2
        config.training.log_freq = 2
        config.training.eval_freq = 4
        config.sde.N = 25   # > beta_max: a DDPM chain for the reverse-diffusion steps
        config.sampling.batch_size = 8
        config.sampling.num_samples = 8
        config.eval.batch_size = 16
        config.eval.likelihood_rtol = config.eval.likelihood_atol = 1e-3  # a quick solve
        config.eval.fid_num_samples = 8   # FID / KID of 8 samples against 16 training digits
        config.eval.fid_batch_size = 8
        config.eval.fid_ref_max_examples = 16
    return config


def _flow(config):
    config.sde.name = "rectified_flow"
    config.model.parameterization = "v"
    config.training.loss = "flow_matching"
    config.training.t_sampling = "logit_normal"


def _v(config):
    config.model.parameterization = "v"


def _edm(config):
    config.sde.name = "vesde"
    config.sde.sigma_min = 0.002          # EDM's sigma range
    config.sde.sigma_max = 80.0
    config.model.parameterization = "edm"
    config.training.loss = "edm"
    config.data.sigma_data = 0.75         # the std of the digits in [-1, 1]


def _ddpm(config):
    config.training.continuous = False    # DDPM's L_simple on the 1,000-level chain
    config.sampling.method = "ddpm"


def _hybrid(config):
    _ddpm(config)
    config.model.learn_variance = True
    config.training.loss = "hybrid"


def _vlb(config):
    _ddpm(config)
    config.model.learn_variance = True
    config.training.loss = "vlb"


def _ct(config):
    """iCT on the digits' VP SDE: the consistency function trained from scratch, sampled in
    2 steps; the curriculum runs over the 1,200 steps (N from 11 to 1281 levels)."""
    config.model.parameterization = "consistency"
    config.training.loss = "consistency_training"
    config.training.reduce_mean = False   # unused: the pseudo-Huber distance is per example
    config.data.sigma_data = 0.75         # the std of the digits in [-1, 1]
    config.sampling.method = "consistency"
    config.sampling.times = "1.0,0.45"


def _cd(config):
    """Consistency distillation of the default run (the teacher, runs/digits; Song et al. 2023):
    Heun steps of the teacher's ODE between 18 Karras levels, an EMA target (mu 0.95), L2;
    the student starts from the teacher's weights and samples in 2 steps."""
    _ct(config)
    config.training.loss = "consistency_distillation"
    config.training.teacher_workdir = "runs/digits"


def _dit(config):
    """A DiT (Peebles & Xie 2023) of about the default U-Net's size (0.72M parameters, the U-Net
    0.70M): 2x2 patches (16 tokens), 4 adaLN-Zero blocks of width 96, 4 heads; the default run's
    optimiser, lr, warmup and batch."""
    default.use_network(config, "dit", patch_size=2, hidden_size=96, depth=4, num_heads=4)


def _uvit(config):
    """A U-ViT (Bao et al. 2023) of about the default U-Net's size (0.84M parameters): 2x2
    patches plus the time token, 7 blocks (3 in, middle, 3 out with long skips) of width 96,
    4 heads."""
    default.use_network(config, "uvit", patch_size=2, hidden_size=96, depth=7, num_heads=4)


NETWORKS = {"dit": _dit, "uvit": _uvit}
PROCESSES = {"flow": _flow, "v": _v, "edm": _edm, "ddpm": _ddpm, "hybrid": _hybrid, "vlb": _vlb,
             "ct": _ct, "cd": _cd}
