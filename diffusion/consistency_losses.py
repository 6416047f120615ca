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

from diffusion.losses import _draw, level_of
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


def _sigma_range(sde: SDE, boundary_time: float) -> tuple[float, float]:
    """sigma~ = sigma / alpha at the boundary time and at T."""
    alpha, sigma = sde.marginal_coeffs(jnp.asarray([boundary_time, sde.T], jnp.float32))
    return tuple(float(v) for v in sigma / alpha)


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
    sigma_min, sigma_max = _sigma_range(sde, b)
    size = s1 + 1

    def time_of(sigma_tilde):
        return sde.t_of_log_snr(-jnp.log(sigma_tilde), t_min=b)

    def loss_fn(params, batch, key, step=0):
        x0 = batch["x"]
        z, u, dropout_rng = _draw(key, x0)
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


def teacher_step(sde, teacher_score, x: Array, t_from: Array, t_to: Array, sigma_from: Array,
                 sigma_to: Array, solver: str = "heun") -> Array:
    """One step of the teacher's probability-flow ODE from t_from to t_to (each (B,)), written on
    sigma~ for every process: d(x / alpha) / d sigma~ = (x / alpha - D(x, t)) / sigma~ (EDM's
    form), D the teacher's denoiser; Euler, Heun (a second evaluation at t_to), or
    "dpm_solver": DPM-Solver++(2S) (Lu et al. 2022) with its midpoint in log-SNR,
    sigma~_mid = sqrt(sigma~_from sigma~_to): x~ -> r x~ + (1 - r) D, r the ratio of sigma~s,
    to the midpoint with D(x_from), then over the whole step with D(x_mid)."""
    from diffusion.sde_base import data_prediction

    def denoise(x, t):
        alpha, sigma = sde.marginal_coeffs(t)
        return data_prediction(x, teacher_score(x, t), alpha, sigma)

    def slope(x, t, sigma_tilde):
        alpha, _ = sde.marginal_coeffs(t)
        return (x / batch_broadcast(alpha, x) - denoise(x, t)) / batch_broadcast(sigma_tilde, x)

    alpha_from, _ = sde.marginal_coeffs(t_from)
    alpha_to, _ = sde.marginal_coeffs(t_to)
    x_tilde = x / batch_broadcast(alpha_from, x)
    if solver == "dpm_solver":
        sigma_mid = jnp.sqrt(sigma_from * sigma_to)
        t_mid = sde.t_of_log_snr(-jnp.log(sigma_mid))
        r_mid = batch_broadcast(sigma_mid / sigma_from, x)
        u = r_mid * x_tilde + (1.0 - r_mid) * denoise(x, t_from)
        alpha_mid, _ = sde.marginal_coeffs(t_mid)
        d_mid = denoise(batch_broadcast(alpha_mid, x) * u, t_mid)
        r = batch_broadcast(sigma_to / sigma_from, x)
        return batch_broadcast(alpha_to, x) * (r * x_tilde + (1.0 - r) * d_mid)
    h = batch_broadcast(sigma_to - sigma_from, x)
    d1 = slope(x, t_from, sigma_from)
    euler = x_tilde + h * d1
    if solver == "euler":
        return batch_broadcast(alpha_to, x) * euler
    d2 = slope(batch_broadcast(alpha_to, x) * euler, t_to, sigma_to)
    return batch_broadcast(alpha_to, x) * (x_tilde + 0.5 * h * (d1 + d2))


CD_SOLVERS = ("euler", "heun", "dpm_solver")
CD_DISTANCES = ("l2", "pseudo_huber")


def make_consistency_distillation_loss(sde: SDE, score_model, teacher_model, *,
                                       num_levels: int = 18, solver: str = "heun",
                                       distance: str = "l2", target_ema: float = 0.95,
                                       rho: float = 7.0) -> Callable:
    """Consistency distillation (Song et al. 2023, Alg. 2) for a "consistency" score model.

    N = num_levels Karras levels on sigma~ from the boundary to sigma~(T) (the paper's CIFAR-10
    CD: N = 18); i ~ U{0 .. N-2}; x_{i+1} = alpha x_0 + sigma z at t_{i+1}; the teacher (any
    score model of this codebase, `teacher_model`) takes one ODE step to t_i
    (`teacher_step`); the loss is d(f_theta(x_{i+1}, t_{i+1}), f_target(x^_i, t_i)) with the
    target network an EMA of the student with decay `target_ema` (the paper's mu; the train
    step keeps it in the loss state, updated after every optimizer step) and
    d the mean squared error ("l2") or the pseudo-Huber distance. `loss_fn(params, batch, key,
    state)` with state = {"target": params, "teacher": the teacher's params}; the function
    carries `init_state(params, teacher_params)` and `update_state(state, params)`.
    """
    if getattr(score_model, "parameterization", None) != "consistency":
        raise ValueError("training.loss='consistency_distillation' trains a consistency "
                         "function: set model.parameterization='consistency'.")
    if solver not in CD_SOLVERS or distance not in CD_DISTANCES:
        raise ValueError(f"training.cd_solver must be one of {list(CD_SOLVERS)} and "
                         f"training.cd_distance one of {list(CD_DISTANCES)}; got {solver!r}, "
                         f"{distance!r}.")
    if num_levels < 2:
        raise ValueError(f"training.cd_levels must be >= 2, got {num_levels}.")
    b = score_model.boundary_time
    sigma_min, sigma_max = _sigma_range(sde, b)
    sigmas = karras_levels(sigma_min, sigma_max, jnp.int32(num_levels), num_levels, rho)
    times = jnp.concatenate([jnp.asarray([b], jnp.float32),
                             sde.t_of_log_snr(-jnp.log(sigmas[1:-1]), t_min=b),
                             jnp.asarray([sde.T], jnp.float32)])

    def loss_fn(params, batch, key, state):
        x0 = batch["x"]
        z, u, dropout_rng = _draw(key, x0)
        i = level_of(u, num_levels - 1)                  # the pair (i, i + 1)
        y = batch.get("label")
        t_hi, t_lo = times[i + 1], times[i]
        a, s = sde.marginal_coeffs(t_hi)
        x_hi = batch_broadcast(a, x0) * x0 + batch_broadcast(s, x0) * z
        teacher = lambda x, t: teacher_model(state["teacher"], x, t, y=y)   # noqa: E731
        x_lo = jax.lax.stop_gradient(teacher_step(sde, teacher, x_hi, t_hi, t_lo, sigmas[i + 1],
                                                  sigmas[i], solver))
        online = score_model.consistency_function(params, x_hi, t_hi, y=y, train=True,
                                                  rng=dropout_rng)
        target = jax.lax.stop_gradient(score_model.consistency_function(
            state["target"], x_lo, t_lo, y=y, train=True, rng=dropout_rng))
        diff = online - target
        if distance == "l2":
            return jnp.mean(jnp.reshape(diff, (diff.shape[0], -1)) ** 2, axis=1)
        return pseudo_huber(diff, 0.00054 * math.sqrt(math.prod(x0.shape[1:])))

    def init_state(params, teacher_params):
        return {"target": jax.tree.map(jnp.copy, params), "teacher": teacher_params}

    if not 0.0 <= target_ema < 1.0:
        raise ValueError(f"training.target_ema must be in [0, 1), got {target_ema}.")

    def update_state(state, params):
        mu = target_ema
        target = jax.tree.map(lambda a, p: mu * a + (1.0 - mu) * p, state["target"], params)
        return {"target": target, "teacher": state["teacher"]}

    loss_fn.uses_state = True
    loss_fn.init_state = init_state
    loss_fn.update_state = update_state
    return loss_fn
