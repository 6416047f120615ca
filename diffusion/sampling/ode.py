"""The probability-flow ODE (Song et al. 2021, eq. 13), integrated adaptively with diffrax.

    dx/dt = f(x, t) - 1/2 g(t)^2 score(x, t)

shares its marginals p_t with the forward SDE, so integrating it from a prior sample at T down to
eps gives a sample of p_eps (`ode_sample`), and integrating it from data at eps up to T gives the
data's latent code (`encode`); `decode` is the inverse map. The solver is an explicit Runge-Kutta
pair (Tsitouras 5(4) by default, or Dormand-Prince 5(4), the RK45 that score_sde used through
scipy) with diffrax's PID step-size controller at its default coefficients (pcoeff 0, icoeff 1,
dcoeff 0: the classical integral controller that scipy's RK45 uses as well); the whole batch
shares one adaptive step, whose error is the RMS norm over all its elements, as in score_sde.

Network evaluations. Both pairs are first-same-as-last with 7 stages: each attempted step (accepted
or rejected) costs 6 evaluations, plus one at the start, so NFE = 6 * num_steps + 1 exactly
(`tests/test_ode.py` checks this against a counter inside the vector field).

Solver failure. A solve that does not reach its end time within `max_steps` adaptive steps (a stiff
or non-finite vector field: an untrained or diverging network, tolerances too tight) is flagged,
never handed over as numbers: called outside `jit`, `encode` / `decode` / `ode_sample` and
`likelihood.log_likelihood` raise `ODESolverError` naming the cause and what to change; inside a
jitted program, where nothing can raise, the failed examples come back as NaN, and the caller
checks the gathered result (`scripts/run.py` does, and stops with one message).
"""

from __future__ import annotations

import diffrax
import jax
import jax.numpy as jnp

from diffusion.sde import SDE, ScoreFn, denoised

Array = jax.Array

SOLVERS = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5}
_STAGES_PER_STEP = 6   # new vector-field evaluations per attempted step of a 7-stage FSAL pair


class ODESolverError(FloatingPointError):
    """The probability-flow ODE solve did not reach its end time (see the module docstring)."""


def _solver(method: str) -> diffrax.AbstractSolver:
    if method not in SOLVERS:
        raise ValueError(f"Unknown ODE solver {method!r}: choose one of {sorted(SOLVERS)}.")
    return SOLVERS[method]()


def probability_flow_drift(sde: SDE, score_fn: ScoreFn) -> diffrax.ODETerm:
    """The probability-flow vector field as a diffrax term on states x (B, ...)."""
    ode = sde.reverse(score_fn, probability_flow=True)

    def vector_field(t, x, args):
        del args
        drift, _ = ode.sde(x, jnp.full((x.shape[0],), t, x.dtype))
        return drift

    return diffrax.ODETerm(vector_field)


def solve(term: diffrax.ODETerm, y0, t0: float, t1: float, rtol: float, atol: float,
          method: str = "tsit5", max_steps: int = 4096):
    """Integrates `term` from t0 to t1 (either direction); returns (y(t1), nfe).

    On failure (t1 not reached within `max_steps`, or a non-finite vector field) it raises
    `ODESolverError` when called outside `jit`; traced, the result is NaN (diffrax's `throw=False`:
    an error inside a compiled program could only be a callback's traceback).
    """
    solution = diffrax.diffeqsolve(
        term, _solver(method), t0=t0, t1=t1, dt0=None, y0=y0,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        saveat=diffrax.SaveAt(t1=True), max_steps=max_steps, throw=False)
    y1 = jax.tree.map(lambda y: y[-1], solution.ys)
    failed = solution.result != diffrax.RESULTS.successful
    y1 = jax.tree.map(lambda y: jnp.where(failed, jnp.nan, y), y1)
    nfe = _STAGES_PER_STEP * solution.stats["num_steps"] + 1
    if not isinstance(failed, jax.core.Tracer) and bool(failed):
        raise ODESolverError(
            f"The probability-flow ODE solve from t={float(t0):g} to t={float(t1):g} failed after "
            f"{int(solution.stats['num_steps'])} steps ({int(nfe)} evaluations): "
            f"{_describe(solution.result)}. A non-finite score (an untrained or diverging "
            f"network) does this, and so do tolerances too tight for the model (rtol={rtol:g}, "
            f"atol={atol:g}): loosen them or raise max_steps (now {max_steps}).")
    return y1, nfe


def _describe(result) -> str:
    """diffrax's message for a failed result, without its advice (ours follows)."""
    message = diffrax.RESULTS[result] or "the solver did not succeed"
    return message.split(". Try")[0].rstrip(".").lower()


def encode(sde: SDE, score_fn: ScoreFn, x: Array, rtol: float = 1e-5, atol: float = 1e-5,
           eps: float = 1e-3, method: str = "tsit5", max_steps: int = 4096) -> tuple[Array, Array]:
    """Latent code z = x(T) of data x = x(eps) under the probability-flow ODE; (z, nfe)."""
    return solve(probability_flow_drift(sde, score_fn), x, eps, sde.T, rtol, atol, method,
                 max_steps)


def decode(sde: SDE, score_fn: ScoreFn, z: Array, rtol: float = 1e-5, atol: float = 1e-5,
           eps: float = 1e-3, method: str = "tsit5", max_steps: int = 4096) -> tuple[Array, Array]:
    """Data x = x(eps) of a latent z = x(T) under the probability-flow ODE; (x, nfe)."""
    return solve(probability_flow_drift(sde, score_fn), z, sde.T, eps, rtol, atol, method,
                 max_steps)


def ode_sample(key: Array, sde: SDE, score_fn: ScoreFn, shape: tuple[int, ...],
               rtol: float = 1e-5, atol: float = 1e-5, eps: float = 1e-3,
               method: str = "tsit5", denoise: bool = False, z: Array | None = None,
               return_latent: bool = False, max_steps: int = 4096):
    """Samples of p_eps by the probability-flow ODE from prior samples at T.

    Args:
      key: PRNG key for the prior sample (unused when `z` is given).
      shape: (B, ...) of the samples.
      rtol, atol: tolerances of the adaptive step (score_sde used 1e-5 for both).
      eps: end time; the samples are of p_eps.
      method: "tsit5" | "dopri5".
      denoise: if True, return the model's x_0 prediction E[x_0 | x_eps] = (x + sigma^2 score) /
        alpha at eps instead of x_eps (one more evaluation; score_sde's noise removal).
      z: optional latent (B, ...) to decode instead of a fresh prior sample.
      return_latent: also return the latent the samples came from.
      max_steps: adaptive steps allowed before the solve counts as failed (`ODESolverError`
        outside jit, NaN samples inside).

    Returns:
      (x, nfe), or (x, nfe, z) when `return_latent`.
    """
    if z is None:
        z = sde.prior_sampling(key, shape)
    x, nfe = decode(sde, score_fn, z, rtol, atol, eps, method, max_steps)
    if denoise:
        x = denoised(sde, score_fn, x, eps)
        nfe = nfe + 1
    return (x, nfe, z) if return_latent else (x, nfe)
