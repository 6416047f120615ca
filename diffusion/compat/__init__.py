"""Readers of other codebases' checkpoints: `score_sde` (Song et al. 2021's JAX code)."""

from . import score_sde as score_sde
