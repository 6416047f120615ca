"""CIFAR-10 with the VE SDE, score_sde's `ve/cifar10_ncsnpp_continuous`.

Differences from experiments/vp_cifar.py, as in score_sde (`ve/cifar10_ncsnpp_continuous.py`,
`ve/cifar10_ncsnpp_deep_continuous.py`, run_lib; checked by tests/test_paper_configs.py): data in
[0, 1] (the network sees 2 x - 1), sigma_min 0.01, sigma_max 50 with score_sde's marginal std
sigma(t), EMA 0.999, the network conditioned on log sigma(t) with Gaussian Fourier features and
its output divided by sigma(t) (scale_by_sigma), the 1/2-sum loss (reduce_mean False), PC
sampling (reverse diffusion + Langevin, snr 0.16) with 1,000 steps (2,000 NFE) down to
eps = 1e-5, and bits/dim offset 8 (data range 1). The network is NCSN++ cont. (preset
`ncsnpp_cont`: FIR resampling, residual input pyramid, Gaussian Fourier embedding of log sigma,
62.8M parameters); `:deep` gives NCSN++ cont. (deep), 8 blocks per resolution, 107.6M.

Expected (Song et al. 2021, Table 3: FID / IS of 50k PC samples of the checkpoint with the best
FID; the deep model's are the paper's headline result):

    model                          FID     IS
    NCSN++ cont. (VE)              2.38    9.83
    NCSN++ cont. (deep, VE)        2.20    9.89

Not measured with this codebase yet. VE likelihoods are not among the paper's NLL results.

    python scripts/run.py --config experiments/ve_cifar.py --workdir runs/ve_cifar

Smoke variant: --config experiments/ve_cifar.py:smoke
"""

from diffusion.models import ncsnpp
from experiments import vp_cifar


def get_config(arg: str | None = None):
    config = vp_cifar.get_config("deep" if arg == "deep" else None)
    config.model.name = "ncsnpp"
    config.model.update(ncsnpp.PRESETS["ncsnpp_deep_cont" if arg == "deep" else "ncsnpp_cont"])
    config.sde.name = "vesde"
    config.sde.sigma_min = 0.01
    config.sde.sigma_max = 50.0
    config.sde.N = 1000
    config.sde.exact_std = False                # score_sde's std sigma(t)
    config.data.centered = False                # [0, 1]; the network sees 2 x - 1
    config.model.ema_rate = 0.999
    config.model.parameterization = "score"     # score = output / sigma(t):
    config.model.scale_by_sigma = True          # score_sde's scale_by_sigma
    config.model.noise_input = "log_sigma"      # Fourier features of log sigma(t)
    config.model.fourier_scale = 16.0
    config.training.reduce_mean = False
    config.sampling.predictor = "reverse_diffusion"
    config.sampling.corrector = "langevin"
    config.sampling.snr = 0.16
    config.sampling.eps = 1e-5                  # run_lib's sampling_eps for VE
    return vp_cifar.smoke(config) if arg == "smoke" else vp_cifar._no_variant(config, arg)
