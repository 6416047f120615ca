"""Predictor-corrector (PC) sampling of a score SDE (Song et al. 2021, Algorithms 2-5, appendix G).

A predictor takes one step of a discretisation of the reverse-time SDE from grid time t towards 0;
a corrector runs Langevin MCMC that keeps the time fixed and moves x towards p_t using the score.
Each is a small pure function; the explicit dicts `PREDICTORS` and `CORRECTORS` map names to them.

    predictor(key, sde, score_fn, x, t, dt) -> (x, x_mean)   # dt > 0: step from t to t - dt
    corrector(key, sde, score_fn, x, t, snr) -> (x, x_mean)  # one Langevin step at time t

x is (B, ...), t is (B,) (all entries equal), dt is a scalar; x_mean is the update without its
Gaussian noise. Every function calls `score_fn` exactly once.

Discrete-chain steps. "ancestral" and "reverse_diffusion" step along the discrete chain of `sde.N`
levels that the SDE is the limit of (DDPM for VP-type SDEs, SMLD for VE; `SDE.discretize`): the
step at time t uses level i = floor(t (N - 1) / T) (`sde._discrete_index`) and moves one level down,
whatever the spacing of the time grid. They are therefore only correct on a grid that visits each
level once, which `pc_sample` checks: it raises ValueError unless n_steps == sde.N and
eps < T / (N - 1). To sample with fewer steps, build the SDE with N = n_steps (e.g.
VPSDE(N=200); its betas are the same continuous schedule, scaled as beta / N). "ald" uses the level
only through alpha_i = 1 - beta_i (below) and is valid on any grid, as is "euler_maruyama".
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from diffusion import rng
from diffusion.sde import SDE, ScoreFn, _discrete_index, batch_broadcast
from diffusion.workarounds import sequenced

Array = jax.Array
StepFn = Callable[[Array, SDE, ScoreFn, Array, Array, Array], tuple[Array, Array]]


def _add_noise(key: Array, x_mean: Array, std: Array) -> Array:
    """x_mean + std z with z ~ N(0, I), each example's z from its own key; std is (B,)."""
    return x_mean + batch_broadcast(std, x_mean) * rng.normal(key, x_mean.shape, x_mean.dtype)


# ----------------------------------------------------------------------------------------------
# Predictors


def euler_maruyama(key, sde, score_fn, x, t, dt):
    """Euler-Maruyama step of the reverse SDE (eq. 6) from t to t - dt:

    x_mean = x - [f(x, t) - g(t)^2 score(x, t)] dt,   x = x_mean + g(t) sqrt(dt) z.
    """
    drift, diffusion = sde.reverse(score_fn).sde(x, t)
    x_mean = x - drift * dt
    return _add_noise(key, x_mean, diffusion * jnp.sqrt(dt)), x_mean


def reverse_diffusion(key, sde, score_fn, x, t, dt):
    """Reverse-diffusion step (eq. 45): the discrete chain x_{i+1} = x_i + f_i + G_i z reversed,

    x_mean = x - f_i + G_i^2 score(x, t),   x = x_mean + G_i z,

    with (f_i, G_i) = `sde.discretize(x, t)` at level i = floor(t (N - 1) / T). dt is unused.
    """
    del dt
    f, G = sde.reverse(score_fn).discretize(x, t)
    x_mean = x - f
    return _add_noise(key, x_mean, G), x_mean


def ancestral(key, sde, score_fn, x, t, dt):
    """Ancestral sampling of the discrete chain (Song et al. appendix F; Ho et al. 2020, Alg. 2).

    VP-type (`sde.discrete_betas`, DDPM):
        x_mean = (x + beta_i score) / sqrt(1 - beta_i),   x = x_mean + sqrt(beta_i) z.
    VE (`sde.discrete_sigmas`, SMLD):
        x_mean = x + (sigma_i^2 - sigma_{i-1}^2) score,
        x = x_mean + sigma_{i-1} sqrt(1 - sigma_{i-1}^2 / sigma_i^2) z,
    with sigma_{-1} = 0 (the clean data: the last step adds no noise). i = floor(t (N - 1) / T);
    dt is unused. Other SDEs (sub-VP) have no such chain: ValueError.
    """
    del dt
    chain = _discrete_chain(sde)
    i = _discrete_index(t, sde.T, sde.N)
    score = score_fn(x, t)
    if chain == "vp":
        beta = jnp.asarray(sde.discrete_betas, x.dtype)[i]
        x_mean = (x + batch_broadcast(beta, x) * score) / batch_broadcast(jnp.sqrt(1.0 - beta), x)
        return _add_noise(key, x_mean, jnp.sqrt(beta)), x_mean
    if chain == "ve":
        sigmas = jnp.asarray(sde.discrete_sigmas, x.dtype)
        sigma = sigmas[i]
        previous = jnp.where(i == 0, 0.0, sigmas[jnp.maximum(i - 1, 0)])
        gap = sigma**2 - previous**2
        x_mean = x + batch_broadcast(gap, x) * score
        return _add_noise(key, x_mean, jnp.sqrt(previous**2 * gap / sigma**2)), x_mean
    raise _no_ancestral_chain(sde)


def _no_ancestral_chain(sde: SDE) -> ValueError:
    return ValueError(
        f"predictor='ancestral' needs a discrete chain: an SDE with discrete_betas (VPSDE, "
        f"CosineVPSDE) or discrete_sigmas (VESDE); {type(sde).__name__} has neither. Use "
        f"predictor='reverse_diffusion' or 'euler_maruyama'.")


def _discrete_chain(sde: SDE) -> str | None:
    """'vp' for SDEs with DDPM betas, 've' for SMLD sigmas, None for neither (e.g. sub-VP)."""
    if hasattr(sde, "discrete_betas"):
        return "vp"
    if hasattr(sde, "discrete_sigmas"):
        return "ve"
    return None


# ----------------------------------------------------------------------------------------------
# Correctors


def _langevin_alpha(sde: SDE, t: Array, dtype) -> Array:
    """alpha_i = 1 - beta_i of the DDPM chain for VP-type SDEs, 1 otherwise; (B,)."""
    if _discrete_chain(sde) != "vp":
        return jnp.ones(t.shape, dtype)
    return 1.0 - jnp.asarray(sde.discrete_betas, dtype)[_discrete_index(t, sde.T, sde.N)]


def _langevin_step(x, score, z, step_size):
    """x_mean = x + eps score, x = x_mean + sqrt(2 eps) z, for a step size eps (B,)."""
    x_mean = x + batch_broadcast(step_size, x) * score
    return x_mean + batch_broadcast(jnp.sqrt(2.0 * step_size), x) * z, x_mean


def langevin(key, sde, score_fn, x, t, snr, norm="batch", axis_name=None):
    """Langevin corrector with a target signal-to-noise ratio (Algorithm 5, VP; Algorithm 4, VE).

    eps = 2 alpha_i (snr ||z|| / ||score||)^2, where ||.|| is the L2 norm of one example over all
    non-batch dims. alpha_i = 1 - beta_i at level floor(t (N - 1) / T) for SDEs with discrete
    betas (VP, cosine), else 1 (VE, sub-VP).

    norm="batch" (score_sde): both norms are averaged over the batch, and over the devices of
    `axis_name` when the sampler runs mapped over a mesh (score_sde's pmean), so the whole batch
    takes one step size; it stays stable in low dimension, where per-example norms fluctuate, but
    a sample then depends on the batch it is drawn in. norm="example": each example its own step
    size, so a sample depends on its own key only (`diffusion.rng`).
    """
    if norm not in CORRECTOR_NORMS:
        raise ValueError(f"Unknown corrector norm {norm!r}: choose one of {CORRECTOR_NORMS}.")
    score = score_fn(x, t)
    z = rng.normal(key, x.shape, x.dtype)
    score_norm = jnp.linalg.norm(jnp.reshape(score, (x.shape[0], -1)), axis=-1)
    noise_norm = jnp.linalg.norm(jnp.reshape(z, (x.shape[0], -1)), axis=-1)
    if norm == "batch":
        score_norm, noise_norm = jnp.mean(score_norm), jnp.mean(noise_norm)
        if axis_name is not None:
            score_norm, noise_norm = lax.pmean((score_norm, noise_norm), axis_name)
    step_size = 2.0 * _langevin_alpha(sde, t, x.dtype) * (snr * noise_norm / score_norm) ** 2
    return _langevin_step(x, score, z, step_size)


def ald(key, sde, score_fn, x, t, snr):
    """Annealed Langevin dynamics (Song & Ermon 2019) with step eps = 2 alpha_i (snr sigma(t))^2.

    sigma(t) is the std of the perturbation kernel p_{0t} (`sde.marginal_coeffs`: score_sde's
    sigma(t) for VESDE, as its ALD uses); alpha_i as for `langevin`.
    """
    score = score_fn(x, t)
    _, sigma = sde.marginal_coeffs(t)
    step_size = 2.0 * _langevin_alpha(sde, t, x.dtype) * (snr * sigma) ** 2
    return _langevin_step(x, score, rng.normal(key, x.shape, x.dtype), step_size)


PREDICTORS: dict[str, StepFn] = {
    "euler_maruyama": euler_maruyama,
    "reverse_diffusion": reverse_diffusion,
    "ancestral": ancestral,
}
CORRECTORS: dict[str, StepFn] = {
    "langevin": langevin,
    "ald": ald,
}
_DISCRETE_CHAIN_PREDICTORS = ("ancestral", "reverse_diffusion")
CORRECTOR_NORMS = ("batch", "example")


def _lookup(table: dict[str, StepFn], name: str | None, kind: str) -> StepFn | None:
    if name is None:
        return None
    if name not in table:
        raise ValueError(f"Unknown {kind} {name!r}: choose one of {sorted(table)} or None.")
    return table[name]


def _concrete_float(value) -> float | None:
    """float(value), or None when value is traced under jit and has no value yet."""
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def _check_discrete_grid(sde: SDE, predictor: str, n_steps: int, eps: float | None) -> None:
    """Discrete-chain predictors need a grid that visits each of the N levels exactly once.

    Level floor(t_j (N - 1) / T) = N - 1 - j for every j iff n == N and eps < T / (N - 1).
    """
    if predictor == "ancestral" and _discrete_chain(sde) is None:
        raise _no_ancestral_chain(sde)
    if n_steps != sde.N:
        raise ValueError(
            f"predictor={predictor!r} steps along the discrete chain of sde.N = {sde.N} levels, "
            f"so it needs n_steps == sde.N (got {n_steps}). Build the SDE with N={n_steps} "
            f"instead, or use predictor='euler_maruyama'.")
    if eps is not None and not eps < sde.T / (sde.N - 1):  # a traced eps cannot be checked
        raise ValueError(
            f"predictor={predictor!r} needs eps < T / (N - 1) = {sde.T / (sde.N - 1):.3g} so that "
            f"the time grid visits each of the N = {sde.N} levels once (got eps={eps}).")


# ----------------------------------------------------------------------------------------------
# The sampler


def pc_sample(key: Array, sde: SDE, score_fn: ScoreFn, shape: tuple[int, ...],
              predictor: str | None = "euler_maruyama", corrector: str | None = None,
              snr: float = 0.16, n_corrector_steps: int = 1, n_steps: int | None = None,
              eps: float = 1e-3, denoise: bool = True,
              condition: Callable | None = None, corrector_norm: str = "batch",
              axis_name: str | None = None) -> tuple[Array, int]:
    """Predictor-corrector sampling from the prior at T down to time ~0 (Song et al. Alg. 1-3).

    Args:
      key: one PRNG key, or (B,) keys, one per sample (`diffusion.rng`): sample b's prior draw
        comes from its key and the purpose rng.PRIOR, and the noise of grid step j from
        fold_in(fold_in(its key, rng.STEPS), j) (then rng.PREDICTOR, or rng.CORRECTOR and the
        corrector step m). A sample therefore does not depend on the batch it is drawn in
        (except through the "batch" corrector norm).
      sde: the forward SDE (`diffusion.sde`).
      score_fn: score_fn(x, t) -> score shaped like x, with x (B, ...) and t (B,).
      shape: shape of the samples, batch first: (B, ...).
      predictor: "euler_maruyama" | "reverse_diffusion" | "ancestral" | None (corrector only).
      corrector: "langevin" | "ald" | None (predictor only). Both None: ValueError.
      snr: the correctors' target signal-to-noise ratio r (0.16: score_sde's CIFAR-10 default).
      n_corrector_steps: corrector steps M per grid time (>= 1 when a corrector is given).
      n_steps: grid size n >= 2; None means sde.N. "ancestral" and "reverse_diffusion" need
        n_steps == sde.N and eps < T / (N - 1) (see the module docstring); ValueError otherwise.
      eps: last grid time, 0 <= eps < T; the grid is t_j = linspace(T, eps, n), j = 0 .. n - 1.
      denoise: return the noise-free mean x_mean of the last predictor step (score_sde's
        noise_removal) instead of x; with predictor=None it has no effect (a Langevin mean is not
        a denoised sample) and the last corrector's x is returned.
      condition: optional `condition(keys, x, x_mean, t) -> (x, x_mean)` applied after every
        corrector and predictor update, with (B,) keys and t (B,) the time the state has reached;
        the conditional samplers of `diffusion.guidance` (inpainting, colorization,
        super-resolution) replace the known part of the state there (Song et al. 2021, app. I).
      corrector_norm: the Langevin corrector's step size from norms averaged over the batch
        ("batch", score_sde's) or per example ("example"); see `langevin`.
      axis_name: when the sampler runs mapped over a mesh axis, its name: the "batch" norms are
        then averaged over the whole global batch, as score_sde's pmean does.

    At each grid time t_j the corrector runs M steps at t_j, then the predictor steps from t_j to
    t_{j+1} (score_sde's order), with t_n = 0: every predictor step has dt = (T - eps) / (n - 1)
    except the last, which goes from eps to 0 (dt = eps; the two agree with score_sde's constant
    dt = 1 / N for the defaults eps = 1e-3, n = N = 1000). Samples therefore approximate p_0,
    within O(eps) of p_eps.

    Returns:
      x: samples of `shape`, and nfe = n * ([predictor given] + M [corrector given]), a Python
      int: every predictor and corrector step calls score_fn once.

    Traceable under jax.jit with every argument but key static (names and step counts change the
    compiled program); no Python loop over steps.
    """
    keys = rng.per_example(key, shape[0])
    x = rng.prior(sde, keys, shape)
    loop_keys = rng.fold_in(keys, rng.STEPS)
    one = pc_step_fn(sde, score_fn, shape, predictor, corrector, snr, n_corrector_steps, n_steps,
                     eps, condition, x.dtype, corrector_norm, axis_name)

    def step(carry, inputs):
        j, t, dt = inputs
        return one.step(rng.fold_in(loop_keys, j), *carry, t, dt), None

    (x, x_mean), _ = lax.scan(step, (x, x), (jnp.arange(one.n_steps), one.ts, one.dts))
    return (x_mean if denoise and predictor is not None else x), one.n_steps * one.evals_per_step


class PCStep(NamedTuple):
    """One grid time of the PC sampler and its grid (see `pc_step_fn`)."""

    step: Callable      # step(step_keys (B,), x, x_mean, t, dt) -> (x, x_mean)
    ts: Array           # (n,) grid times T .. eps
    dts: Array          # (n,) predictor steps t_j - t_{j+1}, with t_n = 0
    n_steps: int
    evals_per_step: int


def pc_step_fn(sde: SDE, score_fn: ScoreFn, shape: tuple[int, ...],
               predictor: str | None = "euler_maruyama", corrector: str | None = None,
               snr: float = 0.16, n_corrector_steps: int = 1, n_steps: int | None = None,
               eps: float = 1e-3, condition: Callable | None = None,
               dtype=jnp.float32, corrector_norm: str = "batch",
               axis_name: str | None = None) -> PCStep:
    """The checked arguments of `pc_sample` as one grid step and its grid (for samplers that
    loop over the grid themselves, e.g. RePaint's resampling in `diffusion.guidance`)."""
    predictor_fn = _lookup(PREDICTORS, predictor, "predictor")
    corrector_fn = _lookup(CORRECTORS, corrector, "corrector")
    if predictor_fn is None and corrector_fn is None:
        raise ValueError("pc_sample needs a predictor or a corrector; both are None.")
    if corrector_norm not in CORRECTOR_NORMS:
        raise ValueError(f"Unknown corrector_norm {corrector_norm!r}: choose one of "
                         f"{CORRECTOR_NORMS}.")
    if corrector_fn is langevin:
        corrector_fn = functools.partial(langevin, norm=corrector_norm, axis_name=axis_name)
    n_steps = sde.N if n_steps is None else int(n_steps)
    if n_steps < 2:
        raise ValueError(f"n_steps must be >= 2 (the grid runs from T to eps), got {n_steps}.")
    eps_value = _concrete_float(eps)
    if eps_value is not None and not 0.0 <= eps_value < sde.T:
        raise ValueError(f"eps must satisfy 0 <= eps < T = {sde.T}, got {eps_value}.")
    if corrector_fn is not None and n_corrector_steps < 1:
        raise ValueError(f"n_corrector_steps must be >= 1 with a corrector, got {n_corrector_steps}"
                         f"; pass corrector=None for predictor-only sampling.")
    if predictor in _DISCRETE_CHAIN_PREDICTORS:
        _check_discrete_grid(sde, predictor, n_steps, eps_value)
    # Every score evaluation waits for the state it is given. Otherwise XLA:CPU runs the parts
    # that depend on t only (e.g. factorising a t-dependent matrix) of the corrector's and the
    # predictor's evaluations at the same time, and jaxlib 0.10-0.11 can deadlock on two
    # batched LAPACK calls at once (`diffusion.workarounds`).
    score_fn = sequenced(score_fn)

    # Time grid t_0 = T > ... > t_{n-1} = eps; predictor steps dt_j = t_j - t_{j+1}, t_n = 0.
    ts = jnp.linspace(sde.T, eps, n_steps, dtype=dtype)
    dts = ts - jnp.append(ts[1:], jnp.zeros((1,), dtype))

    def corrector_steps(keys, x, t):
        def body(m, carry):
            return corrector_fn(rng.fold_in(keys, m), sde, score_fn, carry[0], t, snr)

        return lax.fori_loop(0, n_corrector_steps, body, (x, x))

    # One grid time: M corrector steps at t_j, then one predictor step to t_{j+1}.
    def step(step_keys, x, x_mean, t, dt):
        t_batch = jnp.full(shape[:1], t, x.dtype)
        if corrector_fn is not None:
            x, x_mean = corrector_steps(rng.fold_in(step_keys, rng.CORRECTOR), x, t_batch)
            if condition is not None:
                x, x_mean = condition(rng.fold_in(step_keys, rng.CONDITION_CORRECTOR), x, x_mean,
                                      t_batch)
        if predictor_fn is not None:
            x, x_mean = predictor_fn(rng.fold_in(step_keys, rng.PREDICTOR), sde, score_fn, x,
                                     t_batch, dt)
            if condition is not None:
                x, x_mean = condition(rng.fold_in(step_keys, rng.CONDITION_PREDICTOR), x, x_mean,
                                      t_batch - dt)
        return x, x_mean

    evals_per_step = (predictor_fn is not None) + (n_corrector_steps if corrector_fn else 0)
    return PCStep(step, ts, dts, n_steps, evals_per_step)
