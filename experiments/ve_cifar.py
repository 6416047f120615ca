"""CIFAR-10 with the VE SDE, score_sde's `ve/cifar10_ncsnpp_continuous`.

Song et al. 2021, Table 3: NCSN++ cont. (VE) reaches FID 2.45 / IS 9.73 with predictor-corrector
sampling (reverse diffusion + Langevin, snr 0.16) with that network. Differences from
experiments/vp_cifar.py, as in score_sde: sigma_min 0.01, sigma_max 50, EMA 0.999, the network
conditioned on log sigma(t) with Gaussian Fourier features, the 1/2-sum loss (reduce_mean False),
and PC sampling with 1,000 steps (2,000 NFE).

The network is the paper's NCSN++ cont. (preset `ncsnpp_cont`: FIR resampling, residual input
pyramid, Gaussian Fourier embedding of log sigma, 62.8M parameters); `:deep` gives NCSN++ cont.
(deep), 107.6M. Its FID has not been measured in this codebase yet.

    python scripts/run.py --config experiments/ve_cifar.py --workdir runs/ve_cifar

Smoke variant: --config experiments/ve_cifar.py:smoke
"""

from diffusion.models import ncsnpp
from experiments import vp_cifar


def get_config(arg: str | None = None):
    config = vp_cifar.get_config()
    config.model.name = "ncsnpp"
    config.model.update(ncsnpp.PRESETS["ncsnpp_deep_cont" if arg == "deep" else "ncsnpp_cont"])
    config.sde.name = "vesde"
    config.sde.sigma_min = 0.01
    config.sde.sigma_max = 50.0
    config.model.ema_rate = 0.999
    config.model.noise_input = "log_sigma"
    config.model.fourier_scale = 16.0
    config.training.reduce_mean = False
    config.sampling.predictor = "reverse_diffusion"
    config.sampling.corrector = "langevin"
    config.sampling.snr = 0.16
    return vp_cifar.smoke(config) if arg == "smoke" else vp_cifar._no_variant(config, arg)
