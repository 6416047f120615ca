"""Predictor-corrector sampling with the exact score of Gaussian data matches the exact marginal.

Data x0 ~ N(mu, s^2 I). Under x_t = alpha(t) x0 + sigma(t) z the marginal is p_t = N(alpha mu, v I)
with v = alpha^2 s^2 + sigma^2 (`sde.marginal_coeffs`) and score -(x - alpha mu) / v. Samples of
every (predictor, corrector) pair and SDE are compared with p_eps in mean (per dimension) and
variance (pooled over the iid dimensions). Tolerance = 4 Monte Carlo standard errors + a
discretisation budget. With a predictor the budget (0.01 on the mean, 3% on the variance) is about
1.5-2 times the largest bias measured with 1e5-2e5 samples (1.6% VP reverse diffusion at N = 200,
~1.7% VE reverse diffusion at N = 1000); p_eps differs from p_0, where the sampler ends, by under
0.1% in variance for these SDEs.
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import sde as sde_lib
from diffusion.sampling import CORRECTORS, PREDICTORS, pc_sample

MU = np.array([1.0, -0.5])
S = 0.5
B = 16_384  # 4 SE: 0.016 on the mean, 3.1% on the pooled variance
EPS = 1e-3
MEAN_BUDGET, VAR_BUDGET = 0.01, 0.03  # discretisation budget: absolute mean, relative variance

# VP-type chains with 200 levels are within 1.6% in variance; the VE chain (sigma_max / sigma_min =
# 5000) needs 1000 levels for that (at 200 levels reverse diffusion is +5%, ancestral -4%).
SDES = {
    "vp": sde_lib.VPSDE(N=200),
    "subvp": sde_lib.SubVPSDE(N=200),
    "cosine": sde_lib.CosineVPSDE(N=200),
    "ve": sde_lib.VESDE(N=1000),
}


def exact_score(sde, s=S, sign=1.0):
    """Score of p_t for data N(MU, s^2 I), x (B, 2) (the exact one for s = S and sign = 1)."""

    def score_fn(x, t):
        alpha, sigma = sde.marginal_coeffs(t)
        v = alpha**2 * s**2 + sigma**2
        return -sign * (x - alpha[:, None] * MU[None, :]) / v[:, None]

    return score_fn


def marginal_mismatch(x, sde, var_factor=1.0, mean_budget=MEAN_BUDGET, var_budget=VAR_BUDGET):
    """Empty string if x (n, D) matches p_eps (variance times var_factor), else what is off."""
    x = np.asarray(x, np.float64)
    n, d = x.shape
    alpha, sigma = (float(c[0]) for c in sde.marginal_coeffs(jnp.full((1,), EPS)))
    mean, var = alpha * MU, var_factor * (alpha**2 * S**2 + sigma**2)
    mean_err = np.abs(x.mean(0) - mean)
    mean_tol = 4 * np.sqrt(var / n) + mean_budget
    var_err = abs(x.var(0, ddof=1).mean() - var)
    var_tol = 4 * var * np.sqrt(2 / (n * d)) + var_budget * var
    problems = []
    if not np.all(mean_err <= mean_tol):  # also catches NaN
        problems.append(f"mean error {mean_err} > {mean_tol:.4f}")
    if not var_err <= var_tol:
        problems.append(f"variance error {var_err:.4f} > {var_tol:.4f} (target {var:.4f})")
    return "; ".join(problems)


def sample(sde, score_fn, key=0, shape=(B, 2), **kwargs):
    fn = jax.jit(functools.partial(pc_sample, sde=sde, score_fn=score_fn, shape=shape, **kwargs))
    return fn(jax.random.key(key))


def _cases():
    """Every SDE x predictor x corrector. The default suite runs each (predictor, corrector)
    pair on one SDE, the SDEs taking turns, so every SDE, predictor and corrector is covered;
    the rest of the grid runs with -m slow. VE's 1000 levels take no corrector there (with one,
    2000 evaluations: 14 s on 2 cores), and annealed Langevin alone runs with the Langevin
    corrector (ALD alone, 200 x 10 steps, with -m slow)."""
    names = list(SDES)
    pairs = [(p, c) for p in (*PREDICTORS, None) for c in (None, *CORRECTORS)
             if p is not None or c is not None]
    for k, (predictor, corrector) in enumerate(pairs):
        fast = names[k % len(names)]
        while ((predictor == "ancestral" and fast == "subvp")
               or (corrector is not None and fast == "ve")):
            k += 1
            fast = names[k % len(names)]
        for sde_name in names:
            if predictor == "ancestral" and sde_name == "subvp":
                continue  # no discrete chain: see test_ancestral_on_subvp_is_an_error
            default = sde_name == fast and (predictor, corrector) != (None, "ald")
            yield pytest.param(sde_name, predictor, corrector,
                               id=f"{sde_name}-{predictor}-{corrector}",
                               marks=() if default else pytest.mark.slow)


@pytest.mark.parametrize("sde_name, predictor, corrector", list(_cases()))
def test_matches_gaussian_marginal(sde_name, predictor, corrector):
    sde = SDES[sde_name]
    kwargs = dict(predictor=predictor, corrector=corrector)
    mean_budget, var_budget = MEAN_BUDGET, VAR_BUDGET
    if predictor is None:
        # Annealed Langevin alone needs many steps per level to follow p_t as it moves (Song et
        # al. Table 1 run 2000 corrector steps), so 200 levels x M steps. ALD's step
        # 2 (snr sigma(t))^2 vanishes with sigma(t), so it stops moving x before t = 0: measured
        # +3% variance (VP) and a mean up to 0.04 short (sub-VP, where sigma(t) = 1 - alpha^2
        # is O(t)); hence the wider budget (0.04, 5%) for corrector-only sampling.
        snr, m = (0.16, 5) if corrector == "langevin" else (0.7, 10)
        kwargs.update(n_steps=200, snr=snr, n_corrector_steps=m)
        mean_budget, var_budget = 0.04, 0.05
    # The Langevin step with a norm-based step size leaves N(m, v) at N(m, v (1 + alpha snr^2)):
    # its stationary law for Gaussian targets (see test_corrector_stationary_law); alpha ~ 1 here.
    snr = kwargs.get("snr", 0.16)
    var_factor = 1.0 + snr**2 if corrector == "langevin" else 1.0
    x, nfe = sample(sde, exact_score(sde), eps=EPS, **kwargs)
    assert x.shape == (B, 2) and x.dtype == jnp.float32
    problem = marginal_mismatch(x, sde, var_factor, mean_budget, var_budget)
    assert not problem, problem


@pytest.mark.parametrize("predictor, s, sign", [
    ("euler_maruyama", 0.6, 1.0), ("euler_maruyama", S, -1.0), ("ancestral", 0.6, 1.0)])
def test_wrong_score_is_detected(predictor, s, sign):
    """The comparison has teeth: a score for s = 0.6, or with its sign flipped, fails it."""
    sde = SDES["vp"]
    x, _ = sample(sde, exact_score(sde, s=s, sign=sign), predictor=predictor)
    assert marginal_mismatch(x, sde)


@dataclasses.dataclass(frozen=True)
class _WrongDiffusionVPSDE(sde_lib.VPSDE):
    """A VP SDE whose g(t) is 30% too large but whose marginals are unchanged: inconsistent."""

    def sde(self, x, t):
        drift, diffusion = super().sde(x, t)
        return drift, 1.3 * diffusion


def test_wrong_diffusion_is_detected():
    sde = _WrongDiffusionVPSDE(N=200)
    problem = marginal_mismatch(sample(sde, exact_score(sde))[0], sde)
    assert "variance" in problem


@pytest.mark.parametrize("corrector, snr", [("langevin", 0.5), ("ald", 0.5)])
def test_corrector_stationary_law(corrector, snr):
    """Many corrector steps at a fixed t reach the unadjusted Langevin chain's stationary law.

    For N(m, v) and step eps = a v, x' = x + eps (m - x) / v + sqrt(2 eps) z has stationary
    variance v / (1 - a/2). ALD: a = 2 snr^2 sigma^2 / v. Langevin: eps uses the batch-mean norms,
    ||z|| / ||score|| -> v / sqrt(V) at variance V, so a = 2 snr^2 v / V and V = v (1 + snr^2).
    A large snr makes these factors (1.25, 1.18) far from 1 and from those of a wrong step size.
    """
    sde = SDES["ve"]
    t = jnp.full((B,), 0.5)
    alpha, sigma = (float(c[0]) for c in sde.marginal_coeffs(t))
    v = alpha**2 * S**2 + sigma**2
    step = CORRECTORS[corrector]

    @jax.jit
    def run(key):
        def body(x, i):
            return step(jax.random.fold_in(key, i), sde, exact_score(sde), x, t, snr)[0], None

        return jax.lax.scan(body, jnp.zeros((B, 2)), jnp.arange(300))[0]

    x = np.asarray(run(jax.random.key(1)), np.float64)
    if corrector == "langevin":
        expected = v * (1 + snr**2)
    else:
        expected = v / (1 - snr**2 * sigma**2 / v)
    np.testing.assert_allclose(x.mean(0), alpha * MU, atol=4 * np.sqrt(expected / B))
    np.testing.assert_allclose(x.var(0, ddof=1).mean(), expected, rtol=4 * np.sqrt(2 / (2 * B)))


@pytest.mark.parametrize("predictor, corrector, m, expected", [
    ("euler_maruyama", None, 1, 7),
    ("reverse_diffusion", "langevin", 3, 28),
    (None, "ald", 2, 14),
    ("ancestral", "ald", 1, 14),
])
def test_nfe_counts_score_evaluations(predictor, corrector, m, expected):
    """The returned NFE equals the number of score_fn calls actually executed."""
    calls = []
    sde = sde_lib.VPSDE(beta_max=5.0, N=7)    # few steps: the chain's betas stay below 1
    score = exact_score(sde)

    def counting_score(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return score(x, t)

    x, nfe = sample(sde, counting_score, shape=(4, 2), predictor=predictor, corrector=corrector,
                    n_corrector_steps=m)
    jax.block_until_ready(x)
    jax.effects_barrier()
    assert nfe == expected == len(calls)


def test_jit_reproducible_and_image_shapes():
    sde = sde_lib.VESDE(N=20)
    kwargs = dict(sde=sde, score_fn=exact_score_images(sde), shape=(3, 4, 4, 1),
                  predictor="reverse_diffusion", corrector="langevin", n_corrector_steps=2)
    jitted = jax.jit(functools.partial(pc_sample, **kwargs))
    x1, nfe = jitted(jax.random.key(0))
    x2, _ = jitted(jax.random.key(0))
    x3, _ = jitted(jax.random.key(1))
    assert x1.shape == (3, 4, 4, 1) and nfe == 60
    assert bool(jnp.all(jnp.isfinite(x1)))
    np.testing.assert_array_equal(x1, x2)
    assert not np.allclose(x1, x3)
    # denoise=False returns the last predictor step's x, noise included.
    x5, _ = jax.jit(functools.partial(pc_sample, denoise=False, **kwargs))(jax.random.key(0))
    assert not np.allclose(x1, x5)


def test_jit_over_eps_with_any_grid():
    """Euler-Maruyama takes any n_steps (here != sde.N) and a traced eps."""
    sde = sde_lib.VESDE(N=20)

    @jax.jit
    def run(key, eps):
        return pc_sample(key, sde, exact_score(sde), (8, 2), n_steps=30, eps=eps)

    x, nfe = run(jax.random.key(0), 1e-3)
    assert x.shape == (8, 2) and int(nfe) == 30 and bool(jnp.all(jnp.isfinite(x)))


def exact_score_images(sde):
    """Exact score for image-shaped data N(0.5, S^2 I)."""

    def score_fn(x, t):
        alpha, sigma = sde.marginal_coeffs(t)
        v = alpha**2 * S**2 + sigma**2
        return -(x - sde_lib.batch_broadcast(alpha, x) * 0.5) / sde_lib.batch_broadcast(v, x)

    return score_fn


def test_float64(x64):
    sde = sde_lib.VPSDE(beta_max=5.0, N=10)
    x, nfe = pc_sample(jax.random.key(0), sde, exact_score(sde), (5, 2), corrector="ald")
    assert x.dtype == jnp.float64 and nfe == 20


@pytest.mark.parametrize("kwargs, message", [
    (dict(predictor="heun"), "Unknown predictor 'heun': choose one of ['ancestral', "
                             "'euler_maruyama', 'reverse_diffusion']"),
    (dict(corrector="hmc"), "Unknown corrector 'hmc': choose one of ['ald', 'langevin']"),
    (dict(predictor=None, corrector=None), "needs a predictor or a corrector"),
    (dict(predictor="reverse_diffusion", n_steps=5), "needs n_steps == sde.N"),
    (dict(predictor="ancestral", eps=0.2), "needs eps < T / (N - 1)"),
    (dict(corrector="langevin", n_corrector_steps=0), "n_corrector_steps must be >= 1"),
    (dict(n_steps=1), "n_steps must be >= 2"),
    (dict(eps=1.5), "eps must satisfy 0 <= eps < T"),
])
def test_errors(kwargs, message):
    sde = sde_lib.VPSDE(beta_max=5.0, N=10)
    with pytest.raises(ValueError, match=re.escape(message)):
        pc_sample(jax.random.key(0), sde, exact_score(sde), (2, 2), **kwargs)


def test_ancestral_on_subvp_is_an_error():
    sde = sde_lib.SubVPSDE(N=10)
    with pytest.raises(ValueError, match="SubVPSDE has neither.*reverse_diffusion"):
        pc_sample(jax.random.key(0), sde, exact_score(sde), (2, 2), predictor="ancestral")


@pytest.mark.parametrize("name", ["vp_cifar", "subvp_cifar", "ve_cifar", "ddpm_cifar"])
def test_paper_configs_end_with_score_sdes_noise_removal(name):
    """score_sde's PC sampler returns the last predictor's x_mean, from grid time eps with its
    predictor's update (Euler-Maruyama with dt = 1 / N; reverse diffusion and ancestral at level
    0): the paper configs' last grid step is that update, on Gaussian data's exact score."""
    import importlib

    from diffusion.experiment import sampling_settings
    from diffusion.sampling import pc_step_fn

    config = importlib.import_module(f"experiments.{name}").get_config()
    sde = sde_lib.get_sde(**config.sde)
    settings = sampling_settings(config.sampling)
    kwargs = settings.kwargs

    def score(x, t):
        alpha, sigma = sde.marginal_coeffs(t)
        return -x / (alpha**2 * S**2 + sigma**2)[:, None]

    one = pc_step_fn(sde, score, (4, 2), kwargs["predictor"], None, n_steps=sde.N,
                     eps=kwargs["eps"])
    t, dt = float(one.ts[-1]), float(one.dts[-1])
    assert t == pytest.approx(kwargs["eps"], rel=1e-6) and kwargs["denoise"]
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2)), jnp.float32)
    _, x_mean = one.step(jax.random.key(0), x, x, t, dt)
    s = np.asarray(score(x, jnp.full((4,), t)))
    x = np.asarray(x)
    if kwargs["predictor"] == "euler_maruyama":      # score_sde: x - [f - g^2 s] / N
        assert dt == pytest.approx(1.0 / sde.N, rel=1e-4)
        f, g = (np.asarray(v) for v in sde.sde(jnp.asarray(x), jnp.full((4,), t)))
        expected = x - (f - g[:, None] ** 2 * s) / sde.N
    elif kwargs["predictor"] == "reverse_diffusion":  # VE level 0: x + sigma_min^2 s
        expected = x + sde.sigma_min**2 * s
    else:                                # DDPM level 0: (x + beta_0 s) / sqrt(1 - beta_0)
        beta_0 = sde.beta_min / sde.N
        expected = (x + beta_0 * s) / np.sqrt(1.0 - beta_0)
    np.testing.assert_allclose(x_mean, expected, rtol=1e-5, atol=1e-7)
