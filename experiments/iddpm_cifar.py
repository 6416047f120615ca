"""CIFAR-10 with Improved DDPM (Nichol & Dhariwal 2021, "Improved Denoising Diffusion
Probabilistic Models"): learned variances, the hybrid loss and the cosine schedule.

Their CIFAR-10 settings (improved-diffusion's README flags for `cifar10_uncond_50M_500K`: image
size 32, 128 channels, 3 residual blocks, learned sigmas, dropout 0.3, 4,000 diffusion steps,
cosine schedule, lr 1e-4, batch 128; their defaults: attention at 16x16 and 8x8, channel
multipliers (1, 2, 2, 2) at 32x32, EMA 0.9999, Adam without warmup or weight decay, no gradient
clipping, random flips, 500k steps): the cosine VP SDE (s = 0.008) with its discrete chain of
N = 4000 levels, epsilon prediction with model.learn_variance, training.loss="hybrid"
(L_simple + 0.001 L_vlb), and the DDPM sampler (the full chain; respaced with
--config.sampling.steps=K, their sec. 4: 100 steps are within a few FID of 4000 for hybrid
models).

    python scripts/run.py --config experiments/iddpm_cifar.py --workdir runs/iddpm_cifar
    python scripts/run.py --config experiments/iddpm_cifar.py --workdir runs/iddpm_cifar \
        --mode eval                       # vlb_bpd (the bound) beside the ODE's bits/dim, FID

Variants: `:vlb` trains L_vlb itself with importance-sampled levels (their `--use_kl True
--schedule_sampler loss-second-moment`, `cifar10_uncond_vlb_50M_500K`); `:smoke` is tiny (tests).

Expected (Nichol & Dhariwal 2021, arXiv:2102.09672, unconditional CIFAR-10): NLL 2.94 bits/dim
with L_vlb (the bound on the test set; Table 3, the comparison with other likelihood-based
models) and FID 2.90 with L_hybrid and the cosine schedule (Table 2, the CIFAR-10 ablation of
schedules and objectives); these two numbers and their table numbers are not yet checked
against the PDF. Not measured with this codebase.

Differences from their network, which this codebase's U-Net (DDPM's, `models/unet.py`) does not
have: improved-diffusion's U-Net uses 4-head attention, scale-shift normalisation of the noise
embedding (FiLM) and feeds the network t * 1000 / 4000; here attention is single-head, the
embedding is added, and discrete models see the level index 0 .. 3999. Expect a different
parameter count: 49.1M here, where their checkpoint is named "50M".
"""

from experiments import ddpm_cifar, vp_cifar


def get_config(arg: str | None = None):
    config = ddpm_cifar.get_config()          # CIFAR-10 in [-1, 1], flips, DDPM's U-Net, L_simple
    config.sde.name = "cosine_vpsde"
    config.sde.N = 4000
    config.sde.s = 0.008
    config.model.update(num_res_blocks=3, attn_resolutions=(16, 8), dropout=0.3)
    config.model.learn_variance = True
    config.training.loss = "hybrid"           # with training.continuous=False (DDPM's)
    config.training.n_iters = 500_001
    config.optim.lr = 1e-4
    config.optim.warmup = 0
    config.optim.grad_clip = 0.0

    config.sampling.method = "ddpm"
    config.sampling.steps = 0                 # all 4,000 levels
    config.sampling.predictor = "euler_maruyama"   # the PC sampler's default again (unused)
    variants = set(arg.split(",")) if arg else set()
    if variants - {"smoke", "vlb"}:
        raise ValueError(f"Unknown variant {arg!r} of experiments/iddpm_cifar.py; use ':vlb' "
                         f"and/or ':smoke'.")
    if "vlb" in variants:
        config.training.loss = "vlb"
        config.training.importance_sampling = True
    if "smoke" in variants:
        config = vp_cifar.smoke(config)
        config.model.attn_resolutions = (16,)
    return config
