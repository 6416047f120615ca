"""The probability-flow ODE sampler, its latent map and its NFE count, against closed forms.

For Gaussian data N(0, s^2 I) the ODE is linear and x(t) = x(T) sqrt(v(t) / v(T)) exactly,
v = alpha^2 s^2 + sigma^2 (see test_solvers.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import likelihood, sampling
from diffusion import sde as sde_lib
from diffusion.gaussian_mixture import GaussianMixture

S0 = 0.5
EPS = 1e-3
SDES = {"vp": sde_lib.VPSDE(), "subvp": sde_lib.SubVPSDE(), "ve": sde_lib.VESDE(),
        "cosine": sde_lib.CosineVPSDE()}


def variance(sde, t):
    alpha, sigma = sde.marginal_coeffs(t)
    return alpha**2 * S0**2 + sigma**2


@pytest.mark.parametrize("sde_name", sorted(SDES))
@pytest.mark.parametrize("method", ["tsit5", "dopri5"])
def test_ode_sample_is_the_exact_flow_of_gaussian_data(sde_name, method, x64):
    """In float64: each example has its own steps, and at rtol = atol = 1e-6 a float32 example
    of small norm sits near rounding level, where an embedded error estimate can come out far
    too small (measured: one of 256 float32 examples 6.6e-4 off after 6 steps)."""
    sde = SDES[sde_name]
    score = lambda x, t: -x / variance(sde, t)[:, None]  # noqa: E731
    x, nfe, z = jax.jit(lambda k: sampling.ode_sample(
        k, sde, score, (256, 3), rtol=1e-6, atol=1e-6, eps=EPS, method=method,
        return_latent=True))(jax.random.key(0))
    v = variance(sde, jnp.asarray([sde.T, EPS]))
    np.testing.assert_allclose(x, z * jnp.sqrt(v[1] / v[0]), rtol=1e-4, atol=1e-6)
    assert 10 < int(nfe) < 1000


def test_encode_decode_round_trip_on_a_mixture(x64):
    """decode(encode(x)) = x for the nonlinear flow of a 2-D Gaussian mixture, and the latents of
    mixture samples are distributed as the prior N(0, I) (moments)."""
    sde = SDES["vp"]
    mixture = GaussianMixture.ring()
    score_fn = mixture.score_fn(sde)
    x = mixture.sample(jax.random.key(0), 4000, t=jnp.full((4000,), EPS), sde=sde)
    tol = dict(rtol=1e-8, atol=1e-8, eps=EPS)
    z, nfe_encode = jax.jit(lambda x: sampling.encode(sde, score_fn, x, **tol))(x)
    x_back, nfe_decode = jax.jit(lambda z: sampling.decode(sde, score_fn, z, **tol))(z)
    np.testing.assert_allclose(x_back, x, atol=1e-5)
    assert int(nfe_encode) > 0 and int(nfe_decode) > 0
    np.testing.assert_allclose(jnp.mean(z, axis=0), 0.0, atol=0.07)      # ~4 standard errors
    np.testing.assert_allclose(jnp.cov(z.T), np.eye(2), atol=0.1)
    # Decoding a given latent is what ode_sample does with z=...
    x_sampled, _ = jax.jit(lambda z: sampling.ode_sample(None, sde, score_fn, z.shape, z=z,
                                                         **tol))(z)
    np.testing.assert_allclose(x_sampled, x_back, atol=1e-9)


def test_nfe_is_counted_exactly():
    """NFE = 6 * attempted steps + 2 equals the calls of score_fn in the compiled solve, with
    rejected steps (a stiff mixture of narrow components at loose and tight tolerances)."""
    sde = SDES["ve"]
    mixture = GaussianMixture.isotropic(jnp.asarray([0.5, 0.5]), jnp.asarray([[-1.0], [1.0]]),
                                        0.02)
    calls = []

    def counting_score(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return mixture.score(x, t, sde)

    for tol in (1e-3, 1e-6):
        calls.clear()
        x, nfe = jax.jit(lambda k: sampling.ode_sample(k, sde, counting_score, (8, 1),
                                                       rtol=tol, atol=tol, eps=EPS))(  # noqa: B023
            jax.random.key(0))
        jax.block_until_ready(x)
        jax.effects_barrier()
        assert len(calls) == int(nfe), (tol, len(calls), int(nfe))


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_noise_removal_is_score_sdes_reverse_diffusion_step(sde_name):
    """score_sde's ODE sampler ends with one noise-free reverse-diffusion step at eps (its
    `denoise_update_fn`): x (2 - sqrt(1 - beta_0)) + beta_0 s for VP, beta_0 = beta_min / N, and
    x + sigma_min^2 s for VE; "tweedie" is (x + sigma(eps)^2 s) / alpha(eps) instead, 10% larger
    a correction for VP."""
    sde = SDES[sde_name]
    score = lambda x, t: -x / variance(sde, t)[:, None]  # noqa: E731
    x = jax.random.normal(jax.random.key(0), (64, 2))
    removed = sampling.ode.remove_noise(sde, score, x, EPS)   # ode_sample's last step
    tweedie = sampling.ode.remove_noise(sde, score, x, EPS, "tweedie")
    s = -x / float(variance(sde, jnp.asarray([EPS]))[0])
    if sde_name == "vp":
        beta_0 = sde.beta_min / sde.N
        expected = x * (2.0 - np.sqrt(1.0 - beta_0)) + beta_0 * s
    else:
        expected = x + sde.sigma_min**2 * s
    np.testing.assert_allclose(removed, expected, rtol=1e-6, atol=1e-7)
    alpha, sigma = (float(c[0]) for c in sde.marginal_coeffs(jnp.asarray([EPS])))
    np.testing.assert_allclose(tweedie, (x + sigma**2 * s) / alpha, rtol=1e-6, atol=1e-7)
    if sde_name == "vp":   # the two corrections differ by sigma^2 / (alpha beta_0) = 1.0995
        ratio = np.linalg.norm(tweedie - x) / np.linalg.norm(removed - x)
        assert 1.09 < ratio < 1.11


def test_ode_sample_ends_with_the_noise_removal_step():
    sde = SDES["vp"]
    score = lambda x, t: -x / variance(sde, t)[:, None]  # noqa: E731
    x, nfe = sampling.ode_sample(jax.random.key(0), sde, score, (64, 2), eps=EPS)
    removed, nfe_removed = sampling.ode_sample(jax.random.key(0), sde, score, (64, 2), eps=EPS,
                                               denoise=True)
    np.testing.assert_allclose(removed, sampling.ode.remove_noise(sde, score, x, EPS),
                               rtol=1e-6, atol=1e-7)
    assert int(nfe_removed) == int(nfe) + 1


def test_unknown_denoiser_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown denoiser 'ddim'"):
        sampling.ode_sample(jax.random.key(0), SDES["vp"], lambda x, t: -x, (2, 1),
                            denoise=True, denoiser="ddim")


def test_unknown_solver_is_a_clear_error():
    sde = SDES["vp"]
    with pytest.raises(ValueError, match="Unknown ODE solver 'rk4'"):
        sampling.ode_sample(jax.random.key(0), sde, lambda x, t: -x, (2, 1), method="rk4")


def test_ode_sample_jits_with_static_shape():
    sde = SDES["subvp"]
    score = lambda x, t: -x / variance(sde, t)[:, None]  # noqa: E731
    fn = jax.jit(lambda key: sampling.ode_sample(key, sde, score, (16, 2)))
    x, nfe = fn(jax.random.key(1))
    assert x.shape == (16, 2) and np.all(np.isfinite(x)) and int(nfe) > 0


def _nan_score(x, t):
    return jnp.full_like(x, jnp.nan)


def _stiff_score(x, t):
    return -1e6 * x


# Every entry point with a stiff score in the default suite; with a NaN score (which also
# exhausts max_steps), and encode / decode, in the slow set (each call compiles a solve).
@pytest.mark.parametrize("score, entry_points", [
    (_stiff_score, ("ode_sample", "log_likelihood")),
    pytest.param(_nan_score, ("ode_sample", "encode", "decode", "log_likelihood"),
                 marks=pytest.mark.slow),
    pytest.param(_stiff_score, ("encode", "decode"), marks=pytest.mark.slow)])
def test_a_failed_solve_raises_instead_of_returning_nans(score, entry_points):
    sde = SDES["vp"]
    cause, steps = (("maximum number of solver steps", 20) if score is _stiff_score
                    else ("the vector field was not finite", 0))   # stops at once
    calls = {
        "ode_sample": lambda: sampling.ode_sample(jax.random.key(0), sde, score, (4, 2),
                                                  max_steps=20),
        "encode": lambda: sampling.encode(sde, score, jnp.ones((4, 2)), max_steps=20),
        "decode": lambda: sampling.decode(sde, score, jnp.ones((4, 2)), max_steps=20),
        "log_likelihood": lambda: likelihood.log_likelihood(
            jax.random.key(0), sde, score, jnp.ones((4, 2)), divergence="exact", max_steps=20),
    }
    for name in entry_points:
        call = calls[name]
        with pytest.raises(sampling.ODESolverError,
                           match=f"failed for 4 of 4 examples \\(example 0 after {steps} "
                           f"steps\\)"
                           f".*{cause}.*loosen them or raise max_steps \\(now 20\\)"):
            call()
            pytest.fail(f"{name} returned instead of raising")


def test_a_failed_solve_under_jit_is_nan_not_numbers():
    sde = SDES["vp"]
    fn = jax.jit(lambda key: sampling.ode_sample(key, sde, _stiff_score, (4, 2), max_steps=20))
    x, nfe = fn(jax.random.key(0))
    assert np.all(np.isnan(x)) and int(nfe) == 6 * 20 + 2


def test_a_score_closing_over_per_example_data(x64):
    """The network runs on the whole batch at each example's own time, so a score that closes
    over per-example data (the labels of a conditional model, a task's known pixels) works:
    Gaussian data N(mu_b, s^2 I) with a mean per example, whose flow is exact."""
    sde = SDES["vp"]
    mu = jnp.asarray(np.random.default_rng(0).normal(size=(6, 2)))

    def score(x, t):
        alpha = sde.marginal_coeffs(t)[0][:, None]
        return -(x - alpha * mu) / variance(sde, t)[:, None]

    x, _, z = jax.jit(lambda k: sampling.ode_sample(k, sde, score, (6, 2), rtol=1e-8, atol=1e-8,
                                                    eps=EPS, return_latent=True))(
        jax.random.key(0))
    (a_T, a_eps), _ = sde.marginal_coeffs(jnp.asarray([sde.T, EPS]))
    v = variance(sde, jnp.asarray([sde.T, EPS]))
    np.testing.assert_allclose(x, a_eps * mu + (z - a_T * mu) * jnp.sqrt(v[1] / v[0]),
                               rtol=1e-6, atol=1e-7)
