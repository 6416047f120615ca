"""Multistep consistency sampling (`sampling.consistency_sample`) against closed forms.

For Gaussian data x_0 ~ N(MU, S^2 I) the probability-flow ODE's flow map to the data is affine:
f(x_t, t) = MU + (x_t - a MU) S / sqrt(a^2 S^2 + s^2), with a, s = alpha(t), sigma(t) (it maps
the marginal N(a MU, a^2 S^2 + s^2) onto N(MU, S^2) monotonically, hence is the ODE's map). As a
score, (a f - x) / s^2, its denoiser is f itself, so the sampler's output law is known exactly:
every step is an affine map of a Gaussian plus fresh Gaussian noise.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import sampling, train
from diffusion import sde as sde_lib

MU, S, DIM, N = 0.7, 0.5, 2, 20_000

PROCESSES = {"vp": sde_lib.VPSDE(), "ve": sde_lib.VESDE(sigma_min=0.01, sigma_max=20.0),
             "flow": sde_lib.RectifiedFlow()}


def coeffs(sde, t):
    a, s = sde.marginal_coeffs(np.asarray([t], np.float64))
    return float(np.asarray(a)[0]), float(np.asarray(s)[0])


def flow_map_score(sde):
    """The score whose denoiser is the exact flow map f of N(MU, S^2) data."""

    def score_fn(x, t):
        a, s = (c[:, None] for c in sde.marginal_coeffs(t))
        f = MU + (x - a * MU) * S / jnp.sqrt(a**2 * S**2 + s**2)
        return (a * f - x) / s**2

    return score_fn


def law_of_samples(sde, times):
    """Mean and variance (per dimension) of consistency_sample's output with the exact map: the
    prior N(0, p^2), then f, then for each further time re-noise and f again."""
    a_T, s_T = coeffs(sde, times[0])
    prior_var = {sde_lib.VPSDE: lambda: 1.0, sde_lib.VESDE: lambda: sde.sigma_max**2,
                 sde_lib.RectifiedFlow: lambda: sde.T**2}[type(sde)]()
    k = S / math.sqrt(a_T**2 * S**2 + s_T**2)
    mean, var = MU - k * a_T * MU, k**2 * prior_var
    for t in times[1:]:
        a, s = coeffs(sde, t)
        k = S / math.sqrt(a**2 * S**2 + s**2)
        mean, var = MU + k * (a * mean - a * MU), k**2 * (a**2 * var + s**2)
    return mean, var


@pytest.mark.parametrize("name", list(PROCESSES))
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_consistency_sampling_with_the_exact_flow_map(name, steps):
    """The samples' mean and variance equal the law of the algorithm (one affine map per step,
    fresh noise at each re-noising) within 4 standard errors, and that law is the data's
    N(MU, S^2) up to the prior's mismatch with the marginal at T (at most 0.013 in the mean: VE's
    N(0, sigma_max^2) prior against N(MU, S^2 + sigma_max^2); below 2e-3 in the variance after
    the first re-noising). nfe = number of times."""
    sde = PROCESSES[name]
    times = (sde.T, 0.5 * sde.T, 0.1 * sde.T)[:steps]
    x, nfe = jax.jit(lambda k: sampling.consistency_sample(k, sde, flow_map_score(sde),
                                                           (N, DIM), times=times))(
        jax.random.key(1))
    assert nfe == steps
    x = np.asarray(x, np.float64)
    mean, var = law_of_samples(sde, times)
    se_mean, se_var = math.sqrt(var / (N * DIM)), var * math.sqrt(2.0 / (N * DIM))
    assert abs(x.mean() - mean) < 4 * se_mean
    assert abs(x.var() - var) < 4 * se_var + 1e-6
    assert abs(mean - MU) < 0.02 and abs(var - S**2) < 0.01
    if steps > 1:
        assert abs(var - S**2) < 2e-3


def test_the_denoiser_of_a_diffusion_models_score_gives_the_posterior_mean():
    """With a diffusion model's score (Tweedie's denoiser), one step returns E[x_0 | x_T]: for
    N(MU, S^2) data under the VP SDE, nearly the constant MU (variance k^2 << S^2), which is why
    consistency sampling needs a consistency model."""
    sde = sde_lib.VPSDE()

    def score_fn(x, t):
        a, s = (c[:, None] for c in sde.marginal_coeffs(t))
        return -(x - a * MU) / (a**2 * S**2 + s**2)

    x, _ = sampling.consistency_sample(jax.random.key(0), sde, score_fn, (4000, DIM))
    a, s = coeffs(sde, sde.T)
    k = a * S**2 / (a**2 * S**2 + s**2)        # E[x_0 | x] = MU + k (x - a MU)
    np.testing.assert_allclose(np.var(np.asarray(x)), k**2, rtol=0.1)
    assert np.var(np.asarray(x)) < 1e-3 * S**2


def test_a_sample_depends_on_its_own_key_only():
    """Sample b's prior draw and re-noising come from its key: the first 4 samples of a batch
    of 8 equal a batch of 4 drawn with the same keys."""
    sde = PROCESSES["vp"]
    keys = jax.random.split(jax.random.key(3), 8)
    run = lambda k, n: sampling.consistency_sample(k, sde, flow_map_score(sde), (n, DIM),
                                                   times=(1.0, 0.4))[0]
    np.testing.assert_allclose(run(keys[:4], 4), run(keys, 8)[:4], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("times, message", [
    ((0.5,), r"starts from the prior at T = 1\.0"),
    ((1.0, 0.5, 0.6), r"decrease strictly and stay above 0"),
    ((1.0, 0.0), r"decrease strictly and stay above 0"),
])
def test_bad_times_are_one_clear_error(times, message):
    sde = PROCESSES["vp"]
    with pytest.raises(ValueError, match=message):
        sampling.consistency_sample(jax.random.key(0), sde, flow_map_score(sde), (2, DIM),
                                    times=times)


def test_consistency_sampling_from_the_config(smoke_run):
    """sampling.method="consistency" with sampling.times="1.0,0.3": two evaluations, finite
    samples of the data's shape (toy_2d:smoke, a diffusion model: the sampler runs on any)."""
    config, workdir = smoke_run("toy_2d")
    config.sampling.method, config.sampling.times = "consistency", "1.0,0.3"
    path = train.sample(config, workdir)
    with np.load(path) as f:
        samples, nfe = f["samples"], int(f["nfe"])
    assert nfe == 2 and samples.shape == (config.sampling.num_samples, 2)
    assert np.all(np.isfinite(samples))
