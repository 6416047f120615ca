"""CIFAR-10 with the sub-VP SDE, score_sde's `subvp/cifar10_ddpmpp_continuous`.

Everything but the SDE is as in experiments/vp_cifar.py (DDPM++ cont., 61.8M parameters;
`:deep`, 106.6M). Expected (Song et al. 2021, Tables 3 and 2; see vp_cifar.py):

    model                          FID (PC / EM)  IS     NLL (bits/dim)  FID (ODE)
    DDPM++ cont. (sub-VP)          2.61           9.56   3.02            3.16
    DDPM++ cont. (deep, sub-VP)    2.41           9.57   2.99            2.92

Not measured with this codebase yet.

    python scripts/run.py --config experiments/subvp_cifar.py --workdir runs/subvp_cifar

Smoke variant: --config experiments/subvp_cifar.py:smoke. Note: the ancestral predictor is not
defined for sub-VP; use euler_maruyama (default) or reverse_diffusion.
"""

from experiments import vp_cifar


def get_config(arg: str | None = None):
    config = vp_cifar.get_config("deep" if arg == "deep" else None)
    config.sde.name = "subvpsde"
    return vp_cifar.smoke(config) if arg == "smoke" else vp_cifar._no_variant(config, arg)
