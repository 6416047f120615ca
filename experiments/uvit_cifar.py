"""CIFAR-10 with U-ViT-S/2 (Bao et al. 2023, "All are Worth Words: A ViT Backbone for Diffusion
Models"), unconditional, in pixel space.

Their CIFAR-10 settings (baofff/U-ViT `configs/cifar10_uvit_small.py`, `train.py`, `sde.py`):
the network U-ViT-S/2 (`diffusion/models/uvit.py`: 13 blocks of width 512, 8 heads, MLP ratio 4,
2x2 patches, no qkv bias, long skips, the noise embedding as a token without an MLP, a 3x3
convolution at the end; 44.3M parameters, the paper's 44M); the continuous VP SDE (beta 0.1 ..
20) with the network fed 999 t, epsilon prediction and their L_simple (the mean squared noise
error: continuous DSM with reduce_mean); AdamW lr 2e-4, betas (0.99, 0.999), weight decay 0.03,
linear warmup over 2,500 steps then constant, no gradient clipping; batch 128, 500k steps, EMA
0.9999; random flips, data in [-1, 1]. Sampling: their Euler-Maruyama reverse SDE with 1,000
steps down to t = 1e-3 and a last noise-free step (here the PC sampler's Euler-Maruyama
predictor with 1,000 steps and its final denoising step at eps = 1e-3).

Expected (Bao et al. 2023, Table 1 and the repository's README: unconditional CIFAR-10, FID of
50k samples): U-ViT-S/2 FID 3.11 after 500k steps. Not measured with this codebase (it needs a GPU
for days).

    python scripts/run.py --config experiments/uvit_cifar.py --workdir runs/uvit_cifar
    python scripts/run.py --config experiments/uvit_cifar.py --workdir runs/uvit_cifar \\
        --mode sample --config.sampling.method=dpm_solver --config.sampling.steps=20

Useful overrides: --config.training.compute_dtype=bfloat16 (their runs used fp16 mixed
precision), --config.model.remat=True. Smoke variant (tiny, CPU, tests): :smoke.
"""

from diffusion.models import uvit
from experiments import default, vp_cifar


def get_config(arg: str | None = None):
    config = vp_cifar.get_config()      # CIFAR-10, VP SDE, continuous, EM sampler, 1e-3
    default.use_network(config, "uvit", **uvit.PRESETS["U-ViT-S/2"], mlp_ratio=4.0,
                        mlp_time_embed=False, conv=True)
    config.model.ema_rate = 0.9999

    config.training.batch_size = 128
    config.training.n_iters = 500_001
    config.training.reduce_mean = True       # L_simple: mean over dimensions
    config.optim.optimizer = "adam"          # AdamW with the weight decay below
    config.optim.lr = 2e-4
    config.optim.beta1, config.optim.beta2 = 0.99, 0.999
    config.optim.weight_decay = 0.03
    config.optim.warmup = 2500
    config.optim.grad_clip = 0.0

    config.sampling.method = "pc"
    config.sampling.predictor = "euler_maruyama"
    config.sampling.corrector = "none"
    config.sampling.eps = 1e-3
    return vp_cifar.smoke(config) if arg == "smoke" else vp_cifar._no_variant(
        config, arg, variants=("smoke",))
