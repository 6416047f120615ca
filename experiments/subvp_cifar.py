"""CIFAR-10 with the sub-VP SDE, score_sde's `subvp/cifar10_ddpmpp_continuous`.

Song et al. 2021, Table 2/3: DDPM++ cont. (sub-VP) reaches FID 3.02 and 2.99 bits/dim (2.94 for the
deep model) with that network. Everything but the SDE is as in experiments/vp_cifar.py.

    python scripts/run.py --config experiments/subvp_cifar.py --workdir runs/subvp_cifar

Smoke variant: --config experiments/subvp_cifar.py:smoke. Note: the ancestral predictor is not
defined for sub-VP; use euler_maruyama (default) or reverse_diffusion.
"""

from experiments import vp_cifar


def get_config(arg: str | None = None):
    config = vp_cifar.get_config("deep" if arg == "deep" else None)
    config.sde.name = "subvpsde"
    return vp_cifar.smoke(config) if arg == "smoke" else vp_cifar._no_variant(config, arg)
