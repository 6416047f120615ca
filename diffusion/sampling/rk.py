"""Adaptive explicit Runge-Kutta integration with a step size per example.

    y1, info = rk.solve(fn, y0, t0, t1, rtol, atol, method="tsit5")

integrates dy/dt = fn(t, y) for every example of a batch on its own adaptive steps: fn is called
on the whole batch, with t (B,) holding each example's own time, so a vector field that closes over
per-example data (labels, a task's known pixels) needs nothing else, and the network runs batched.
An example's steps depend on its own error alone, so its result does not depend on the batch it
is solved in (score_sde, solving through scipy, and diffrax's batched solve share one step, whose
error is a norm over the whole batch).

The pairs are first-same-as-last 5(4) methods with 7 stages: Tsitouras 5(4) ("tsit5"; Tsitouras
2011, "Runge-Kutta pairs of order 5(4) satisfying only the first column simplifying assumption",
Table 1) and Dormand-Prince 5(4) ("dopri5", Dormand & Prince 1980; scipy's RK45). The step-size
control is the classical one (Hairer, Norsett & Wanner, "Solving ODEs I", II.4; scipy's RK45;
diffrax's PIDController at its default coefficients): the error estimate of a step, scaled by
atol + rtol max(|y0|, |y1|), is measured by the RMS norm over the example's elements; the step is
accepted when that norm is <= 1, and the next step is h 0.9 norm^(-1/5), at most 10 h after an
accepted step (at least h) and at least 0.2 h after a rejected one. The first step is Hairer's
estimate from f(t0) and one Euler step (II.4, "starting step size"), at most t1 - t0.

Evaluations: 2 for the first step's estimate (f(t0), reused as the first stage, and f after the
trial Euler step), then 6 per attempted step (accepted or rejected). The batch runs until its last
example arrives, so it makes 2 + 6 max(attempts) evaluations (`Info.nfe`); examples that have
arrived are carried along unchanged. An example whose error estimate is not finite (a non-finite
vector field) stops there, as failed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array


class Tableau(NamedTuple):
    """Butcher tableau of an embedded first-same-as-last pair: stage i at t + c_i h from
    y + h sum_j a_ij k_j; y1 = y + h sum_i b_i k_i; error estimate h sum_i e_i k_i."""

    c: np.ndarray     # (s,)
    a: np.ndarray     # (s, s), strictly lower triangular
    b: np.ndarray     # (s,)
    e: np.ndarray     # (s,), b minus the embedded lower-order weights


def _tableau(c, a_rows, b, b_low) -> Tableau:
    s = len(c)
    a = np.zeros((s, s))
    for i, row in enumerate(a_rows, start=1):
        a[i, :len(row)] = row
    return Tableau(np.asarray(c, np.float64), a, np.asarray(b, np.float64),
                   np.asarray(b, np.float64) - np.asarray(b_low, np.float64))


# Dormand & Prince (1980), "A family of embedded Runge-Kutta formulae", RK5(4)7M.
_DOPRI5_B = [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0]
DOPRI5 = _tableau(
    c=[0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0],
    a_rows=[[1 / 5], [3 / 40, 9 / 40], [44 / 45, -56 / 15, 32 / 9],
            [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
            [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
            _DOPRI5_B[:6]],
    b=_DOPRI5_B,
    b_low=[5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40])

# Tsitouras (2011), Table 1, to double precision.
_TSIT5_B = [0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742,
            -3.290069515436081, 2.324710524099774, 0.0]
TSIT5 = _tableau(
    c=[0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0],
    a_rows=[[0.161],
            [-0.008480655492356989, 0.335480655492357],
            [2.897153057105493, -6.359448489975075, 4.3622954328695815],
            [5.325864828439257, -11.748883564062828, 7.4955393428898365,
             -0.09249506636175525],
            [5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401,
             -0.028269050394068383],
            _TSIT5_B[:6]],
    b=_TSIT5_B,
    b_low=[0.09468075576583945, 0.009183565540343254, 0.4877705284247616, 1.2342975669304790,
           -2.7077123499835256, 1.866628418170587, 1 / 66])

TABLEAUS = {"tsit5": TSIT5, "dopri5": DOPRI5}
SAFETY, FACTOR_MIN, FACTOR_MAX, ERROR_EXPONENT = 0.9, 0.2, 10.0, -1.0 / 5.0


class Info(NamedTuple):
    """How a solve went: per example (B,), and the evaluations the batch made."""

    attempts: Array    # (B,) steps attempted (accepted or rejected)
    arrived: Array     # (B,) bool: reached t1 within max_steps with finite values
    finite: Array      # (B,) bool: every value and vector field stayed finite
    nfe: Array         # () evaluations of fn: 2 + 6 max(attempts)


def _per_example(tree) -> tuple[Callable, Callable]:
    """(broadcast, rms) for a pytree of (B, ...) leaves: v (B,) against each leaf, and the RMS of
    a like tree over each example's elements, (B,)."""
    leaves = jax.tree.leaves(tree)
    size = sum(int(np.prod(leaf.shape[1:])) for leaf in leaves)

    def broadcast(v, leaf):
        return jnp.reshape(v, v.shape + (1,) * (leaf.ndim - 1))

    def rms(t):
        total = sum(jnp.sum(jnp.reshape(leaf, (leaf.shape[0], -1)) ** 2, axis=1)
                    for leaf in jax.tree.leaves(t))
        return jnp.sqrt(total / size)

    return broadcast, rms


def solve(fn: Callable, y0, t0: float, t1: float, rtol: float, atol: float,
          method: str = "tsit5", max_steps: int = 4096):
    """Integrates dy/dt = fn(t, y) from t0 to t1 (either direction), each example on its own
    adaptive steps (see the module docstring).

    Args:
      fn: fn(t (B,), y) -> dy/dt like y; y a pytree of (B, ...) arrays.
      y0: the state at t0, a pytree of (B, ...) arrays (floating point).
      t0, t1: Python floats.
      rtol, atol: the tolerances of each example's local error.
      method: "tsit5" | "dopri5".
      max_steps: attempted steps allowed per example.

    Returns:
      (y(t1), Info). An example that did not arrive keeps the state it reached.
    """
    if method not in TABLEAUS:
        raise ValueError(f"Unknown ODE solver {method!r}: choose one of {sorted(TABLEAUS)}.")
    tab = TABLEAUS[method]
    broadcast, rms = _per_example(y0)
    leaf = jax.tree.leaves(y0)[0]
    batch, dtype = leaf.shape[0], leaf.dtype
    direction = 1.0 if t1 >= t0 else -1.0
    t_end = jnp.asarray(t1, dtype)
    c, a, b, e = (jnp.asarray(v, dtype) for v in tab)

    def axpy(y, h, weights, ks):   # y + h sum_i w_i k_i per example (ks stacked on axis 0)
        return jax.tree.map(
            lambda yv, kv: yv + broadcast(h, yv) * jnp.tensordot(weights, kv, axes=1), y, ks)

    def scale(y, y_other):
        return jax.tree.map(lambda u, v: atol + rtol * jnp.maximum(jnp.abs(u), jnp.abs(v)),
                            y, y_other)

    def ratio(num, den):
        return jax.tree.map(lambda n, d: n / d, num, den)

    # Hairer's starting step from f(t0) and one Euler step.
    t = jnp.full((batch,), t0, dtype)
    f0 = fn(t, y0)
    sc = scale(y0, y0)
    d0, d1 = rms(ratio(y0, sc)), rms(ratio(f0, sc))
    small = (d0 < 1e-5) | (d1 < 1e-5)
    span = abs(t1 - t0)   # the trial point stays inside [t0, t1], where fn is defined
    h0 = jnp.minimum(jnp.where(small, 1e-6, 0.01 * d0 / jnp.where(small, 1.0, d1)), span)
    f1 = fn(t + direction * h0, axpy(y0, direction * h0, jnp.ones((1,), dtype),
                                    jax.tree.map(lambda v: v[None], f0)))
    d2 = rms(ratio(jax.tree.map(jnp.subtract, f1, f0), sc)) / h0
    largest = jnp.maximum(d1, d2)
    h1 = jnp.where(largest <= 1e-15, jnp.maximum(1e-6, 1e-3 * h0),
                   (0.01 / jnp.where(largest <= 1e-15, 1.0, largest)) ** (1.0 / 5.0))
    h = direction * jnp.minimum(jnp.minimum(100.0 * h0, h1), span)
    stages = len(tab.c)

    def attempt(state):
        t, y, k0, h, attempts, done, finite = state
        remaining = t_end - t
        last = jnp.abs(h) >= jnp.abs(remaining)
        step = jnp.where(last, remaining, h)
        ks = jax.tree.map(lambda v: jnp.zeros((stages, *v.shape), v.dtype).at[0].set(v), k0)

        def stage(i, ks):
            k = fn(t + c[i] * step, axpy(y, step, a[i], ks))
            return jax.tree.map(lambda kv, v: kv.at[i].set(v), ks, k)

        ks = lax.fori_loop(1, stages, stage, ks)
        y_new = axpy(y, step, b, ks)
        err = rms(ratio(axpy(jax.tree.map(jnp.zeros_like, y), step, e, ks), scale(y, y_new)))
        ok = jnp.isfinite(err) & (err <= 1.0)
        accept = ok & ~done
        grow = SAFETY * jnp.where(err > 0, err, 1e-10) ** ERROR_EXPONENT
        factor = jnp.where(ok, jnp.clip(grow, 1.0, FACTOR_MAX),
                           jnp.where(jnp.isfinite(err), jnp.clip(grow, FACTOR_MIN, SAFETY),
                                     FACTOR_MIN))
        keep = lambda new, old: jax.tree.map(  # noqa: E731
            lambda n, o: jnp.where(broadcast(accept, n), n, o), new, old)
        return (jnp.where(accept, jnp.where(last, t_end, t + step), t), keep(y_new, y),
                keep(jax.tree.map(lambda kv: kv[-1], ks), k0),
                jnp.where(done, h, step * factor), attempts + (~done).astype(jnp.int32),
                done | (accept & last) | ~jnp.isfinite(err), finite & (jnp.isfinite(err) | done))

    def going(state):
        _, _, _, _, attempts, done, _ = state
        return jnp.any(~done) & (jnp.max(attempts) < max_steps)

    finite0 = jnp.isfinite(rms(f0)) & jnp.isfinite(rms(y0))
    start = (t, y0, f0, h, jnp.zeros((batch,), jnp.int32), ~finite0, finite0)
    _, y, _, _, attempts, done, finite = lax.while_loop(going, attempt, start)
    arrived = done & finite
    return y, Info(attempts, arrived, finite, 2 + 6 * jnp.max(attempts))
