"""CIFAR-10 with the VE SDE, score_sde's `ve/cifar10_ncsnpp_continuous`.

Song et al. 2021, Table 3: NCSN++ cont. (VE) reaches FID 2.45 / IS 9.73 with predictor-corrector
sampling (reverse diffusion + Langevin, snr 0.16) with that network. Differences from
experiments/vp_cifar.py, as in score_sde: sigma_min 0.01, sigma_max 50, EMA 0.999, the network
conditioned on log sigma(t) with Gaussian Fourier features, the 1/2-sum loss (reduce_mean False),
and PC sampling with 1,000 steps (2,000 NFE).

The network is, for now, this codebase's small U-Net (the paper's NCSN++ comes with the
paper-scale networks); its FID has not been measured yet.

    python scripts/run.py --config experiments/ve_cifar.py --workdir runs/ve_cifar

Smoke variant: --config experiments/ve_cifar.py:smoke
"""

from experiments import vp_cifar


def get_config(arg: str | None = None):
    config = vp_cifar.get_config()
    config.sde.name = "vesde"
    config.sde.sigma_min = 0.01
    config.sde.sigma_max = 50.0
    config.model.ema_rate = 0.999
    config.model.noise_input = "log_sigma"
    config.model.embedding = "fourier"
    config.model.fourier_scale = 16.0
    config.training.reduce_mean = False
    config.sampling.predictor = "reverse_diffusion"
    config.sampling.corrector = "langevin"
    config.sampling.snr = 0.16
    return vp_cifar.smoke(config) if arg == "smoke" else vp_cifar._no_variant(config, arg)
