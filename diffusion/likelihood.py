"""Exact log-likelihoods through the probability-flow ODE (Song et al. 2021, sec. 4.3, app. D.2).

Along a solution of the probability-flow ODE dx/dt = f~(x, t) = f(x, t) - 1/2 g(t)^2 score(x, t),
the instantaneous change-of-variables formula (Chen et al. 2018) gives
d log p_t(x_t) / dt = -div f~(x_t, t), so

    log p_eps(x) = log p_T(x_T) + int_eps^T div f~(x_t, t) dt,     x_eps = x,

with p_T replaced by the prior. The divergence is the trace of the Jacobian of f~: exact (one
Jacobian-vector product per dimension, for low-dimensional data) or Hutchinson's unbiased estimate
E[v^T (df~/dx) v] with v Gaussian or Rademacher, one probe per example drawn once per solve
(FFJORD, Grathwohl et al. 2019), for images. The state (x, int div) is integrated by the same
adaptive solver as `sampling.ode_sample`, each example on its own steps, its probe from
its own key (`diffusion.rng`): an example's log-likelihood does not depend on the batch it is
computed in. NFE counts evaluations of the ODE's vector field (each one score evaluation together
with its Jacobian-vector products).

For the rectified flow with a model that gives its velocity (`sde.ScoreWithVelocity`), the ODE
runs up to t = 1, where the prior N(0, I) is the exact marginal (`sampling.ode.ode_process`);
otherwise up to T, with `sde.prior_logp` standing in for p_T.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from diffusion import rng
from diffusion.sampling import ode
from diffusion.sde import SDE, ScoreFn, _sum_except_batch

Array = jax.Array

DIVERGENCES = ("exact", "hutchinson_gaussian", "hutchinson_rademacher")


def exact_divergence(fn, x: Array) -> tuple[Array, Array]:
    """fn(x) and the trace of its per-example Jacobian, (B,), by one JVP per dimension.

    Every example's dynamics is independent of the others, so the batched Jacobian is block
    diagonal: one JVP along the d-th unit direction (set in every example at once) gives column
    d of every example's Jacobian."""
    batch, dims = x.shape[0], math.prod(x.shape[1:])
    value = fn(x)

    def diagonal_entry(d):
        direction = jnp.zeros((batch, dims), x.dtype).at[:, d].set(1.0).reshape(x.shape)
        _, column = jax.jvp(fn, (x,), (direction,))
        return column.reshape(batch, dims)[:, d]

    return value, jnp.sum(jax.lax.map(diagonal_entry, jnp.arange(dims)), axis=0)


def hutchinson_divergence(fn, x: Array, probe: Array) -> tuple[Array, Array]:
    """fn(x) and Hutchinson's estimate v^T J v of the per-example Jacobian trace, (B,)."""
    value, jv = jax.jvp(fn, (x,), (probe,))
    return value, _sum_except_batch(probe * jv)


def _probe(key: Array, kind: str, shape, dtype) -> Array | None:
    """Each example's probe from fold_in(its key, rng.PROBE); None for the exact divergence."""
    if kind == "exact":
        return None
    keys = rng.fold_in(rng.per_example(key, shape[0]), rng.PROBE)
    draw = rng.normal if kind == "hutchinson_gaussian" else rng.rademacher
    return draw(keys, shape, dtype)


def log_likelihood(key: Array, sde: SDE, score_fn: ScoreFn, x: Array,
                   divergence: str = "hutchinson_gaussian", rtol: float = 1e-5,
                   atol: float = 1e-5, eps: float = 1e-5, method: str = "tsit5",
                   prior_logp=None, max_steps: int = 4096) -> tuple[Array, Array]:
    """log p_eps(x) in nats per example through the probability-flow ODE.

    Args:
      key: one PRNG key or (B,) keys, one per example, for the Hutchinson probes (unused for
        divergence="exact"); example b's probe comes from its key (`diffusion.rng`).
      x: data (B, ...) in the model's data space (e.g. [-1, 1] images), taken as x(eps).
      divergence: "exact" | "hutchinson_gaussian" | "hutchinson_rademacher".
      rtol, atol: tolerances of the adaptive solver, for x and the integrated divergence.
      eps: the time the likelihood refers to (score_sde: 1e-5).
      prior_logp: log-density (B,) to use at the ODE's end instead of the prior's (e.g. the exact
        p_T of a test distribution, to isolate the integration error from the prior mismatch).
      max_steps: adaptive steps allowed; a solve that needs more (or meets a non-finite score)
        raises `sampling.ode.ODESolverError` outside jit and gives NaN inside.

    Returns:
      (logp (B,), nfe).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"Unknown divergence {divergence!r}: choose one of {DIVERGENCES}.")
    probe = _probe(key, divergence, x.shape, x.dtype)
    process = ode.ode_process(sde, score_fn)
    drift = ode.probability_flow_drift(process, score_fn)

    def vector_field(t, state):   # t (B,): each example's own time
        x, _ = state
        drift_fn = lambda y: drift(t, y)  # noqa: E731
        if probe is None:
            return exact_divergence(drift_fn, x)
        return hutchinson_divergence(drift_fn, x, probe)

    start = (x, jnp.zeros((x.shape[0],), x.dtype))
    (z, integral), nfe = ode.solve(vector_field, start, eps, process.T, rtol, atol, method,
                                   max_steps)
    prior = process.prior_logp if prior_logp is None else prior_logp
    return prior(z) + integral, nfe


def bits_per_dim(logp: Array, data_shape: tuple[int, ...], offset: float = 7.0) -> Array:
    """Bits per dimension of 8-bit data from log-densities (nats) in the model's data space.

    -logp / (D ln 2) + offset, where offset = log2(256 / data range) converts the density of the
    scaled data to the density of the dequantized 8-bit values in [0, 256): 7 for data mapped to
    [-1, 1], 8 for [0, 1]. With uniformly dequantized inputs this is an upper bound on the
    discrete model's bits/dim (Theis et al. 2016).
    """
    dims = math.prod(data_shape)
    return -logp / (dims * math.log(2.0)) + offset
