"""Losses at the exact score of Gaussian data equal their analytic minimum; wrong scores cost more.

Data x0 ~ N(mu, s^2 I). Under x_t = alpha x0 + sigma z the marginal is N(alpha mu, v I) with
v = alpha^2 s^2 + sigma^2, the exact score is -(x - alpha mu) / v, and per dimension
E[(sigma * score + z)^2] = alpha^2 s^2 / v: the irreducible part of the denoising loss.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from diffusion import losses
from diffusion import sde as sde_lib

MU, S, D, B = 0.7, 0.5, 3, 40_000


def exact_score_model(sde, scale=1.0, discrete=None):
    """A score model with no parameters that returns (scale times) the exact score."""

    def score_model(params, x, t, *, y=None, train=False, rng=None):
        del params, y, train, rng
        if discrete is None:
            alpha, sigma = sde.marginal_coeffs(t)
        else:  # the discrete chain's level nearest t
            alpha, sigma = discrete(jnp.round(t * (sde.N - 1) / sde.T).astype(jnp.int32))
        v = alpha**2 * S**2 + sigma**2
        return -scale * (x - alpha[:, None] * MU) / v[:, None]

    return score_model


def batch(key):
    return {"x": MU + S * jax.random.normal(key, (B, D))}


def mean_and_se(per_example):
    per_example = np.asarray(per_example, np.float64)
    return per_example.mean(), per_example.std() / np.sqrt(len(per_example))


@pytest.mark.parametrize("name", ["vpsde", "subvpsde", "vesde", "cosine_vpsde"])
def test_dsm_loss_at_exact_score_equals_analytic_minimum(name):
    sde = sde_lib.get_sde(name)
    eps = 1e-5
    loss_fn = losses.make_dsm_loss(sde, exact_score_model(sde), reduce_mean=True, eps=eps)
    per_example = loss_fn({}, batch(jax.random.key(0)), jax.random.key(1))
    assert per_example.shape == (B,)

    def minimum(t):
        alpha, sigma = (float(c[0]) for c in sde.marginal_coeffs(jnp.array([t], jnp.float64)))
        return alpha**2 * S**2 / (alpha**2 * S**2 + sigma**2)

    with jax.enable_x64(True):
        expected = integrate.quad(minimum, eps, 1.0, limit=200)[0] / (1.0 - eps)
    mean, se = mean_and_se(per_example)
    assert abs(mean - expected) < 4 * se + 1e-4, (mean, expected, se)

    # A wrong score (10% too large) must cost measurably more on the same noise (paired).
    wrong = losses.make_dsm_loss(sde, exact_score_model(sde, 1.1), reduce_mean=True, eps=eps)
    excess = wrong({}, batch(jax.random.key(0)), jax.random.key(1)) - per_example
    excess_mean, excess_se = mean_and_se(excess)
    assert excess_mean > 10 * excess_se, (excess_mean, excess_se)


def test_dsm_likelihood_weighting_and_sum_reduction():
    sde = sde_lib.VPSDE()
    eps = 0.05  # keeps the g^2/sigma^2 weight and so the Monte Carlo variance moderate
    loss_fn = losses.make_dsm_loss(sde, exact_score_model(sde), reduce_mean=False,
                                   likelihood_weighting=True, eps=eps)
    mean, se = mean_and_se(loss_fn({}, batch(jax.random.key(2)), jax.random.key(3)))

    def minimum(t):
        t = jnp.array([t], jnp.float64)
        alpha, sigma = (float(c[0]) for c in sde.marginal_coeffs(t))
        g2 = float(sde.sde(jnp.zeros((1, 1)), t)[1][0]) ** 2
        return 0.5 * D * g2 / sigma**2 * alpha**2 * S**2 / (alpha**2 * S**2 + sigma**2)

    with jax.enable_x64(True):
        expected = integrate.quad(minimum, eps, 1.0)[0] / (1.0 - eps)
    assert abs(mean - expected) < 4 * se + 1e-3, (mean, expected, se)


def test_ddpm_loss_at_exact_discrete_score():
    sde = sde_lib.VPSDE()
    abar = jnp.asarray(sde.alphas_cumprod, jnp.float32)
    discrete = lambda i: (jnp.sqrt(abar[i]), jnp.sqrt(1.0 - abar[i]))
    loss_fn = losses.make_ddpm_loss(sde, exact_score_model(sde, discrete=discrete))
    mean, se = mean_and_se(loss_fn({}, batch(jax.random.key(4)), jax.random.key(5)))
    a = np.asarray(sde.alphas_cumprod)
    expected = np.mean(a * S**2 / (a * S**2 + 1.0 - a))
    assert abs(mean - expected) < 4 * se + 1e-4, (mean, expected, se)


def test_smld_loss_at_exact_discrete_score():
    sde = sde_lib.VESDE()
    sigmas = jnp.asarray(sde.discrete_sigmas, jnp.float32)
    discrete = lambda i: (jnp.ones_like(sigmas[i]), sigmas[i])
    loss_fn = losses.make_smld_loss(sde, exact_score_model(sde, discrete=discrete))
    mean, se = mean_and_se(loss_fn({}, batch(jax.random.key(6)), jax.random.key(7)))
    sig = np.asarray(sde.discrete_sigmas)
    expected = 0.5 * D * np.mean(S**2 / (S**2 + sig**2))
    assert abs(mean - expected) < 4 * se + 1e-4, (mean, expected, se)


def test_noise_depends_only_on_the_example_key():
    """Splitting a batch (as over devices) gives the same per-example losses."""
    sde = sde_lib.VPSDE()
    loss_fn = losses.make_dsm_loss(sde, exact_score_model(sde))
    x = {"x": jax.random.normal(jax.random.key(8), (8, D))}
    keys = jax.random.split(jax.random.key(9), 8)
    whole = loss_fn({}, x, keys)
    halves = jnp.concatenate([loss_fn({}, {"x": x["x"][:4]}, keys[:4]),
                              loss_fn({}, {"x": x["x"][4:]}, keys[4:])])
    np.testing.assert_allclose(whole, halves, rtol=1e-6)


def test_discrete_losses_reject_the_wrong_sde():
    with pytest.raises(ValueError, match="VP-type"):
        losses.make_ddpm_loss(sde_lib.VESDE(), exact_score_model(sde_lib.VESDE()))
    with pytest.raises(ValueError, match="VE SDE"):
        losses.make_smld_loss(sde_lib.VPSDE(), exact_score_model(sde_lib.VPSDE()))
    with pytest.raises(ValueError, match="continuous"):
        losses.get_loss_fn(sde_lib.VPSDE(), None, continuous=False, likelihood_weighting=True)
