"""Tests of diffusion/models/parameterization.py against the closed-form score of Gaussian data.

For data x_0 ~ N(0, s^2 I) and x_t = alpha x_0 + sigma z, x_t ~ N(0, v I) with
v = alpha^2 s^2 + sigma^2, and the ideal network outputs are

  score: -x_t / v,   epsilon: E[z | x_t] = sigma x_t / v,
  x0: D = E[x_0 | x_t] = alpha s^2 x_t / v,
  v: (alpha' D + sigma' E[z | x_t]) / sqrt(alpha'^2 + sigma'^2),
  edm: (D - c_skip x_t / alpha) / c_out with EDM's c_skip, c_out at sigma~ = sigma / alpha,
  consistency: (D - c_skip (alpha_b / alpha) x_t) / c_out with the consistency c_skip, c_out
  (the boundary b = 1e-5, the default boundary_time).

A fake network that returns these, computed from its own inputs (c_in x_t and c_noise) by the
conventions the module documents, must give back the exact score; a wrong c_in, c_noise or
output transform breaks the equality.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import models
from diffusion import sde as sde_lib
from diffusion.models import parameterization as param_lib

DATA_STD = 0.7
SDES = {
    "vp": sde_lib.VPSDE(),
    "subvp": sde_lib.SubVPSDE(),
    "cosine_vp": sde_lib.CosineVPSDE(),
    "ve": sde_lib.VESDE(),
    "rectified_flow": sde_lib.RectifiedFlow(),
}
SIGMA_DATA = 0.5   # the edm parameterization's s_d, deliberately not DATA_STD


def _expand(v, x):
    return v.reshape(v.shape + (1,) * (x.ndim - 1))


class GaussianIdealNet(nn.Module):
    """The ideal `parameterization` output for N(0, DATA_STD^2 I) data, conditioned on 999 t
    (on ln(sigma / alpha) / 4 and fed x_t / sqrt(sigma^2 + alpha^2 s_d^2) for "edm")."""

    sde: Any
    parameterization: str
    scale_input: bool

    @nn.compact
    def __call__(self, x_in, c_noise, y=None, train=False):
        edm = self.parameterization in ("edm", "consistency")
        t = self.sde.t_of_log_snr(-4.0 * c_noise) if edm else c_noise / 999.0
        alpha, sigma, d_alpha, d_sigma = self.sde.marginal_rates(t)
        if edm:
            c_in = 1.0 / jnp.sqrt(sigma**2 + alpha**2 * SIGMA_DATA**2)
        else:
            c_in = 1.0 / jnp.sqrt(alpha**2 + sigma**2) if self.scale_input else 1.0 + 0 * sigma
        x = x_in / _expand(c_in, x_in)
        alpha, sigma, d_alpha, d_sigma = (_expand(c, x) for c in (alpha, sigma, d_alpha, d_sigma))
        var = alpha**2 * DATA_STD**2 + sigma**2
        x0, z = alpha * DATA_STD**2 * x / var, sigma * x / var     # E[x_0 | x_t], E[z | x_t]
        sigma_tilde = sigma / alpha
        c_skip = SIGMA_DATA**2 / (sigma_tilde**2 + SIGMA_DATA**2)
        c_out = sigma_tilde * SIGMA_DATA / jnp.sqrt(sigma_tilde**2 + SIGMA_DATA**2)
        alpha_b, sigma_b = self.sde.marginal_coeffs(jnp.full(t.shape, 1e-5, t.dtype))
        gap = sigma_tilde - _expand(sigma_b / alpha_b, x)
        cm_skip = SIGMA_DATA**2 / (gap**2 + SIGMA_DATA**2) * _expand(alpha_b, x) / alpha
        cm_out = gap * SIGMA_DATA / jnp.sqrt(sigma_tilde**2 + SIGMA_DATA**2)
        ideal = {"score": lambda: -x / var, "epsilon": lambda: z, "x0": lambda: x0,
                 "v": lambda: (d_alpha * x0 + d_sigma * z) / jnp.hypot(d_alpha, d_sigma),
                 "edm": lambda: (x0 - c_skip * x / alpha) / c_out,
                 "consistency": lambda: (x0 - cm_skip * x) / cm_out}
        return ideal[self.parameterization]()


class Echo(nn.Module):
    """Returns what it was fed: its input x, or c_noise broadcast to x's shape."""

    what: str = "x"

    @nn.compact
    def __call__(self, x, c_noise, y=None, train=False):
        return x if self.what == "x" else jnp.broadcast_to(_expand(c_noise, x), x.shape)


class LabelsAndDropout(nn.Module):
    """Returns y broadcast to x's shape plus dropout(ones) (rate 1/2) when train=True."""

    @nn.compact
    def __call__(self, x, c_noise, y=None, train=False):
        noise = nn.Dropout(0.5)(jnp.ones_like(x), deterministic=not train)
        return _expand(y.astype(x.dtype), x) + noise


def _batch(shape=(6, 3, 2), t_min=0.05, dtype=jnp.float32):
    kx, kt = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, shape, dtype)
    t = jax.random.uniform(kt, (shape[0],), dtype, t_min, 0.99)   # the rectified flow's T
    return x, t


def _closed_form_score(sde, x, t):
    alpha, sigma = sde.marginal_coeffs(t)
    return -x / _expand(alpha**2 * DATA_STD**2 + sigma**2, x)


@pytest.mark.parametrize("scale_input", [True, False])
@pytest.mark.parametrize("parameterization", param_lib.PARAMETERIZATIONS)
@pytest.mark.parametrize("sde_name", list(SDES))
def test_ideal_network_gives_exact_gaussian_score(x64, sde_name, parameterization, scale_input):
    sde = SDES[sde_name]
    net = GaussianIdealNet(sde, parameterization, scale_input)
    if parameterization in ("edm", "consistency") and scale_input:
        with pytest.raises(ValueError, match="scales the network input itself"):
            models.make_score_model(net, sde, parameterization, "time", scale_input)
        return
    score_model = models.make_score_model(net, sde, parameterization, "time", scale_input,
                                          sigma_data=SIGMA_DATA)
    score_fn = models.score_fn_from_model(score_model, {})
    x, t = _batch(dtype=jnp.float64)
    expected = _closed_form_score(sde, x, t)
    np.testing.assert_allclose(score_fn(x, t), expected, rtol=1e-10)
    np.testing.assert_allclose(jax.jit(score_fn)(x, t), expected, rtol=1e-10)


@pytest.mark.parametrize("parameterization", param_lib.PARAMETERIZATIONS)
def test_ideal_network_float32(parameterization):
    """Real runs are float32; t >= 1e-3 as in sampling, on the VE SDE (smallest sigma).

    "x0" forms (alpha F - x) / sigma^2 from F ~ x / alpha, so it loses about
    eps_32 |x| / sigma^2 to cancellation (up to 4% of the score at t = 1e-3); the ideal "edm"
    output is itself such a difference, (D - c_skip x) / c_out with c_out ~ sigma, and loses the
    same. The tolerance allows that, and nothing more.
    """
    sde = SDES["ve"]
    scale_input = parameterization not in ("edm", "consistency")   # they have their own c_in
    score_model = models.make_score_model(GaussianIdealNet(sde, parameterization, scale_input),
                                          sde, parameterization, scale_input=scale_input,
                                          sigma_data=SIGMA_DATA)
    x, t = _batch(t_min=1e-3)
    expected = _closed_form_score(sde, x, t)
    sigma = _expand(sde.marginal_coeffs(t)[1], x)
    cancellation = 4 * np.finfo(np.float32).eps * np.abs(x) / sigma**2
    # edm, consistency: the ideal F = (D - c_skip x) / c_out
    cancels = parameterization in ("x0", "edm", "consistency")
    tolerance = 1e-5 * np.abs(expected) + (cancellation if cancels else 0.0)
    assert np.all(np.abs(score_model({}, x, t) - expected) <= tolerance)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_noise_conditioning(sde_name):
    sde = SDES[sde_name]
    x, t = _batch()
    _, sigma = sde.marginal_coeffs(t)
    expected = {"time": 999.0 * t, "log_sigma": jnp.log(sigma)}
    # "time" is DDPM's step index: t = 0 and 1 are steps 0 and 999 (score_sde's 999 t).
    np.testing.assert_array_equal(param_lib.time_conditioning(jnp.array([0.0, 0.5, 1.0])),
                                  [0.0, 499.5, 999.0])
    for noise_input in param_lib.NOISE_INPUTS:
        score_model = models.make_score_model(Echo("c_noise"), sde, "score", noise_input)
        fed = score_model({}, x, t)
        np.testing.assert_allclose(fed, jnp.broadcast_to(_expand(expected[noise_input], x),
                                                         x.shape), rtol=1e-6)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_input_scaling(sde_name):
    sde = SDES[sde_name]
    x, t = _batch()
    alpha, sigma = sde.marginal_coeffs(t)
    scaled = models.make_score_model(Echo("x"), sde, "score", scale_input=True)
    np.testing.assert_allclose(scaled({}, x, t), x / _expand(jnp.sqrt(alpha**2 + sigma**2), x),
                               rtol=1e-6)
    unscaled = models.make_score_model(Echo("x"), sde, "score", scale_input=False)
    np.testing.assert_array_equal(unscaled({}, x, t), x)


def test_labels_and_dropout_reach_the_network():
    sde = SDES["vp"]
    x, t = _batch((4, 3))
    y = jnp.array([0, 1, 2, 10])
    score_model = models.make_score_model(LabelsAndDropout(), sde, "score")
    eval_out = score_model({}, x, t, y=y)
    np.testing.assert_array_equal(eval_out, np.broadcast_to(_expand(y, x) + 1.0, x.shape))
    train_a = score_model({}, x, t, y=y, train=True, rng=jax.random.key(1))
    train_b = score_model({}, x, t, y=y, train=True, rng=jax.random.key(2))
    assert not np.array_equal(train_a, train_b)
    # The plain score_fn runs in evaluation mode, conditioned on its labels.
    np.testing.assert_array_equal(models.score_fn_from_model(score_model, {}, y=y)(x, t),
                                  eval_out)


def test_works_with_real_network_parameters():
    net = models.MLP(hidden=8, n_layers=1, embed_dim=4)
    x, t = _batch((3, 2))
    params = net.init(jax.random.key(0), x, t)["params"]
    score_model = models.make_score_model(net, SDES["vp"])
    assert score_model(params, x, t, train=True, rng=jax.random.key(1)).shape == x.shape


def test_unknown_names():
    sde = SDES["vp"]
    with pytest.raises(ValueError, match=r"parameterization 'velocity'.*\['score', 'epsilon', "
                                         r"'x0', 'v', 'edm', 'consistency'\]"):
        models.make_score_model(Echo(), sde, parameterization="velocity")
    with pytest.raises(ValueError, match=r"noise input 'sigma'.*\['time', 'log_sigma'\]"):
        models.make_score_model(Echo(), sde, noise_input="sigma")


def test_scale_by_sigma_and_centered_input():
    """score_sde's VE models: the network sees 2 x - 1 of [0, 1] data and its output, divided
    by sigma(t), is the score."""
    sde = SDES["ve"]
    x, t = _batch()
    _, sigma = sde.marginal_coeffs(t)
    model = models.make_score_model(Echo("x"), sde, "score", scale_by_sigma=True,
                                    center_input=True)
    np.testing.assert_allclose(model({}, x, t), (2 * x - 1) / _expand(sigma, x), rtol=1e-6)


def test_discrete_models_are_conditioned_on_score_sde_labels():
    """VP-type chains: level i is fed as the step index i (training) and time t as t (N - 1),
    with sigma of level floor(t (N - 1)) (sampling); VE: the descending label N - 1 - i, and at
    time t the label round((1 - t)(N - 1)) (score_sde's get_score_fn / DDPM and SMLD losses)."""
    x = jnp.ones((4, 2))
    i = jnp.array([0, 1, 500, 999])
    t = jnp.array([0.0, 0.3337, 0.5, 1.0])
    vp, ve = sde_lib.VPSDE(), sde_lib.VESDE()
    fed = lambda sde, **kw: models.make_score_model(Echo("c_noise"), sde, "score",
                                                    continuous=False, **kw)
    np.testing.assert_allclose(fed(vp).at_level({}, x, i)[:, 0], i)
    np.testing.assert_allclose(fed(vp)({}, x, t)[:, 0], 999.0 * t, rtol=1e-6)
    np.testing.assert_allclose(fed(ve).at_level({}, x, i)[:, 0], 999 - i)
    np.testing.assert_allclose(fed(ve)({}, x, t)[:, 0], np.round((1 - t) * 999))
    # The output scale is the level's sigma: sqrt(1 - bar-alpha_i) (VP), sigma_i (VE).
    abar = np.asarray(vp.alphas_cumprod)
    eps_model = models.make_score_model(Echo("x"), vp, "epsilon", continuous=False)
    np.testing.assert_allclose(eps_model.at_level({}, x, i)[:, 0], -1 / np.sqrt(1 - abar[i]),
                               rtol=1e-6)
    levels = np.floor(np.asarray(t) * 999).astype(int)
    np.testing.assert_allclose(eps_model({}, x, t)[:, 0], -1 / np.sqrt(1 - abar[levels]),
                               rtol=1e-6)
    ve_model = models.make_score_model(Echo("x"), ve, "score", scale_by_sigma=True,
                                       continuous=False)
    np.testing.assert_allclose(ve_model.at_level({}, x, i)[:, 0],
                               1 / np.asarray(ve.discrete_sigmas)[i], rtol=1e-6)


def test_invalid_combinations():
    sde = SDES["vp"]
    with pytest.raises(ValueError, match="scale_by_sigma.*parameterization='score'"):
        models.make_score_model(Echo(), sde, "epsilon", scale_by_sigma=True)
    with pytest.raises(ValueError, match="scale_input assumes data centred"):
        models.make_score_model(Echo(), sde, scale_input=True, center_input=True)
    with pytest.raises(ValueError, match="SubVPSDE has none"):
        models.make_score_model(Echo(), SDES["subvp"], continuous=False)
    for name in ("v", "edm"):
        with pytest.raises(ValueError, match=f"parameterization='{name}' is written on continuous"):
            models.make_score_model(Echo(), sde, name, continuous=False)
    with pytest.raises(ValueError, match="'edm' scales the network input itself"):
        models.make_score_model(Echo(), sde, "edm", center_input=True)
    with pytest.raises(ValueError, match="sigma_data .* must be positive"):
        models.make_score_model(Echo(), sde, "edm", sigma_data=0.0)


def test_velocity_output_is_salimans_and_ho_v_for_vp_and_z_minus_x0_for_the_flow():
    """The "v" network target (alpha' x_0 + sigma' z) / sqrt(alpha'^2 + sigma'^2) (module
    docstring): alpha z - sigma x_0 for every VP SDE, (z - x_0) / sqrt(2) for the rectified flow."""
    x0, z = jax.random.normal(jax.random.key(0), (2, 6, 3))
    _, t = _batch(shape=(6, 3))
    for name, sde in SDES.items():
        alpha, sigma, d_alpha, d_sigma = (_expand(c, x0) for c in sde.marginal_rates(t))
        target = (d_alpha * x0 + d_sigma * z) / jnp.hypot(d_alpha, d_sigma)
        if name in ("vp", "cosine_vp"):
            np.testing.assert_allclose(target, alpha * z - sigma * x0, rtol=2e-5, atol=2e-6)
        if name == "rectified_flow":
            np.testing.assert_allclose(target, (z - x0) / np.sqrt(2.0), rtol=1e-6, atol=1e-6)
