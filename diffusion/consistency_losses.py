"""Consistency training (Song, Dhariwal, Chen & Sutskever 2023; improved as iCT by Song & Dhariwal
2023), written on sigma~ = sigma / alpha so that it applies to every process.

The noise levels are Karras et al.'s: sigma~_i = (s_min^(1/rho) + i / (N - 1) (s_max^(1/rho) -
s_min^(1/rho)))^rho, i = 0 .. N-1, from sigma~ at the boundary time (training.eps) to sigma~(T),
each the time `sde.t_of_log_snr(-ln sigma~_i)`. With one noise z for both,
x_i = alpha(t_i) x_0 + sigma(t_i) z, the loss of an example at the pair (i, i + 1) is

    lambda_i d(f_theta(x_{i+1}, t_{i+1}), stop_gradient(f_theta(x_i, t_i))),

with iCT's choices: lambda_i = 1 / (sigma~_{i+1} - sigma~_i); d the pseudo-Huber distance
sqrt(||a - b||^2 + c^2) - c with c = 0.00054 sqrt(dim) (LPIPS needs weights that cannot ship);
i drawn with P(i) proportional to erf((ln sigma~_{i+1} - P_mean) / (sqrt 2 P_std)) -
erf((ln sigma~_i - P_mean) / (sqrt 2 P_std)) (P_mean -1.1, P_std 2.0); the target is the online
network itself (no EMA, mu = 0), evaluated with the same dropout key; and N follows the doubling
curriculum N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2(s1 / s0) + 1)) over the
K = training.n_iters steps (s0 = 10, s1 = 1280).

    loss_fn = make_consistency_training_loss(sde, score_model, total_steps=400_000)
    losses = loss_fn(params, batch, keys, step=step)      # (B,); the train step passes step
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffusion import rng
from diffusion.sde_base import SDE, batch_broadcast

Array = jax.Array


def curriculum(step: Array, total_steps: int, s0: int = 10, s1: int = 1280) -> Array:
    """iCT's number of levels N(k) = min(s0 2^floor(k / K'), s1) + 1 at step k (int32)."""
    stage = max(1, math.floor(total_steps / (math.log2(s1 / s0) + 1)))
    doublings = jnp.asarray(step, jnp.int32) // stage
    return jnp.minimum(s0 * 2 ** jnp.minimum(doublings, 30), s1).astype(jnp.int32) + 1


def karras_levels(sigma_min: float, sigma_max: float, n: Array, size: int,
                  rho: float = 7.0) -> Array:
    """(size,) levels sigma~_i for i < n (traced n <= size), increasing; entries i >= n repeat
    sigma_max."""
    i = jnp.minimum(jnp.arange(size), n - 1).astype(jnp.float32)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + i / (n - 1).astype(jnp.float32) * (hi - lo)) ** rho


def lognormal_pair_probs(sigmas: Array, n: Array, p_mean: float = -1.1,
                         p_std: float = 2.0) -> Array:
    """(size - 1,) probabilities of the pairs (i, i + 1), i < n - 1: the lognormal mass between
    the two levels (iCT, sec. 3.5); zero beyond."""
    cdf = jax.scipy.special.erf((jnp.log(sigmas) - p_mean) / (math.sqrt(2.0) * p_std))
    mass = jnp.where(jnp.arange(sigmas.shape[0] - 1) < n - 1, cdf[1:] - cdf[:-1], 0.0)
    return mass / jnp.sum(mass)


def pseudo_huber(diff: Array, c: float) -> Array:
    """sqrt(||diff||^2 + c^2) - c per example (over all non-batch dimensions)."""
    sq = jnp.sum(jnp.reshape(diff, (diff.shape[0], -1)) ** 2, axis=1)
    return jnp.sqrt(sq + c**2) - c


def make_consistency_training_loss(sde: SDE, score_model, *, total_steps: int,
                                   s0: int = 10, s1: int = 1280, p_mean: float = -1.1,
                                   p_std: float = 2.0, rho: float = 7.0,
                                   huber_c: float | None = None) -> Callable:
    """iCT's loss (module docstring) for a "consistency" score model; `loss_fn(params, batch,
    key, step)` -> (B,). It carries `needs_step = True` for the train step."""
    if getattr(score_model, "parameterization", None) != "consistency":
        raise ValueError("training.loss='consistency_training' trains a consistency function: "
                         "set model.parameterization='consistency'.")
    b = score_model.boundary_time
    ends = jnp.asarray([b, sde.T], jnp.float32)
    alpha, sigma = sde.marginal_coeffs(ends)
    sigma_min, sigma_max = (float(v) for v in sigma / alpha)
    size = s1 + 1

    def time_of(sigma_tilde):
        return sde.t_of_log_snr(-jnp.log(sigma_tilde), t_min=b)

    def loss_fn(params, batch, key, step=0):
        x0 = batch["x"]
        keys = rng.per_example(key, x0.shape[0])
        z = rng.normal(rng.fold_in(keys, rng.NOISE), x0.shape, x0.dtype)
        u = jax.vmap(jax.random.uniform)(rng.fold_in(keys, rng.TIME))
        dropout_rng = jax.random.fold_in(keys[0], rng.DROPOUT)
        n = curriculum(step, total_steps, s0, s1)
        sigmas = karras_levels(sigma_min, sigma_max, n, size, rho)
        cdf = jnp.cumsum(lognormal_pair_probs(sigmas, n, p_mean, p_std))
        i = jnp.minimum(jnp.searchsorted(cdf, u * cdf[-1], side="right"), n - 2)
        lo, hi = sigmas[i], sigmas[i + 1]
        # The ends are the boundary and T themselves (bisection would land within 1e-7 of them).
        t_lo = jnp.where(i == 0, b, time_of(lo))
        t_hi = jnp.where(i + 1 == n - 1, sde.T, time_of(hi))

        def noisy(t):
            a, s = sde.marginal_coeffs(t)
            return batch_broadcast(a, x0) * x0 + batch_broadcast(s, x0) * z

        y = batch.get("label")
        online = score_model.consistency_function(params, noisy(t_hi), t_hi, y=y, train=True,
                                                  rng=dropout_rng)
        target = jax.lax.stop_gradient(score_model.consistency_function(
            params, noisy(t_lo), t_lo, y=y, train=True, rng=dropout_rng))
        c = 0.00054 * math.sqrt(math.prod(x0.shape[1:])) if huber_c is None else huber_c
        return pseudo_huber(online - target, c) / (hi - lo)

    loss_fn.needs_step = True
    return loss_fn
