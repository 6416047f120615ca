"""Losses at the exact score of Gaussian data equal their analytic minimum; wrong scores cost more.

Data x0 ~ N(mu, s^2 I). Under x_t = alpha x0 + sigma z the marginal is N(alpha mu, v I) with
v = alpha^2 s^2 + sigma^2, the exact score is -(x - alpha mu) / v, and per dimension
E[(sigma * score + z)^2] = alpha^2 s^2 / v: the irreducible part of the denoising loss.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params
from scipy import integrate

from diffusion import losses, models
from diffusion import sde as sde_lib

MU, S, D, B = 0.7, 0.5, 3, 40_000


def exact_score_model(sde, scale=1.0):
    """A score model with no parameters that returns (scale times) the exact score."""

    def score_model(params, x, t, *, y=None, train=False, rng=None):
        del params, y, train, rng
        alpha, sigma = sde.marginal_coeffs(t)
        v = alpha**2 * S**2 + sigma**2
        return -scale * (x - alpha[:, None] * MU) / v[:, None]

    return score_model


class IdealLevelNet(nn.Module):
    """The exact network output at the discrete level its conditioning names, for N(MU, S^2 I)
    data: DDPM's epsilon (given step index i) or SMLD's sigma-scaled score (given score_sde's
    descending label N - 1 - i). A wrong label from the score model gives the wrong level."""

    sde: Any
    kind: str          # "ddpm" | "smld"
    scale: float = 1.0

    @nn.compact
    def __call__(self, x, c_noise, y=None, train=False):
        label = jnp.round(c_noise).astype(jnp.int32)
        i = label if self.kind == "ddpm" else self.sde.N - 1 - label
        alpha, sigma = (c[:, None] for c in self.sde.discrete_coeffs(i))
        score = -self.scale * (x - alpha * MU) / (alpha**2 * S**2 + sigma**2)
        return -sigma * score if self.kind == "ddpm" else sigma * score


def discrete_score_model(sde, kind, scale=1.0):
    net = IdealLevelNet(sde, kind, scale)
    if kind == "ddpm":
        return models.make_score_model(net, sde, "epsilon", continuous=False)
    return models.make_score_model(net, sde, "score", scale_by_sigma=True, continuous=False)


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


@pytest.mark.parametrize("name", ["vpsde", "subvpsde", "vesde", "cosine_vpsde", "rectified_flow"])
def test_data_prediction_of_the_exact_score_is_the_posterior_mean(x64, name):
    """Tweedie: D = (x + sigma^2 s) / alpha at the exact score of N(MU, S^2 I) data is the
    posterior mean E[x_0 | x_t] = MU + alpha S^2 (x - alpha MU) / (alpha^2 S^2 + sigma^2); so is
    `denoised`, and (B,) or broadcast coefficients give the same array."""
    sde = sde_lib.get_sde(name)
    t = jnp.linspace(0.01, 0.95, 6, dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(0), (6, D), jnp.float64) * 2.0
    alpha, sigma = sde.marginal_coeffs(t)
    score = exact_score_model(sde)({}, x, t)
    d = sde_lib.data_prediction(x, score, alpha, sigma)
    v = (alpha**2 * S**2 + sigma**2)[:, None]
    np.testing.assert_allclose(d, MU + alpha[:, None] * S**2 * (x - alpha[:, None] * MU) / v,
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(d, sde_lib.data_prediction(x, score, alpha[:, None],
                                                              sigma[:, None]))
    at_half = sde_lib.denoised(sde, lambda x, t: exact_score_model(sde)({}, x, t), x, 0.5)
    a_half, s_half = (float(c[0]) for c in sde.marginal_coeffs(jnp.array([0.5])))
    np.testing.assert_allclose(
        at_half, MU + a_half * S**2 * (x - a_half * MU) / (a_half**2 * S**2 + s_half**2),
        rtol=1e-12, atol=1e-12)


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


def _check_exact_and_wrong(make_loss, sde, kind, expected, seed):
    """The exact network reaches `expected`; one 10% off costs more on the same noise (paired)."""
    data, key = batch(jax.random.key(seed)), jax.random.key(seed + 1)
    exact = make_loss(sde, discrete_score_model(sde, kind))({}, data, key)
    mean, se = mean_and_se(exact)
    assert abs(mean - expected) < 4 * se + 1e-4, (mean, expected, se)
    wrong = make_loss(sde, discrete_score_model(sde, kind, scale=1.1))({}, data, key)
    excess_mean, excess_se = mean_and_se(wrong - exact)
    assert excess_mean > 10 * excess_se, (excess_mean, excess_se)


def test_ddpm_loss_at_exact_discrete_epsilon():
    """At the exact epsilon, L_simple is the mean over levels of abar s^2 / (abar s^2 + 1 - abar)
    per dimension (Ho et al.'s loss of the ideal network)."""
    sde = sde_lib.VPSDE()
    a = np.asarray(sde.alphas_cumprod)
    _check_exact_and_wrong(losses.make_ddpm_loss, sde, "ddpm",
                           np.mean(a * S**2 / (a * S**2 + 1.0 - a)), seed=4)


def test_smld_loss_at_exact_discrete_score():
    sde = sde_lib.VESDE()
    sig = np.asarray(sde.discrete_sigmas)
    _check_exact_and_wrong(losses.make_smld_loss, sde, "smld",
                           0.5 * D * np.mean(S**2 / (S**2 + sig**2)), seed=6)


@pytest.mark.parametrize("sde_name", ["vpsde", "vesde"])
def test_discrete_losses_are_finite_at_every_level(sde_name):
    """A real network trained by the DDPM / SMLD loss on all N = 1000 levels, level 0 included
    (whose sigma(t = 0) would be 0 for the continuous VP SDE)."""
    sde = sde_lib.get_sde(sde_name)
    net = models.MLP(hidden=16, n_layers=2)
    score_model = (models.make_score_model(net, sde, "epsilon", continuous=False)
                   if sde_name == "vpsde" else
                   models.make_score_model(net, sde, "score", scale_by_sigma=True,
                                           continuous=False))
    x = {"x": MU + S * jax.random.normal(jax.random.key(10), (20_000, D))}
    params = random_params(net, x["x"][:2], jnp.ones((2,)), scale=0.3)
    keys = jax.random.split(jax.random.key(11), 20_000)
    loss_fn = losses.get_loss_fn(sde, score_model, continuous=False, reduce_mean=True)
    per_example = np.asarray(jax.jit(loss_fn)(params, x, keys))
    _, levels, _ = losses._draw_level(keys, x["x"], sde.N)     # the levels the loss used
    assert set(np.asarray(levels).tolist()) == set(range(sde.N))
    assert np.all(np.isfinite(per_example)), np.asarray(levels)[~np.isfinite(per_example)]
    grads = jax.grad(lambda p: jnp.mean(loss_fn(p, x, keys)))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


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
    with pytest.raises(ValueError, match="at_level"):   # a plain function has no levels
        losses.make_ddpm_loss(sde_lib.VPSDE(), exact_score_model(sde_lib.VPSDE()))
    with pytest.raises(ValueError, match="continuous"):
        losses.get_loss_fn(sde_lib.VPSDE(), None, continuous=False, likelihood_weighting=True)


def test_label_dropout_is_independent_of_the_noise_level():
    """Each example's label-dropout decision has its own key (`rng.LABEL_DROPOUT`). It once drew
    from fold_in(key, 1), which is split(key)[1], the key of the example's noise level: labels
    were then dropped exactly when u < p, i.e. only at the smallest times."""
    seen = {}

    def loss_fn(params, batch, keys):
        _, u, _ = losses._draw(keys, batch["x"])
        seen.update(label=np.asarray(batch["label"]), u=np.asarray(u))
        return u

    n = 8192
    batch = {"x": jnp.zeros((n, 1)), "label": jnp.zeros((n,), jnp.int32)}
    losses.with_label_dropout(loss_fn, 0.3, null_label=10)(None, batch, jax.random.key(0))
    dropped, u = seen["label"] == 10, seen["u"]
    for part in (u < 0.3, u >= 0.3):   # 4 standard errors: < 0.03 for these counts
        assert abs(np.mean(dropped[part]) - 0.3) < 0.03, np.mean(dropped[part])
