"""The probability-flow ODE (Song et al. 2021, eq. 13), integrated adaptively (`rk.py`).

    dx/dt = f(x, t) - 1/2 g(t)^2 score(x, t)

shares its marginals p_t with the forward SDE, so integrating it from a prior sample at T down to
eps gives a sample of p_eps (`ode_sample`), and integrating it from data at eps up to T gives the
data's latent code (`encode`); `decode` is the inverse map. The solver is an explicit Runge-Kutta
pair (Tsitouras 5(4) by default, or Dormand-Prince 5(4), the RK45 that score_sde used through
scipy) with the classical step-size control (`rk.py`).

One solve per example. Every example is integrated on its own adaptive steps, its error the RMS
norm over its own elements, while the network runs on the whole batch at each example's own time
(`rk.solve`), so a sample or a likelihood does not depend on the batch it is computed in, the
number of devices or the batch size. (score_sde let the whole batch share one step, whose error
was the RMS over the batch: a batch's hardest example then set the steps of all, and an easy
batch loosened the error of a hard example.)

The velocity. When the score function gives the model's velocity (`sde.ScoreWithVelocity`: "v"
models and the exact Gaussian mixtures), the vector field is that velocity, and the rectified
flow's ODE runs on [0, 1] (`SDE.ode_process`): at t = 1 its velocity is finite and its
marginal is exactly the prior N(0, I). Otherwise the vector field is f - g^2 score / 2 on [0, T].

Network evaluations. Both pairs are first-same-as-last with 7 stages: each attempted step (accepted
or rejected) costs 6 evaluations, plus two at the start (the first step's estimate), and the batch
runs as many as its example with the most steps: NFE = 6 * max(attempted steps) + 2 exactly
(`tests/test_ode.py` checks this against a counter inside the vector field).

Solver failure. A solve that does not reach its end time within `max_steps` adaptive steps (a stiff
or non-finite vector field: an untrained or diverging network, tolerances too tight) is flagged,
never handed over as numbers: called outside `jit`, `encode` / `decode` / `ode_sample` and
`likelihood.log_likelihood` raise `ODESolverError` naming the cause and what to change; inside a
jitted program, where nothing can raise, the failed examples come back as NaN, and the caller
checks the gathered result (`generate.py` and `evaluate.py` do, and stop with one message).

Noise removal (`ode_sample(denoise=True)`): "reverse_diffusion" is score_sde's, one noise-free
reverse-diffusion step of the SDE's discrete chain at eps, x - f + G^2 score with (f, G) =
`sde.discretize(x, eps)` (for the VP SDE x (2 - sqrt(1 - beta_0)) + beta_0 score); "tweedie" is
E[x_0 | x_eps] = (x + sigma(eps)^2 score) / alpha(eps), 10% larger a correction for the VP SDE.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffusion import rng
from diffusion.sampling import rk
from diffusion.sde import SDE, ScoreFn, batch_broadcast, denoised
from diffusion.workarounds import after

Array = jax.Array

SOLVERS = rk.TABLEAUS


class ODESolverError(FloatingPointError):
    """The probability-flow ODE solve did not reach its end time (see the module docstring)."""


DENOISERS = ("reverse_diffusion", "tweedie")


def probability_flow_drift(sde: SDE, score_fn: ScoreFn) -> Callable[[Array, Array], Array]:
    """The probability-flow vector field `drift(t, x)` on states x (B, ...) at times t (B,): the
    model's velocity when `score_fn` gives it, else f - g^2 score / 2."""
    velocity = getattr(score_fn, "velocity", None)
    ode = sde.reverse(score_fn, probability_flow=True)
    field = velocity if velocity is not None else lambda x, t: ode.sde(x, t)[0]
    # Each evaluation waits for its state x, so no two run at once (`diffusion.workarounds`).
    return lambda t, x: field(x, after(x, t))


def ode_process(sde: SDE, score_fn: ScoreFn) -> SDE:
    """The process the probability-flow ODE runs on: `sde.ode_process()` (the rectified flow on
    [0, 1]) when `score_fn` gives the velocity, else `sde` itself (whose T it starts from)."""
    return sde.ode_process() if hasattr(score_fn, "velocity") else sde


def concrete_bool(value) -> bool | None:
    """bool(value), or None when value is traced under jit and has no value yet."""
    try:
        return bool(value)
    except jax.errors.ConcretizationTypeError:   # also TracerBoolConversionError
        return None


def solve(fn: Callable, y0, t0: float, t1: float, rtol: float, atol: float,
          method: str = "tsit5", max_steps: int = 4096):
    """Integrates dy/dt = fn(t, y) from t0 to t1 (either direction), each example on its own
    adaptive steps (`rk.solve`: fn gets the batch and t (B,), each example's time); returns
    (y(t1), nfe), nfe the evaluations the batch made.

    On failure of any example (t1 not reached within `max_steps` attempted steps, or a
    non-finite vector field) it raises `ODESolverError` when called outside `jit`; traced, the
    failed examples are NaN (an error inside a compiled program could only be a callback's).
    """
    y1, info = rk.solve(fn, y0, t0, t1, rtol, atol, method, max_steps)
    failed = ~info.arrived
    y1 = jax.tree.map(lambda y: jnp.where(batch_broadcast(failed, y), jnp.nan, y), y1)
    if concrete_bool(jnp.any(failed)):
        first = int(jnp.argmax(failed))
        cause = ("the vector field was not finite" if not bool(info.finite[first]) else
                 "the maximum number of solver steps was reached")
        raise ODESolverError(
            f"The probability-flow ODE solve from t={float(t0):g} to t={float(t1):g} failed for "
            f"{int(jnp.sum(failed))} of {failed.shape[0]} examples (example {first} after "
            f"{int(info.attempts[first])} steps): {cause}. A non-finite score (an untrained or "
            f"diverging network) does this, and so do tolerances too tight for the model "
            f"(rtol={rtol:g}, atol={atol:g}): loosen them or raise max_steps (now {max_steps}).")
    return y1, info.nfe


def encode(sde: SDE, score_fn: ScoreFn, x: Array, rtol: float = 1e-5, atol: float = 1e-5,
           eps: float = 1e-3, method: str = "tsit5", max_steps: int = 4096) -> tuple[Array, Array]:
    """Latent code z = x(T) of data x = x(eps) under the probability-flow ODE; (z, nfe). T is
    the end of `ode_process(sde, score_fn)` (1 for the rectified flow given its velocity)."""
    process = ode_process(sde, score_fn)
    return solve(probability_flow_drift(process, score_fn), x, eps, process.T, rtol, atol, method,
                 max_steps)


def decode(sde: SDE, score_fn: ScoreFn, z: Array, rtol: float = 1e-5, atol: float = 1e-5,
           eps: float = 1e-3, method: str = "tsit5", max_steps: int = 4096) -> tuple[Array, Array]:
    """Data x = x(eps) of a latent z = x(T) under the probability-flow ODE; (x, nfe)."""
    process = ode_process(sde, score_fn)
    return solve(probability_flow_drift(process, score_fn), z, process.T, eps, rtol, atol, method,
                 max_steps)


def remove_noise(sde: SDE, score_fn: ScoreFn, x: Array, eps: float,
                 denoiser: str = "reverse_diffusion") -> Array:
    """The final noise removal at time eps (see the module docstring): score_sde's noise-free
    reverse-diffusion step ("reverse_diffusion") or Tweedie's E[x_0 | x_eps] ("tweedie")."""
    if denoiser not in DENOISERS:
        raise ValueError(f"Unknown denoiser {denoiser!r}: choose one of {DENOISERS}.")
    if denoiser == "tweedie":
        return denoised(sde, score_fn, x, eps)
    f, _ = sde.reverse(score_fn).discretize(x, jnp.full((x.shape[0],), eps, x.dtype))
    return x - f


def ode_sample(key: Array, sde: SDE, score_fn: ScoreFn, shape: tuple[int, ...],
               rtol: float = 1e-5, atol: float = 1e-5, eps: float = 1e-3,
               method: str = "tsit5", denoise: bool = False, z: Array | None = None,
               return_latent: bool = False, max_steps: int = 4096,
               denoiser: str = "reverse_diffusion"):
    """Samples of p_eps by the probability-flow ODE from prior samples at T.

    Args:
      key: one PRNG key or (B,) keys, one per sample, for the prior draws (`rng.prior`; unused
        when `z` is given).
      shape: (B, ...) of the samples.
      rtol, atol: tolerances of each example's adaptive steps (score_sde used 1e-5 for both).
      eps: end time; the samples are of p_eps.
      method: "tsit5" | "dopri5".
      denoise: end with one noise-removal step at eps (one more evaluation; score_sde's
        noise_removal), by `denoiser`: "reverse_diffusion" (score_sde's) or "tweedie".
      z: optional latent (B, ...) to decode instead of a fresh prior sample.
      return_latent: also return the latent the samples came from.
      max_steps: adaptive steps allowed before the solve counts as failed (`ODESolverError`
        outside jit, NaN samples inside).

    The ODE starts at the T of `ode_process(sde, score_fn)`, from its prior: 1 and N(0, I) for
    the rectified flow given the model's velocity.

    Returns:
      (x, nfe), or (x, nfe, z) when `return_latent`.
    """
    if denoiser not in DENOISERS:
        raise ValueError(f"Unknown denoiser {denoiser!r}: choose one of {DENOISERS}.")
    if z is None:
        z = rng.prior(ode_process(sde, score_fn), key, shape)
    x, nfe = decode(sde, score_fn, z, rtol, atol, eps, method, max_steps)
    if denoise:
        x = remove_noise(sde, score_fn, x, eps, denoiser)
        nfe = nfe + 1
    return (x, nfe, z) if return_latent else (x, nfe)
