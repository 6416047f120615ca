"""Multistep consistency sampling (Song, Dhariwal, Chen & Sutskever 2023, Algorithm 1).

    x, nfe = consistency_sample(key, sde, score_fn, shape, times=(sde.T, 0.5))

A consistency model maps a noisy x_t straight to the data; here it is any score function,
through its denoiser D(x, t) = (x + sigma(t)^2 score) / alpha(t) (`sde_base.data_prediction`):
for a consistency model trained by this codebase, D is its f(x, t) (the "consistency"
parameterization's score is (alpha f - x) / sigma^2), and for a diffusion model it is Tweedie's
E[x_0 | x_t], which makes one step the posterior mean (blurry), not a sample. Starting from the
prior at times[0]:

    x = D(x_T, T);  for t in times[1:]:  x = D(alpha(t) x + sigma(t) z, t),

with fresh noise z at each re-noising, written on the SDE's own marginals so that it is the same
algorithm for VP, VE and the rectified flow. One network evaluation per time.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from diffusion import rng
from diffusion.sde_base import SDE, ScoreFn, batch_broadcast, denoised

Array = jax.Array


def consistency_sample(key: Array, sde: SDE, score_fn: ScoreFn, shape: tuple[int, ...],
                       times: Sequence[float] | None = None, eps: float | None = None,
                       denoise: bool = True) -> tuple[Array, int]:
    """Multistep consistency sampling on `times`.

    Args:
      key: one PRNG key or (B,) keys: sample b's prior draw comes from its key and rng.PRIOR,
        the re-noising before times[j + 1] from fold_in(fold_in(its key, rng.STEPS), j).
      sde: any SDE with Gaussian marginals x_t = alpha(t) x_0 + sigma(t) z.
      score_fn: score_fn(x, t) -> score; its denoiser is the consistency function.
      shape: (B, ...).
      times: strictly decreasing times in (0, T], the first T (None: (sde.T,), one step).
      eps, denoise: unused (every step ends with the denoiser); accepted like every sampler's.

    Returns:
      (x, nfe = len(times)).
    """
    del eps, denoise
    times = (float(sde.T),) if times is None else tuple(float(t) for t in times)
    if not times or abs(times[0] - sde.T) > 1e-6 * max(1.0, sde.T):
        raise ValueError(f"consistency sampling starts from the prior at T = {sde.T}: times must "
                         f"begin with it, got {times}.")
    if any(not 0.0 < b < a for a, b in zip(times, times[1:], strict=False)):
        raise ValueError(f"times must decrease strictly and stay above 0, got {times}.")
    keys = rng.per_example(key, shape[0])
    x = rng.prior(sde, keys, shape)
    step_keys = rng.fold_in(keys, rng.STEPS)
    x = denoised(sde, score_fn, x, jnp.asarray(times[0], x.dtype))

    def step(x, inputs):
        j, t = inputs
        alpha, sigma = sde.marginal_coeffs(jnp.full(shape[:1], t, x.dtype))
        z = rng.normal(rng.fold_in(step_keys, j), x.shape, x.dtype)
        x_t = batch_broadcast(alpha, x) * x + batch_broadcast(sigma, x) * z
        return denoised(sde, score_fn, x_t, t), None

    if len(times) > 1:
        rest = jnp.asarray(times[1:], x.dtype)
        x, _ = lax.scan(step, x, (jnp.arange(len(rest)), rest))
    return x, len(times)
