"""Class-conditional CIFAR-10 with DiT (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers") on pixels: DiT-S/2 (default) or DiT-B/2 (`:B`).

DiT was designed for the 32x32x4 latents of Stable Diffusion's autoencoder on ImageNet 256x256;
CIFAR-10's 32x32x3 pixels have the same grid, so a DiT-S/2 sees the same 256 tokens. No
published CIFAR-10 number exists for it: this config transfers DiT's recipe (facebookresearch/DiT
`train.py`, `diffusion/__init__.py`, `sample_ddp.py`): the network (`diffusion/models/dit.py`,
adaLN-Zero, learned sigma; DiT-S/2 32.9M parameters at 32x32x3, DiT-B/2 130M), class labels with
label dropout 0.1 for classifier-free guidance; IDDPM's diffusion with the linear 1,000-step
chain (beta 1e-4 .. 0.02), epsilon prediction, learned variances and the hybrid loss (their
MSE + VB, which is L_simple + 0.001 N L_vlb at N = 1000: `training.loss="hybrid"`); AdamW lr
1e-4 without weight decay, warmup or gradient clipping, batch 256, EMA 0.9999 (DiT trains
400k steps in its ablations); sampling with 250 respaced DDPM steps and guidance scale 1.5
(`sampling.guidance_weight` = scale - 1 = 0.5; DiT's FID evaluation setting), random flips.

Expected (Peebles & Xie 2023, class-conditional ImageNet 256x256, Table 4: DiT-XL/2 FID 2.27
with guidance scale 1.5): no CIFAR-10 reference exists; not measured with this codebase.

    python scripts/run.py --config experiments/dit_cifar.py --workdir runs/dit_cifar
    python scripts/run.py --config experiments/dit_cifar.py --workdir runs/dit_cifar \\
        --mode sample --config.sampling.labels=all

Variants: `:B` (DiT-B/2), `:smoke` (tiny, CPU, tests). Useful overrides:
--config.training.compute_dtype=bfloat16, --config.model.remat=True.
"""

from diffusion.models import dit
from experiments import ddpm_cifar, default, vp_cifar


def get_config(arg: str | None = None):
    variants = set(arg.split(",")) if arg else set()
    if variants - {"smoke", "B"}:
        raise ValueError(f"Unknown variant {arg!r} of experiments/dit_cifar.py; use ':B' "
                         f"and/or ':smoke'.")
    config = ddpm_cifar.get_config()     # CIFAR-10 in [-1, 1], flips, the linear DDPM chain
    preset = "DiT-B/2" if "B" in variants else "DiT-S/2"
    default.use_network(config, "dit", **dit.PRESETS[preset], mlp_ratio=4.0)
    config.model.ema_rate = 0.9999
    config.model.num_classes = 10
    config.model.label_dropout = 0.1
    config.model.learn_variance = True
    config.training.loss = "hybrid"      # discrete (training.continuous=False), vlb_weight 0.001
    config.training.batch_size = 256
    config.training.n_iters = 400_001
    config.optim.lr = 1e-4
    config.optim.warmup = 0
    config.optim.grad_clip = 0.0
    config.optim.weight_decay = 0.0

    config.sampling.method = "ddpm"
    config.sampling.steps = 250
    config.sampling.labels = "all"
    config.sampling.guidance = "cfg"
    config.sampling.guidance_weight = 0.5
    config.sampling.predictor = "euler_maruyama"   # the PC sampler's default again (unused)
    if "smoke" in variants:
        config = vp_cifar.smoke(config)
        config.sde.N = 100               # the discrete chain needs beta_max / N < 1
        config.sampling.steps = 10
    return config
