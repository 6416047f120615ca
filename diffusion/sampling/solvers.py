"""Few-step samplers written against the marginal coefficients x_t = alpha(t) x_0 + sigma(t) z.

They use only `sde.marginal_coeffs`, `sde.log_snr` / `sde.t_of_log_snr` and the prior, so they are
defined for every SDE here (VP, sub-VP, VE, cosine) and for any new process with Gaussian
marginals. Each network evaluation is turned into the data prediction (Tweedie's formula)

    D(x, t) = (x + sigma(t)^2 score(x, t)) / alpha(t)   ~ E[x_0 | x_t = x],

with noise prediction eps(x, t) = (x - alpha D) / sigma = -sigma score.

- `ddim_sample`: DDIM (Song, Meng & Ermon 2021, eq. 12) on a grid uniform in t; eta = 0 is the
  deterministic sampler (first-order exponential integrator of the probability-flow ODE), eta = 1
  adds the DDPM posterior noise. The posterior variance is written for general (alpha, sigma):
  c^2 = eta^2 sigma_s^2 (sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2) / sigma_t^2, which is DDIM's
  sigma_t(eta)^2 for VP and its analogue for sub-VP and VE. NFE = steps.
- `dpm_solver_sample`: DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++", Alg. 2 and the
  third-order multistep of their appendix), data-prediction form, time steps uniform in the
  log-SNR lambda = log(alpha / sigma). Orders 1-3; the first steps use lower orders while history
  builds up, and for fewer than 15 steps the last steps do too (lower_order_final, as the
  authors recommend for stability). NFE = steps. The update of order k uses divided differences
  of the last k data predictions as estimates of h^n d^n D / dlambda^n (n < k) in the exact
  solution x_s = sigma_s / sigma_t x_t + sigma_s int e^lambda D dlambda; its local error is
  O(h^(k+1)), which `tests/test_solvers.py` checks from exact history.
- `edm_sample`: EDM's Heun sampler (Karras et al. 2022, Alg. 2) in the scaled variables
  x~ = x / alpha, sigma~(t) = sigma(t) / alpha(t), where the probability-flow ODE reads
  dx~/dsigma~ = (x~ - D) / sigma~. The rho = 7 discretisation runs from sigma~(T) to sigma~(eps);
  the last step goes to sigma~ = 0 (a plain Euler step, i.e. returns D) unless denoise=False.
  Stochastic churn (S_churn, S_tmin, S_tmax, S_noise) as in the paper. NFE = 2 (steps - 1) + 1,
  e.g. 35 for the paper's 18 steps.

The prior sample is `rng.prior(sde, key, shape)` in every sampler here and in `ode_sample`, so
the deterministic ones started from the same key solve the same ODE from the same point. `key` is
one key or (B,) keys, one per sample (`diffusion.rng`); the noise of step i comes from sample b's
fold_in(fold_in(key_b, rng.STEPS), i), so a sample does not depend on the batch it is drawn in.

All are pure, jit-compatible functions with a `lax.scan` over the steps; `steps`, `order` and
`denoise` change the program and must be static under jit.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from diffusion import rng
from diffusion.sde import SDE, ScoreFn, denoised

Array = jax.Array


def _check(sde, steps: int, minimum: int = 1) -> None:
    if not all(hasattr(sde, name) for name in ("marginal_coeffs", "log_snr", "prior_sampling")):
        raise ValueError(f"This sampler needs an SDE with Gaussian marginals (marginal_coeffs, "
                         f"log_snr, prior_sampling); got {type(sde).__name__}.")
    if int(steps) != steps or steps < minimum:
        raise ValueError(f"steps must be an integer >= {minimum}, got {steps!r}.")


def ddim_sample(key: Array, sde: SDE, score_fn: ScoreFn, shape: tuple[int, ...], steps: int = 50,
                eps: float = 1e-3, eta: float = 0.0, denoise: bool = False) -> tuple[Array, int]:
    """DDIM from T to eps on `steps` intervals uniform in t; (x, nfe).

    eta in [0, 1]: 0 is deterministic, 1 is DDPM-like ancestral noise. With denoise, the result is
    D(x_eps, eps) instead of x_eps (one more evaluation).
    """
    _check(sde, steps)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"DDIM's eta must be in [0, 1], got {eta}.")
    keys = rng.per_example(key, shape[0])
    x = rng.prior(sde, keys, shape)
    step_keys = rng.fold_in(keys, rng.STEPS)
    ts = jnp.linspace(sde.T, eps, steps + 1, dtype=x.dtype)
    alphas, sigmas = sde.marginal_coeffs(ts)

    def step(x, i):
        t, alpha_t, sigma_t = ts[i], alphas[i], sigmas[i]
        alpha_s, sigma_s = alphas[i + 1], sigmas[i + 1]
        x0 = denoised(sde, score_fn, x, t)
        noise = (x - alpha_t * x0) / sigma_t
        c = eta * sigma_s / sigma_t * jnp.sqrt(
            jnp.maximum(sigma_t**2 - (alpha_t / alpha_s * sigma_s) ** 2, 0.0))
        z = rng.normal(rng.fold_in(step_keys, i), x.shape, x.dtype)
        x = alpha_s * x0 + jnp.sqrt(jnp.maximum(sigma_s**2 - c**2, 0.0)) * noise + c * z
        return x, None

    x, _ = lax.scan(step, x, jnp.arange(steps))
    if denoise:
        return denoised(sde, score_fn, x, ts[-1]), steps + 1
    return x, steps


def log_snr_grid(sde: SDE, steps: int, eps: float, dtype=jnp.float32) -> Array:
    """steps + 1 times from T to eps, uniform in log-SNR (DPM-Solver's 'logSNR' schedule)."""
    ends = jnp.asarray([sde.T, eps], dtype)
    lam_T, lam_eps = sde.log_snr(ends)
    lams = jnp.linspace(lam_T, lam_eps, steps + 1)
    ts = sde.t_of_log_snr(lams, t_min=eps)
    return ts.at[0].set(sde.T).at[-1].set(eps)


def _dpm_update(order: int, x, m, lam, alpha_s, sigma_s, sigma_t, h):
    """One DPM-Solver++ multistep update of the given order from t to s (lambda_s - lambda_t = h).

    m = (m0, m1, m2): data predictions at the current and the two previous grid times, with
    log-SNRs lam = (lam0, lam1, lam2). The exact solution is x_s = sigma_s / sigma_t x + alpha_s
    (-phi1 D + h phi2 D' - h^2 phi3 D'' + ...) with D^(n) = d^n D / dlambda^n at lambda_t; d1 and
    d2 estimate h D' and h^2 D'' from divided differences (d2 includes the factor 2 of the second
    difference, without which the third-order update is only second order locally).
    """
    m0, m1, m2 = m
    phi1 = jnp.expm1(-h)                      # e^{-h} - 1
    x_next = sigma_s / sigma_t * x - alpha_s * phi1 * m0
    if order == 1:
        return x_next
    r0 = (lam[0] - lam[1]) / h
    d1_0 = (m0 - m1) / r0
    if order == 2:
        return x_next - 0.5 * alpha_s * phi1 * d1_0
    r1 = (lam[1] - lam[2]) / h
    d1_1 = (m1 - m2) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = 2.0 * (d1_0 - d1_1) / (r0 + r1)     # ~ h^2 d2m/dlambda2
    phi2 = phi1 / h + 1.0
    phi3 = phi2 / h - 0.5
    return x_next + alpha_s * phi2 * d1 - alpha_s * phi3 * d2


def dpm_solver_sample(key: Array, sde: SDE, score_fn: ScoreFn, shape: tuple[int, ...],
                      steps: int = 20, order: int = 2, eps: float = 1e-3,
                      lower_order_final: bool = True, denoise: bool = False) -> tuple[Array, int]:
    """DPM-Solver++ (multistep, data prediction) from T to eps; (x, nfe) with nfe = steps."""
    _check(sde, steps)
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {order!r}.")
    x = rng.prior(sde, key, shape)
    ts = log_snr_grid(sde, steps, eps, x.dtype)
    alphas, sigmas = sde.marginal_coeffs(ts)
    lams = jnp.log(alphas) - jnp.log(sigmas)
    orders = [min(order, i + 1) for i in range(steps)]
    if lower_order_final and steps < 15:
        orders = [min(o, steps - i) for i, o in enumerate(orders)]
    branches = [lambda *a, o=o: _dpm_update(o, *a) for o in (1, 2, 3)]

    def step(carry, i):
        x, m1, m2, lam1, lam2 = carry
        m0 = denoised(sde, score_fn, x, ts[i])
        lam = (lams[i], lam1, lam2)
        h = lams[i + 1] - lams[i]
        x = lax.switch(jnp.asarray(orders)[i] - 1, branches, x, (m0, m1, m2), lam,
                       alphas[i + 1], sigmas[i + 1], sigmas[i], h)
        return (x, m0, m1, lams[i], lam1), None

    # Placeholder history (never used by the order-limited first steps); distinct lambdas keep
    # the unused branches finite.
    init = (x, jnp.zeros_like(x), jnp.zeros_like(x), lams[0] - 1.0, lams[0] - 2.0)
    (x, *_), _ = lax.scan(step, init, jnp.arange(steps))
    if denoise:
        return denoised(sde, score_fn, x, ts[-1]), steps + 1
    return x, steps


def edm_sigma_grid(sigma_max: float, sigma_min: float, steps: int, rho: float = 7.0,
                   dtype=jnp.float32) -> Array:
    """EDM's time steps sigma_i = (sigma_max^(1/rho) + i/(steps-1) (sigma_min^(1/rho) -
    sigma_max^(1/rho)))^rho, i = 0 .. steps - 1 (Karras et al. eq. 5), without the final 0."""
    i = jnp.arange(steps, dtype=dtype) / max(steps - 1, 1)
    inv_rho = 1.0 / rho
    return (sigma_max**inv_rho + i * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho


def edm_sample(key: Array, sde: SDE, score_fn: ScoreFn, shape: tuple[int, ...], steps: int = 18,
               rho: float = 7.0, s_churn: float = 0.0, s_tmin: float = 0.0,
               s_tmax: float = math.inf, s_noise: float = 1.0, eps: float = 1e-3,
               denoise: bool = True) -> tuple[Array, int]:
    """EDM Heun sampler (Karras et al. 2022, Alg. 2) on the SDE's sigma~(t) = sigma(t)/alpha(t).

    steps >= 2 noise levels from sigma~(T) to sigma~(eps) with the rho schedule, Heun between
    them; then, with denoise (the paper's algorithm), an Euler step to sigma~ = 0, which returns D.
    s_churn > 0 adds the paper's stochastic churn at levels in [s_tmin, s_tmax] (sigma~ units).
    Returns (x, nfe): nfe = 2 (steps - 1) + denoise; 35 for steps = 18.
    """
    _check(sde, steps, minimum=2)
    if rho <= 0:
        raise ValueError(f"EDM's rho must be positive, got {rho}.")
    keys = rng.per_example(key, shape[0])
    x = rng.prior(sde, keys, shape)
    step_keys = rng.fold_in(keys, rng.STEPS)
    ends = jnp.asarray([sde.T, eps], x.dtype)
    alpha_ends, sigma_ends = sde.marginal_coeffs(ends)
    sigma_max, sigma_min = sigma_ends / alpha_ends
    sigmas = edm_sigma_grid(sigma_max, sigma_min, steps, rho, x.dtype)
    gamma_max = min(s_churn / (steps - 1), math.sqrt(2.0) - 1.0)

    def time_of(sigma_tilde):
        return sde.t_of_log_snr(-jnp.log(sigma_tilde), t_min=eps)

    def slope(x_tilde, sigma_tilde, t):
        alpha, _ = sde.marginal_coeffs(t[None])
        d = denoised(sde, score_fn, alpha[0] * x_tilde, t)
        return (x_tilde - d) / sigma_tilde, d

    def step(x_tilde, i):
        sigma_cur, sigma_next = sigmas[i], sigmas[i + 1]
        t_cur = jnp.where(i == 0, sde.T, time_of(sigma_cur))
        t_next = jnp.where(i == steps - 2, eps, time_of(sigma_next))
        if gamma_max > 0:
            churn = (sigma_cur >= s_tmin) & (sigma_cur <= s_tmax)
            sigma_hat = sigma_cur * (1.0 + jnp.where(churn, gamma_max, 0.0))
            z = rng.normal(rng.fold_in(step_keys, i), x_tilde.shape, x_tilde.dtype)
            x_tilde = x_tilde + jnp.sqrt(sigma_hat**2 - sigma_cur**2) * s_noise * z
            t_cur = jnp.where(churn, time_of(sigma_hat), t_cur)
        else:
            sigma_hat = sigma_cur
        d_cur, _ = slope(x_tilde, sigma_hat, t_cur)
        x_euler = x_tilde + (sigma_next - sigma_hat) * d_cur
        d_next, _ = slope(x_euler, sigma_next, t_next)
        return x_tilde + (sigma_next - sigma_hat) * 0.5 * (d_cur + d_next), None

    x_tilde, _ = lax.scan(step, x / alpha_ends[0], jnp.arange(steps - 1))
    nfe = 2 * (steps - 1)
    if denoise:
        # Euler step from sigma_min to 0: x~ + (0 - sigma_min) (x~ - D) / sigma_min = D.
        return denoised(sde, score_fn, alpha_ends[1] * x_tilde, ends[1]), nfe + 1
    return alpha_ends[1] * x_tilde, nfe
