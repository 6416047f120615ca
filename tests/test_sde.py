"""The SDEs against closed forms, independently integrated moment ODEs and the classical chains.

Every SDE here is linear, dx = f_c(t) x dt + g(t) dw, so x_t | x_0 ~ N(alpha(t) x_0, sigma(t)^2 I)
with alpha' = f_c alpha, alpha(0) = 1 and v' = 2 f_c v + g^2, v(0) = 0 for v = sigma^2. The tests
read f_c and g from `sde.sde` only and check `marginal_coeffs` against (a) those ODEs integrated
by scipy, (b) the papers' closed forms, (c) jvp in t; `discretize` against DDPM (Ho et al. 2020),
Nichol & Dhariwal's cosine chain and SMLD (Song & Ermon 2019), each run for all N steps; and
`reverse` against the exact score of Gaussian data N(MU, S^2 I), whose marginals are
N(alpha MU, (alpha^2 S^2 + sigma^2) I) and whose probability-flow ODE is an explicit affine map.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import integrate, optimize, stats

from diffusion import sde as sde_lib

MU, S = 0.7, 0.5  # Gaussian data N(MU, S^2 I) with an exact score
NAMES = ["vpsde", "subvpsde", "vesde", "cosine_vpsde"]
DEFAULTS = {
    "vpsde": sde_lib.VPSDE(),
    "subvpsde": sde_lib.SubVPSDE(),
    "vesde": sde_lib.VESDE(),
    "cosine_vpsde": sde_lib.CosineVPSDE(),
}
# Defaults and non-default parameters, so that no constant can hide in the formulas.
VARIANTS = [
    *DEFAULTS.values(),
    sde_lib.VPSDE(beta_min=0.3, beta_max=12.0, N=500),
    sde_lib.SubVPSDE(beta_min=0.2, beta_max=8.0, N=200),
    sde_lib.VESDE(sigma_min=0.05, sigma_max=20.0, N=300),
    sde_lib.VESDE(sigma_min=0.02, sigma_max=30.0, N=300, exact_std=True),
    sde_lib.CosineVPSDE(N=400, s=0.02),
]
VARIANT_IDS = [f"{type(s).__name__}-{i}" for i, s in enumerate(VARIANTS)]
TIMES = np.array([1e-3, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0])


def bc(v, x):
    """(B,) -> broadcastable against x (B, ...)."""
    return jnp.reshape(v, v.shape + (1,) * (x.ndim - 1))


def linear_coefficients(sde, t):
    """f_c(t) and g(t), (B,), read from sde.sde at x = 1 (the drift is f_c(t) x)."""
    drift, g = sde.sde(jnp.ones(t.shape + (1,), t.dtype), t)
    return drift[:, 0], g


def gaussian_score(sde):
    """Exact score of p_t for data N(MU, S^2 I): -(x - alpha MU) / (alpha^2 S^2 + sigma^2)."""

    def score_fn(x, t):
        alpha, sigma = sde.marginal_coeffs(t)
        v = alpha**2 * S**2 + sigma**2
        return -(x - bc(alpha, x) * MU) / bc(v, x)

    return score_fn


def times_within_range(sde):
    """TIMES, restricted to t < t_clip for the cosine schedule (its closed form stops there)."""
    if isinstance(sde, sde_lib.CosineVPSDE):
        return TIMES[TIMES < sde.t_clip - 1e-4]
    return TIMES


# ----------------------------------------------------------------------------------------------
# Marginals


@pytest.mark.parametrize("sde", VARIANTS, ids=VARIANT_IDS)
def test_marginals_match_independently_integrated_moment_odes(sde, x64):
    coefficients = jax.jit(lambda t: linear_coefficients(sde, t))

    def f_and_g(t):
        f, g = coefficients(jnp.full((1,), t, jnp.float64))
        return float(f[0]), float(g[0])

    def rhs(t, y):
        f, g = f_and_g(t)
        return [f * y[0], 2.0 * f * y[1] + g**2]

    # From the marginal at t = 0: the clean data for every SDE but score_sde's VE convention,
    # whose p_0 carries noise of std sigma_min. An explicit 8th-order Runge-Kutta: the cosine
    # schedule is stiff only on its last 0.002.
    variance0 = float(sde.marginal_coeffs(jnp.zeros((1,), jnp.float64))[1][0]) ** 2
    expected0 = sde.sigma_min**2 if isinstance(sde, sde_lib.VESDE) and not sde.exact_std else 0.0
    assert variance0 == pytest.approx(expected0, rel=1e-12, abs=1e-30)
    sol = integrate.solve_ivp(rhs, (0.0, 1.0), [1.0, variance0], method="DOP853", t_eval=TIMES,
                              rtol=1e-11, atol=1e-15)
    assert sol.success, sol.message
    alpha, sigma = (np.asarray(c) for c in sde.marginal_coeffs(jnp.asarray(TIMES)))
    np.testing.assert_allclose(alpha, sol.y[0], rtol=1e-7, atol=1e-13)
    np.testing.assert_allclose(sigma**2, sol.y[1], rtol=1e-7, atol=1e-13)


def closed_form(sde, t):
    """alpha(t), sigma(t) from the papers' formulas, in numpy float64."""
    if isinstance(sde, sde_lib.VPSDE | sde_lib.SubVPSDE):
        b0, b1 = sde.beta_min, sde.beta_max
        alpha = np.exp(-(t**2) * (b1 - b0) / 4 - t * b0 / 2)
        if isinstance(sde, sde_lib.VPSDE):
            return alpha, np.sqrt(1 - alpha**2)
        return alpha, 1 - alpha**2
    if isinstance(sde, sde_lib.VESDE):
        ratio = sde.sigma_max / sde.sigma_min
        if sde.exact_std:  # the SDE started at the clean data
            return np.ones_like(t), np.sqrt(sde.sigma_min**2 * (ratio ** (2 * t) - 1))
        return np.ones_like(t), sde.sigma_min * ratio**t   # score_sde's sigma(t) (its eq. 31)
    if isinstance(sde, sde_lib.CosineVPSDE):
        s = sde.s
        alpha2 = np.cos(np.pi / 2 * (t + s) / (1 + s)) ** 2 / np.cos(np.pi / 2 * s / (1 + s)) ** 2
        return np.sqrt(alpha2), np.sqrt(1 - alpha2)
    raise TypeError(sde)


@pytest.mark.parametrize("sde", VARIANTS, ids=VARIANT_IDS)
def test_marginal_coeffs_equal_closed_forms(sde, x64):
    t = times_within_range(sde)
    alpha, sigma = sde.marginal_coeffs(jnp.asarray(t))
    want_alpha, want_sigma = closed_form(sde, t)
    np.testing.assert_allclose(alpha, want_alpha, rtol=1e-12)
    np.testing.assert_allclose(sigma, want_sigma, rtol=1e-9)
    # marginal_prob is alpha x0 and sigma.
    x0 = jax.random.normal(jax.random.key(0), (len(t), 3), jnp.float64)
    mean, std = sde.marginal_prob(x0, jnp.asarray(t))
    np.testing.assert_allclose(mean, want_alpha[:, None] * np.asarray(x0), rtol=1e-12)
    np.testing.assert_allclose(std, want_sigma, rtol=1e-9)


@pytest.mark.parametrize("s", [0.008, 0.02])
def test_cosine_clip_time_and_clipped_tail(s, x64):
    sde = sde_lib.CosineVPSDE(s=s)

    def beta(t):  # the unclipped continuous beta = -d/dt log bar-alpha of Nichol & Dhariwal
        return np.pi / (1 + s) * np.tan(np.pi / 2 * (t + s) / (1 + s))

    t_clip = optimize.brentq(lambda t: beta(t) - sde.beta_clip, 0.5, 1.0, xtol=1e-15)
    assert sde.t_clip == pytest.approx(t_clip, rel=1e-12)
    t = jnp.array([0.3, t_clip - 1e-3, t_clip + 1e-4, 0.9995, 1.0])
    np.testing.assert_allclose(sde.beta(t), np.minimum(beta(np.asarray(t).clip(max=t_clip)),
                                                       sde.beta_clip), rtol=1e-10)
    # Past t_clip, log bar-alpha falls linearly with slope -beta_clip, continuing the closed form.
    alpha_at_clip = closed_form(sde, np.array([t_clip]))[0][0]
    tail = jnp.array([t_clip + 1e-4, 0.9995, 1.0])
    alpha, sigma = sde.marginal_coeffs(tail)
    want = np.log(alpha_at_clip**2) - sde.beta_clip * (np.asarray(tail) - t_clip)
    np.testing.assert_allclose(2 * np.log(alpha), want, rtol=1e-10)
    np.testing.assert_allclose(sigma**2, 1 - np.exp(want), rtol=1e-12)
    assert np.all(np.isfinite(sde.sde(jnp.ones((5, 2)), t)[1]))


@pytest.mark.parametrize("sde", VARIANTS, ids=VARIANT_IDS)
def test_drift_and_diffusion_consistent_with_marginals(sde, x64):
    """d/dt log alpha = f_c and d(sigma^2)/dt = 2 f_c sigma^2 + g^2, by jvp in t."""
    t = jnp.asarray(TIMES)
    if isinstance(sde, sde_lib.CosineVPSDE):  # both sides of the clip, not on it
        t = jnp.concatenate([t[t < sde.t_clip - 1e-4], jnp.array([sde.t_clip + 5e-4])])

    def log_alpha_and_var(t):
        alpha, sigma = sde.marginal_coeffs(t)
        return jnp.log(alpha), sigma**2

    (_, var), (dlog_alpha, dvar) = jax.jvp(log_alpha_and_var, (t,), (jnp.ones_like(t),))
    f, g = linear_coefficients(sde, t)
    np.testing.assert_allclose(dlog_alpha, f, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dvar, 2 * f * var + g**2, rtol=1e-9)
    # The drift is linear in x with that coefficient, and g does not depend on x.
    x = jax.random.normal(jax.random.key(1), (len(t), 2, 3), jnp.float64)
    drift, g_at_x = sde.sde(x, t)
    np.testing.assert_allclose(drift, np.asarray(f)[:, None, None] * np.asarray(x), rtol=1e-12)
    np.testing.assert_array_equal(g_at_x, g)


# ----------------------------------------------------------------------------------------------
# Discrete chains


def sampler_grid(sde, dtype, eps=1e-3):
    """Forward-ordered times of pc_sample's grid linspace(T, eps, N): step i starts at level i."""
    return jnp.linspace(sde.T, eps, sde.N, dtype=dtype)[::-1]


def run_chain(sde, x0, zs, ts):
    """x_{i+1} = x_i + f_i + G_i z_i for every step, from `sde.discretize`; returns all x_{i+1}."""

    def step(x, inputs):
        t, z = inputs
        f, G = sde.discretize(x, jnp.full(x.shape[:1], t, x.dtype))
        x = x + f + bc(G, x) * z
        return x, x

    return jax.lax.scan(step, x0, (ts, zs))[1]


def check_chain(sde, betas):
    """The chain from discretize equals the DDPM chain with `betas` path by path, and its moments.

    With known noises z_j, DDPM gives x_i = sqrt(abar_i) x_0 + sum_{j<=i} sqrt(beta_j)
    sqrt(abar_i / abar_j) z_j, abar_i = prod_{j<=i} (1 - beta_j); the variance is 1 - abar_i.
    """
    n = len(betas)
    x0 = jnp.array([[1.0, -2.0], [0.5, 3.0]])
    zs = jax.random.normal(jax.random.key(2), (n,) + x0.shape, jnp.float64)
    ts = sampler_grid(sde, jnp.float64)
    xs = np.asarray(run_chain(sde, x0, zs, ts))

    abar = np.cumprod(1.0 - betas)
    weights = np.sqrt(betas)[None, :] * np.sqrt(abar[:, None] / abar[None, :])
    weights = np.tril(weights)  # weights[i, j]: the coefficient of z_j in x_i
    want = (np.sqrt(abar)[:, None, None] * np.asarray(x0)[None]
            + np.einsum("ij,jbd->ibd", weights, np.asarray(zs)))
    np.testing.assert_allclose(xs, want, rtol=1e-9, atol=1e-12)

    # Mean and variance recursions of the chain, from discretize alone.
    ones = jnp.ones((n, 1))
    f, G = sde.discretize(ones, ts)
    k = 1.0 + np.asarray(f)[:, 0]  # x_{i+1} = k_i x_i + G_i z
    mean = np.cumprod(k)
    var = np.zeros(n)
    for i in range(n):
        var[i] = k[i] ** 2 * (var[i - 1] if i else 0.0) + float(G[i]) ** 2
    np.testing.assert_allclose(mean, np.sqrt(abar), rtol=1e-10)
    np.testing.assert_allclose(var, 1.0 - abar, rtol=1e-10, atol=1e-15)
    return var


def test_vp_discrete_chain_with_too_few_steps_is_refused():
    with pytest.raises(ValueError, match=r"beta_max / N = 2 >= 1.*sde.N > beta_max"):
        _ = sde_lib.VPSDE(N=10).discrete_betas


@pytest.mark.parametrize("beta_min, beta_max, n", [(0.1, 20.0, 1000), (0.3, 12.0, 500)])
def test_vp_discretize_is_ddpm(beta_min, beta_max, n, x64):
    sde = sde_lib.VPSDE(beta_min=beta_min, beta_max=beta_max, N=n)
    betas = np.linspace(beta_min / n, beta_max / n, n)  # 1e-4 ... 0.02 for the defaults
    if n == 1000:
        np.testing.assert_allclose(betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-12)
    np.testing.assert_allclose(sde.discrete_betas, betas, rtol=1e-12)
    np.testing.assert_allclose(sde.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-12)
    var = check_chain(sde, betas)
    alpha_1 = float(sde.marginal_coeffs(jnp.ones(1))[0][0])
    assert var[-1] == pytest.approx(1.0 - alpha_1**2, abs=1.0 / n)  # ~1: DDPM ends in noise


def nichol_dhariwal_betas(n, s=0.008, max_beta=0.999):
    """improved-diffusion's betas_for_alpha_bar with the cosine alpha-bar, written out."""

    def alpha_bar(t):
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta)
                     for i in range(n)])


@pytest.mark.parametrize("n, s", [(1000, 0.008), (400, 0.02)])
def test_cosine_discretize_is_nichol_dhariwal(n, s, x64):
    sde = sde_lib.CosineVPSDE(N=n, s=s)
    betas = nichol_dhariwal_betas(n, s)
    assert betas[-1] == 0.999  # the clip is active at the end
    np.testing.assert_allclose(sde.discrete_betas, betas, rtol=1e-10)  # 1 - ratio cancels
    var = check_chain(sde, betas)
    assert abs(var[-1] - 1.0) < 1e-6
    # The chain's alpha-bar telescopes to the continuous one at t = (i + 1) / N (below t_clip).
    t = np.arange(1, sde.N + 1) / sde.N
    alpha, _ = sde.marginal_coeffs(jnp.asarray(t))
    below = t < sde.t_clip
    np.testing.assert_allclose(sde.alphas_cumprod[below], np.asarray(alpha)[below] ** 2,
                               rtol=1e-9, atol=1e-15)


def test_ve_discretize_is_smld(x64):
    sde = sde_lib.VESDE()
    sigmas = np.geomspace(0.01, 50.0, 1000)
    np.testing.assert_allclose(sde.discrete_sigmas, sigmas, rtol=1e-12)
    x0 = jnp.array([[1.0, -2.0], [0.5, 3.0]])
    zs = jax.random.normal(jax.random.key(3), (sde.N,) + x0.shape, jnp.float64)
    ts = sampler_grid(sde, jnp.float64)
    xs = np.asarray(run_chain(sde, x0, zs, ts))
    # x_i = x_0 + sum_{j<=i} sqrt(sigma_j^2 - sigma_{j-1}^2) z_j, sigma_{-1} = 0.
    increments = np.sqrt(np.diff(np.concatenate([[0.0], sigmas**2])))
    want = np.asarray(x0)[None] + np.cumsum(increments[:, None, None] * np.asarray(zs), axis=0)
    np.testing.assert_allclose(xs, want, rtol=1e-9, atol=1e-12)
    f, G = sde.discretize(jnp.ones((sde.N, 3)), ts)
    np.testing.assert_array_equal(f, 0.0)
    var = np.cumsum(np.asarray(G) ** 2)  # accumulated variance after step i
    np.testing.assert_allclose(var, sigmas**2, rtol=1e-10)
    # Level i sits at t_i = i / (N - 1), where score_sde's sigma(t_i) is sigma_i; the exact
    # std of the SDE started at clean data misses level 0's noise sigma_min^2.
    t_levels = jnp.arange(sde.N) / (sde.N - 1)
    _, std = sde.marginal_coeffs(t_levels)
    np.testing.assert_allclose(np.asarray(std) ** 2, var, rtol=1e-9)
    _, exact = dataclasses.replace(sde, exact_std=True).marginal_coeffs(t_levels)
    np.testing.assert_allclose(np.asarray(exact) ** 2 + sde.sigma_min**2, var, rtol=1e-9)


def test_subvp_discretize_is_euler_maruyama(x64):
    sde = sde_lib.SubVPSDE(N=250)
    t = jnp.array([0.0, 0.013, 0.4, 0.77, 1.0])
    x = jax.random.normal(jax.random.key(4), (5, 2, 3), jnp.float64)
    f, G = sde.discretize(x, t)
    drift, g = sde.sde(x, t)
    dt = 1.0 / 250
    np.testing.assert_allclose(f, np.asarray(drift) * dt, rtol=1e-12)
    np.testing.assert_allclose(G, np.asarray(g) * np.sqrt(dt), rtol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ["vpsde", "cosine_vpsde", "vesde"])
def test_sampler_grid_visits_every_level_once(name, dtype):
    """discretize at pc_sample's grid linspace(T, 1e-3, N) selects levels N-1, ..., 0 in order."""
    with jax.enable_x64(dtype == "float64"):
        sde = DEFAULTS[name]
        ts = sampler_grid(sde, jnp.dtype(dtype))
        _, G = sde.discretize(jnp.ones((sde.N, 1), jnp.dtype(dtype)), ts)
        g2 = np.asarray(G, np.float64) ** 2
    if name == "vesde":
        table = np.diff(np.concatenate([[0.0], sde.discrete_sigmas**2]))
    else:
        table = sde.discrete_betas
    levels = np.argmin(np.abs(g2[:, None] - table[None, :]) / table[None, :], axis=1)
    np.testing.assert_array_equal(levels, np.arange(sde.N))


def test_ddpm_chain_converges_to_vp_marginals_at_first_order(x64):
    """|abar_i - alpha((i+1)/N)^2| <= 1/N for all i, and the error shrinks ~4x from N to 4N."""

    def max_error(n):
        sde = sde_lib.VPSDE(N=n)
        alpha, _ = sde.marginal_coeffs(jnp.arange(1, n + 1) / n)
        return np.max(np.abs(sde.alphas_cumprod - np.asarray(alpha) ** 2))

    coarse, fine = max_error(1000), max_error(4000)
    assert coarse < 1.0 / 1000, coarse
    assert fine < 1.0 / 4000, fine
    assert 3.5 < coarse / fine < 4.5, (coarse, fine)


# ----------------------------------------------------------------------------------------------
# Prior


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(20_000, 2), (500, 4, 4, 3)])
def test_prior_sampling_shape_and_moments(name, shape):
    sde = DEFAULTS[name]
    z = sde.prior_sampling(jax.random.key(5), shape)
    assert z.shape == shape and z.dtype == jnp.float32
    scale = sde.sigma_max if name == "vesde" else 1.0
    values = np.asarray(z, np.float64).ravel() / scale
    n = values.size
    assert abs(values.mean()) < 4.0 / np.sqrt(n)
    assert abs(values.var() - 1.0) < 4.0 * np.sqrt(2.0 / n)


@pytest.mark.parametrize("name", NAMES)
def test_prior_logp_equals_scipy(name, x64):
    sde = DEFAULTS[name]
    scale = sde.sigma_max if name == "vesde" else 1.0
    key = jax.random.key(6)
    z = scale * jax.random.normal(key, (7, 2), jnp.float64)
    logp = sde.prior_logp(z)
    assert logp.shape == (7,)
    want = stats.multivariate_normal(np.zeros(2), scale**2 * np.eye(2)).logpdf(np.asarray(z))
    np.testing.assert_allclose(logp, want, rtol=1e-12)
    images = scale * jax.random.normal(key, (3, 4, 4, 3), jnp.float64)
    logp = sde.prior_logp(images)
    assert logp.shape == (3,)
    want = stats.norm(0.0, scale).logpdf(np.asarray(images)).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(logp, want, rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# Reversal with the exact score of Gaussian data


def marginal_points(sde, key, t, shape):
    """Points distributed as the marginal p_t of the Gaussian data."""
    alpha, sigma = sde.marginal_coeffs(t)
    v = alpha**2 * S**2 + sigma**2
    z = jax.random.normal(key, shape, t.dtype)
    return bc(alpha, z) * MU + bc(jnp.sqrt(v), z) * z


@pytest.mark.parametrize("shape", [(5, 2), (5, 4, 4, 3)])
@pytest.mark.parametrize("name", NAMES)
def test_probability_flow_drift_transports_gaussian_marginals(name, shape, x64):
    """For Gaussian marginals N(alpha MU, v) the flow is x_t = alpha_t MU + sqrt(v_t / v_s)
    (x_s - alpha_s MU); its t-derivative at t = s must be the probability-flow ODE drift."""
    sde = DEFAULTS[name]
    s = jnp.array([0.02, 0.2, 0.5, 0.8, 0.97])
    x = marginal_points(sde, jax.random.key(7), s, shape)

    def flow(t):
        alpha_s, sigma_s = sde.marginal_coeffs(s)
        alpha_t, sigma_t = sde.marginal_coeffs(t)
        v_s = alpha_s**2 * S**2 + sigma_s**2
        v_t = alpha_t**2 * S**2 + sigma_t**2
        return bc(alpha_t, x) * MU + bc(jnp.sqrt(v_t / v_s), x) * (x - bc(alpha_s, x) * MU)

    at_s, velocity = jax.jvp(flow, (s,), (jnp.ones_like(s),))
    np.testing.assert_allclose(at_s, x, rtol=1e-12)
    drift, diffusion = sde.reverse(gaussian_score(sde), probability_flow=True).sde(x, s)
    np.testing.assert_allclose(drift, velocity, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(diffusion, np.zeros(shape[:1]))
    assert diffusion.shape == shape[:1]


def closed_form_g2(sde, t):
    """g(t)^2 from the papers' formulas, in numpy float64 (t below the cosine clip)."""
    if isinstance(sde, sde_lib.VPSDE | sde_lib.SubVPSDE):
        b0, b1 = sde.beta_min, sde.beta_max
        beta = b0 + t * (b1 - b0)
        if isinstance(sde, sde_lib.VPSDE):
            return beta
        return beta * (1 - np.exp(-2 * (b0 * t + t**2 * (b1 - b0) / 2)))   # the sub-VP SDE
    if isinstance(sde, sde_lib.VESDE):
        log_ratio = np.log(sde.sigma_max / sde.sigma_min)
        return (sde.sigma_min * np.exp(t * log_ratio)) ** 2 * 2 * log_ratio   # d sigma(t)^2 / dt
    if isinstance(sde, sde_lib.CosineVPSDE):
        return np.pi / (1 + sde.s) * np.tan(np.pi / 2 * (t + sde.s) / (1 + sde.s))
    raise TypeError(sde)


@pytest.mark.parametrize("probability_flow", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_reverse_process_carries_the_gaussian_marginals_back_in_time(name, probability_flow,
                                                                     x64):
    """Run from T down to 0, the reverse SDE (Anderson 1982) and the probability-flow ODE keep
    x_t ~ N(m_t, v_t I) for Gaussian data: m = alpha MU, v = alpha^2 S^2 + sigma^2.

    With the exact score the reverse drift is affine, a x + b, and backward in time the mean
    moves by -(a m + b) and the variance by -(2 a v - g'^2) per unit time (g' the reverse
    diffusion): these must be -m' and -v'. The reverse diffusion is g(t) of the papers' formulas
    (0 for the ODE). A wrong sign or factor of the score term, g for g^2, or a reverse diffusion
    that is not g (or not 0 for the ODE) breaks one of the three.
    """
    sde = DEFAULTS[name]
    t = jnp.array([0.02, 0.3, 0.6, 0.9])
    rsde = sde.reverse(gaussian_score(sde), probability_flow=probability_flow)
    x = marginal_points(sde, jax.random.key(8), t, (4, 3))
    drift, diffusion = rsde.sde(x, t)
    b = np.asarray(rsde.sde(jnp.zeros_like(x), t)[0])
    a = np.asarray(rsde.sde(jnp.ones_like(x), t)[0]) - b
    np.testing.assert_allclose(drift, a * np.asarray(x) + b, rtol=1e-10, atol=1e-12)  # affine

    def moments(t):
        alpha, sigma = sde.marginal_coeffs(t)
        return alpha * MU, alpha**2 * S**2 + sigma**2

    (m, v), (dm, dv) = jax.jvp(moments, (t,), (jnp.ones_like(t),))
    want_g2 = np.zeros(4) if probability_flow else closed_form_g2(sde, np.asarray(t))
    np.testing.assert_allclose(np.asarray(diffusion) ** 2, want_g2, rtol=1e-10)
    a, b = a[:, 0], b[:, 0]   # the same for every coordinate
    np.testing.assert_allclose(a * m + b, dm, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(2 * a * v - want_g2, dv, rtol=1e-9)


def closed_form_step(sde, t):
    """(k, G^2), (B,): the forward chain's step x_{i+1} = (1 + k) x_i + G z at the level that
    time t selects, level i = floor(t (N - 1)), from the papers' formulas in numpy float64.

    DDPM (Ho et al. 2020): 1 + k = sqrt(1 - beta_i), G^2 = beta_i, with beta_i = beta_min / N
    + i (beta_max - beta_min) / (N (N - 1)) for the VP SDE and Nichol & Dhariwal's betas for the
    cosine one; SMLD (Song & Ermon 2019): k = 0, G^2 = sigma_i^2 - sigma_{i-1}^2, sigma_i =
    sigma_min (sigma_max / sigma_min)^(i / (N - 1)), sigma_{-1} = 0; sub-VP: Euler-Maruyama with
    dt = 1 / N, k = -beta(t) dt / 2, G^2 = g(t)^2 dt.
    """
    n = sde.N
    i = np.floor(t * (n - 1)).astype(int)
    if isinstance(sde, sde_lib.VPSDE | sde_lib.CosineVPSDE):
        if isinstance(sde, sde_lib.VPSDE):
            beta = sde.beta_min / n + i * (sde.beta_max - sde.beta_min) / (n * (n - 1))
        else:
            beta = nichol_dhariwal_betas(n, sde.s)[i]
        return np.sqrt(1 - beta) - 1, beta
    if isinstance(sde, sde_lib.VESDE):
        sigma = lambda j: sde.sigma_min * (sde.sigma_max / sde.sigma_min) ** (j / (n - 1))
        return np.zeros_like(t), sigma(i) ** 2 - np.where(i > 0, sigma(i - 1), 0.0) ** 2
    if isinstance(sde, sde_lib.SubVPSDE):
        beta = sde.beta_min + t * (sde.beta_max - sde.beta_min)
        return -beta / (2 * n), closed_form_g2(sde, t) / n
    raise TypeError(sde)


@pytest.mark.parametrize("probability_flow", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_reverse_discretize_is_the_reverse_diffusion_step_of_the_chain(name, probability_flow,
                                                                       x64):
    """score_sde's reverse-diffusion step of the discrete chain (DDPM, SMLD, Euler-Maruyama):
    x_{i-1} = x_i - [k x_i - c G^2 score] + G' z with the forward step's k and G at level i,
    c = 1 and G' = G, or c = 1/2 and G' = 0 for the probability flow; at the first and second
    level (SMLD's first step starts from sigma = 0), the middle one and the last (t = T)."""
    sde = DEFAULTS[name]
    n = sde.N
    t = np.array([0.5 / (n - 1), 1.5 / (n - 1), (n // 2 + 0.5) / (n - 1), 1.0])
    score_fn = gaussian_score(sde)
    x = marginal_points(sde, jax.random.key(9), jnp.asarray(t), (4, 3, 2))
    rev_f, rev_G = sde.reverse(score_fn, probability_flow=probability_flow).discretize(
        x, jnp.asarray(t))
    k, G2 = closed_form_step(sde, t)
    c = 0.5 if probability_flow else 1.0
    score = np.asarray(score_fn(x, jnp.asarray(t)))
    want = k[:, None, None] * np.asarray(x) - c * G2[:, None, None] * score
    np.testing.assert_allclose(rev_f, want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(rev_G, np.zeros(4) if probability_flow else np.sqrt(G2),
                               rtol=1e-9)


# ----------------------------------------------------------------------------------------------
# Shapes, construction, hashing


@pytest.mark.parametrize("shape", [(3, 4, 4, 3), (3, 2)])
@pytest.mark.parametrize("name", NAMES)
def test_output_shapes_and_dtypes(name, shape):
    sde = DEFAULTS[name]
    x = jax.random.normal(jax.random.key(10), shape)
    t = jnp.array([0.0, 0.5, 1.0])
    batch = shape[:1]
    drift, diffusion = sde.sde(x, t)
    assert drift.shape == shape and diffusion.shape == batch
    mean, std = sde.marginal_prob(x, t)
    assert mean.shape == shape and std.shape == batch
    alpha, sigma = sde.marginal_coeffs(t)
    assert alpha.shape == sigma.shape == batch
    f, G = sde.discretize(x, t)
    assert f.shape == shape and G.shape == batch
    assert sde.prior_sampling(jax.random.key(11), shape).shape == shape
    assert sde.prior_logp(x).shape == batch
    for probability_flow in (False, True):
        rsde = sde.reverse(gaussian_score(sde), probability_flow=probability_flow)
        for drift, diffusion in (rsde.sde(x, t), rsde.discretize(x, t)):
            assert drift.shape == shape and diffusion.shape == batch
    outputs = [drift, diffusion, mean, std, alpha, sigma, f, G, sde.prior_logp(x)]
    assert all(o.dtype == jnp.float32 for o in outputs), [o.dtype for o in outputs]
    assert all(np.all(np.isfinite(o)) for o in outputs)


CONFIG_SDE = dict(beta_min=0.2, beta_max=15.0, sigma_min=0.02, sigma_max=30.0, s=0.01, N=321)
EXPECTED = {
    "vpsde": sde_lib.VPSDE(beta_min=0.2, beta_max=15.0, N=321),
    "subvpsde": sde_lib.SubVPSDE(beta_min=0.2, beta_max=15.0, N=321),
    "vesde": sde_lib.VESDE(sigma_min=0.02, sigma_max=30.0, N=321),
    "cosine_vpsde": sde_lib.CosineVPSDE(N=321, s=0.01),
}


@pytest.mark.parametrize("name", NAMES)
def test_get_sde_builds_each_class_from_config_keys(name):
    config = ml_collections.ConfigDict({"name": name, **CONFIG_SDE})
    built = sde_lib.get_sde(**config)  # as get_score_model does; other SDEs' keys are ignored
    assert type(built) is type(EXPECTED[name]) and built == EXPECTED[name]
    assert sde_lib.get_sde(name, **CONFIG_SDE) == EXPECTED[name]
    assert sde_lib.get_sde(name) == DEFAULTS[name]


def test_get_sde_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="Unknown SDE") as info:
        sde_lib.get_sde("vp_sde", beta_min=0.1)
    assert all(name in str(info.value) for name in NAMES), str(info.value)


def test_sdes_are_frozen_hashable_and_jit_static():
    a, b = sde_lib.VPSDE(), sde_lib.VPSDE(beta_max=10.0)
    assert hash(a) == hash(sde_lib.VPSDE()) and a == sde_lib.VPSDE() and a != b
    assert len(set(VARIANTS)) == len(VARIANTS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.beta_max = 1.0  # type: ignore[misc]

    std_at = jax.jit(lambda sde, t: sde.marginal_coeffs(t)[1], static_argnums=0)
    t = jnp.array([0.5])
    for sde in [*VARIANTS, b]:  # each static SDE gets its own trace, not a cached other one
        np.testing.assert_allclose(std_at(sde, t), sde.marginal_coeffs(t)[1], rtol=1e-6)
    assert float(std_at(a, t)[0]) != float(std_at(b, t)[0])

    # Reverse SDEs: two built separately from equal SDEs and the same score function are equal,
    # hash equal and share one trace as a static argument; another SDE, score or the
    # probability-flow flag makes another (unequal) reverse process, traced anew.
    score = gaussian_score(a)
    rsde, same = a.reverse(score), sde_lib.VPSDE().reverse(score)
    assert rsde is not same and rsde == same and hash(rsde) == hash(same)
    others = [b.reverse(score), a.reverse(gaussian_score(a)), a.reverse(score, True)]
    assert all(rsde != other for other in others)
    traced = []

    def drift_fn(r, x, t):
        traced.append(r)
        return r.sde(x, t)[0]

    drift = jax.jit(drift_fn, static_argnums=0)
    x = jnp.ones((1, 2))
    np.testing.assert_allclose(drift(rsde, x, t), rsde.sde(x, t)[0], rtol=1e-6)
    np.testing.assert_allclose(drift(same, x, t), rsde.sde(x, t)[0], rtol=1e-6)
    assert len(traced) == 1
    for other in others:
        np.testing.assert_allclose(drift(other, x, t), other.sde(x, t)[0], rtol=1e-6)
    assert len(traced) == 1 + len(others)
