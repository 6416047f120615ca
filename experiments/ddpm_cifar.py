"""CIFAR-10 with DDPM (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"), score_sde's
`vp/ddpm/cifar10`.

The network is Ho et al.'s U-Net (`diffusion/models/unet.py`): ch 128, ch_mult (1, 2, 2, 2),
2 residual blocks per resolution, self-attention at 16x16, dropout 0.1, sinusoidal embedding of
the step index, 35.7M parameters (Ho et al. report 35.7M). Training is theirs: the discrete-time
L_simple loss (epsilon prediction, `training.continuous=False`) on the 1,000-step chain with
betas linear from 1e-4 to 0.02 (the VP SDE with beta_min 0.1, beta_max 20, N 1000), Adam lr 2e-4
with 5,000 warmup steps, gradient clipping at 1, batch 128, EMA 0.9999, 800k steps, random flips,
data in [-1, 1]. Sampling is their ancestral sampler, 1,000 steps.

Expected (Ho et al. 2020, Table 1, unconditional CIFAR-10, L_simple): FID 3.17, IS 9.46,
NLL <= 3.75 bits/dim (test set; their variational bound, where `--mode eval` here computes the
exact likelihood of the probability-flow ODE, so expect a different number). Not measured with
this codebase yet.

    python scripts/run.py --config experiments/ddpm_cifar.py --workdir runs/ddpm_cifar

Smoke variant (tiny, CPU, used by the tests with tfds mock data):
    --config experiments/ddpm_cifar.py:smoke
"""

from experiments import default, vp_cifar


def get_config(arg: str | None = None):
    config = default.get_default_config()
    config.sde.name = "vpsde"
    config.sde.beta_min, config.sde.beta_max, config.sde.N = 0.1, 20.0, 1000
    config.data.dataset = "cifar10"
    config.data.image_size = 32
    config.data.num_channels = 3
    config.data.centered = True
    config.data.random_flip = True

    config.model.name = "unet"
    config.model.update(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                        dropout=0.1, embedding="sinusoidal", resamp_with_conv=True)
    config.model.ema_rate = 0.9999

    config.training.continuous = False        # DDPM's discrete chain, L_simple
    config.training.reduce_mean = True
    config.training.n_iters = 800_001
    config.sampling.predictor = "ancestral"
    config.sampling.corrector = "none"
    if arg == "smoke":
        config = vp_cifar.smoke(config)   # width ch = 16
        config.sde.N = 100           # the discrete chain needs beta_max / N < 1
        return config
    return vp_cifar._no_variant(config, arg, variants=("smoke",))
