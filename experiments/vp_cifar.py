"""CIFAR-10 with the VP SDE and continuous training, score_sde's `vp/cifar10_ddpmpp_continuous`.

Every setting is score_sde's (`configs/default_cifar10_configs.py`,
`vp/cifar10_ddpmpp_continuous.py` and run_lib; `tests/test_paper_configs.py` checks each against
those files): batch 128, Adam lr 2e-4 with 5,000 warmup steps, gradient clipping at 1, EMA 0.9999
(constant from step 0), 1.3M steps (950k for `:deep`), data in [-1, 1] with random flips,
reduce_mean, training times t ~ U(1e-5, 1), Euler-Maruyama sampling with 1,000 steps down to eps =
1e-3, bits/dim over 5 dequantized passes of the whole test set. The network is DDPM++ cont.
(`diffusion/models/ncsnpp.py`, preset `ddpmpp_cont`: nf 128, ch_mult (1, 2, 2, 2), 4 BigGAN res
blocks per resolution, attention at 16x16, positional embedding of 999 t, dropout 0.1, 61.8M
parameters); `:deep` gives DDPM++ cont. (deep), 8 blocks per resolution, 106.6M.

Expected (Song et al. 2021, Tables 3 and 2: FID / IS of 50k PC samples of the checkpoint with
the best FID; NLL in bits/dim on the dequantized test set and FID of the probability-flow ODE
sampler, both of the last checkpoint):

    model                          FID (PC / EM)  IS     NLL (bits/dim)  FID (ODE)
    DDPM++ cont. (VP)              2.55           9.58   3.16            3.93
    DDPM++ cont. (deep, VP)        2.41           9.68   3.13            3.08

None of these has been measured with this codebase yet (it needs ~1.3M GPU steps).

    python scripts/run.py --config experiments/vp_cifar.py --workdir runs/vp_cifar

Needs tfds `cifar10` prepared, from CIFAR-10's own archive and without TensorFlow
(`python scripts/prepare_data.py cifar10 --archive cifar-10-python.tar.gz --data_dir DIR`, then
`--config.data.data_dir=DIR`). Smoke variant (tiny, a few steps
on a CPU; the tests run it on `tfds.testing.mock_data`): --config experiments/vp_cifar.py:smoke
Useful overrides: --config.training.n_jitted_steps=5, --config.training.compute_dtype=bfloat16,
--config.model.remat=True, --config.training.batch_size=...
"""

from diffusion.models import ncsnpp
from experiments import default


def get_config(arg: str | None = None):
    config = default.get_default_config()
    config.sde.name = "vpsde"
    config.data.dataset = "cifar10"
    config.data.image_size = 32
    config.data.num_channels = 3
    config.data.centered = True           # [-1, 1], score_sde's data.centered for VP / sub-VP
    config.data.random_flip = True

    config.model.name = "ddpmpp"
    config.model.update(ncsnpp.PRESETS["ddpmpp_deep_cont" if arg == "deep" else "ddpmpp_cont"])
    config.model.ema_rate = 0.9999
    config.model.parameterization = "epsilon"   # score = -output / std (get_score_fn, VP)
    config.model.noise_input = "time"           # positional embedding of 999 t

    config.training.n_iters = 950_001 if arg == "deep" else 1_300_001
    config.training.continuous = True
    config.training.reduce_mean = True
    config.training.likelihood_weighting = False
    config.training.eps = 1e-5
    config.sampling.method = "pc"
    config.sampling.predictor = "euler_maruyama"
    config.sampling.corrector = "none"
    config.sampling.snr = 0.16
    config.sampling.n_steps_each = 1
    config.sampling.noise_removal = True
    config.sampling.eps = 1e-3                  # run_lib's sampling_eps for VP / sub-VP
    config.eval.bpd_num_batches = 0             # bits/dim: the whole test set,
    config.eval.bpd_num_repeats = 5             # 5 passes of fresh dequantization (run_lib)
    return smoke(config) if arg == "smoke" else _no_variant(config, arg)


def smoke(config):
    """Shrinks a CIFAR-10 config to run end to end on a CPU in seconds (used by the tests)."""
    if config.model.name in ("dit", "uvit"):    # one block (U-ViT: its middle one) of width 16
        config.model.update(hidden_size=16, depth=1, num_heads=2, patch_size=4)
    else:
        config.model["ch" if config.model.name == "unet" else "nf"] = 16   # the network's width
        config.model.num_res_blocks = 1
        config.model.ch_mult = (1, 2)
    config.training.batch_size = 8
    config.training.n_iters = 2
    config.training.snapshot_freq = 2
    config.training.log_freq = 1
    config.training.eval_freq = 2
    config.optim.warmup = 0
    config.sde.N = 10
    config.eval.bpd_num_batches = 1
    config.eval.bpd_num_repeats = 1
    config.sampling.batch_size = 4
    config.sampling.num_samples = 4
    config.eval.batch_size = 4
    config.eval.num_batches = 1
    config.eval.likelihood_rtol = config.eval.likelihood_atol = 1e-3  # a quick solve
    config.eval.fid_num_samples = 8       # FID / KID of 8 samples against 16 training images
    config.eval.fid_batch_size = 8
    config.eval.fid_ref_max_examples = 16
    config.data.num_workers = 0           # one thread: tfds.testing.mock_data is per process
    return config


def _no_variant(config, arg, variants=("smoke", "deep")):
    """`config` if `arg` names no variant; one clear error for a variant this file lacks."""
    if arg not in (None, "", *variants):
        raise ValueError(f"Unknown config variant {arg!r}; use "
                         + " or ".join(f"':{v}'" for v in variants) + " or none.")
    return config
