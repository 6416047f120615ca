"""Samplers: each takes (key, sde, score_fn, shape, ...) and returns (samples, nfe)."""

from diffusion.sampling.pc import CORRECTORS as CORRECTORS
from diffusion.sampling.pc import PREDICTORS as PREDICTORS
from diffusion.sampling.pc import pc_sample as pc_sample
