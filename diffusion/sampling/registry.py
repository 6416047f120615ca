"""The samplers by name, as configs choose them (`config.sampling.method`)."""

from __future__ import annotations

from collections.abc import Callable

from diffusion.sampling.consistency import consistency_sample
from diffusion.sampling.ddpm import ddpm_sample
from diffusion.sampling.ode import ode_sample
from diffusion.sampling.pc import pc_sample
from diffusion.sampling.solvers import ddim_sample, dpm_solver_sample, edm_sample

SAMPLERS: dict[str, Callable] = {
    "pc": pc_sample,
    "ode": ode_sample,
    "ddim": ddim_sample,
    "dpm_solver": dpm_solver_sample,
    "edm": edm_sample,
    "ddpm": ddpm_sample,
    "consistency": consistency_sample,
}


def get_sampler(name: str) -> Callable:
    """`SAMPLERS[name]`, or a ValueError listing the names."""
    if name not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}: config.sampling.method must be one of "
                         f"{sorted(SAMPLERS)}.")
    return SAMPLERS[name]
