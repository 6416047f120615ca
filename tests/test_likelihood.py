"""Log-likelihoods through the probability-flow ODE against exact Gaussian-mixture densities.

With the exact score of a Gaussian mixture, `log_likelihood` must reproduce the exact log p_eps(x)
(`GaussianMixture.log_prob`): the only errors left are the ODE solver's and, with the SDE's prior
in place of the exact p_T, the prior mismatch, which is isolated by passing the exact p_T.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import likelihood
from diffusion import sde as sde_lib
from diffusion.gaussian_mixture import GaussianMixture

EPS = 1e-5
SDES = {"vp": sde_lib.VPSDE(), "subvp": sde_lib.SubVPSDE(), "ve": sde_lib.VESDE(),
        "cosine": sde_lib.CosineVPSDE()}


def exact_prior(mixture, sde):
    return lambda z: mixture.log_prob(z, jnp.full((z.shape[0],), sde.T, z.dtype), sde)


# Cosine (10 s each on 2 cores) runs with -m slow; its likelihood is also checked by the flows'
# and the seed tests.
@pytest.mark.parametrize("sde_name", [pytest.param(n, marks=pytest.mark.slow) if n == "cosine"
                                      else n for n in sorted(SDES)])
@pytest.mark.parametrize("dim", [2, 8])
def test_exact_divergence_matches_the_mixture_density(x64, sde_name, dim):
    sde = SDES[sde_name]
    mixture = (GaussianMixture.ring() if dim == 2
               else GaussianMixture.random(jax.random.key(dim), dim, n_components=3))
    x = mixture.sample(jax.random.key(1), 64, t=jnp.full((64,), EPS), sde=sde)
    logp, nfe = jax.jit(lambda x: likelihood.log_likelihood(
        jax.random.key(2), sde, mixture.score_fn(sde), x, divergence="exact", rtol=1e-6,
        atol=1e-6, eps=EPS, prior_logp=exact_prior(mixture, sde)))(x)
    exact = mixture.log_prob(x, jnp.full((64,), EPS), sde)
    assert float(jnp.mean(jnp.abs(logp - exact))) < 1e-3
    assert int(nfe) > 0


def test_float32_with_the_sde_prior_is_within_the_prior_mismatch():
    """In float32 at the default tolerances, with N(0, I) as the prior: the error is the prior's
    mismatch log N(x_T) - log p_T(x_T), small for a VP SDE at T = 1."""
    sde = SDES["vp"]
    mixture = GaussianMixture.ring()
    x = mixture.sample(jax.random.key(1), 256, t=jnp.full((256,), EPS), sde=sde)
    logp, _ = jax.jit(lambda x: likelihood.log_likelihood(
        jax.random.key(2), sde, mixture.score_fn(sde), x, divergence="exact", eps=EPS))(x)
    exact = mixture.log_prob(x, jnp.full((256,), EPS), sde)
    assert float(jnp.mean(jnp.abs(logp - exact))) < 0.05
    assert abs(float(jnp.mean(logp - exact))) < 0.01


def test_exact_divergence_is_the_jacobian_trace():
    fn = lambda x: jnp.stack([x[:, 0] * x[:, 1], jnp.sin(x[:, 1]) + x[:, 2] ** 2,  # noqa: E731
                              x[:, 0] * x[:, 2]], axis=1)
    x = jax.random.normal(jax.random.key(0), (5, 3))
    value, div = likelihood.exact_divergence(fn, x)
    per_example = jax.vmap(lambda xi: jnp.trace(jax.jacfwd(lambda y: fn(y[None])[0])(xi)))(x)
    np.testing.assert_allclose(value, fn(x), rtol=1e-6)
    np.testing.assert_allclose(div, per_example, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["hutchinson_gaussian", "hutchinson_rademacher"])
def test_hutchinson_estimate_is_unbiased(kind):
    """Mean of v^T J v over 20k probes = trace J (within 4 standard errors), J non-diagonal."""
    a = jax.random.normal(jax.random.key(0), (6, 6))
    fn = lambda x: x @ a.T  # noqa: E731
    x = jnp.zeros((20_000, 6))
    probe = likelihood._probe(jax.random.key(1), kind, x.shape, x.dtype)
    _, estimates = likelihood.hutchinson_divergence(fn, x, probe)
    standard_error = float(jnp.std(estimates)) / math.sqrt(len(estimates))
    assert abs(float(jnp.mean(estimates)) - float(jnp.trace(a))) < 4 * standard_error
    assert float(jnp.std(estimates)) > 0.1  # a real estimate, not the exact trace


def test_hutchinson_likelihood_is_unbiased_on_a_mixture():
    """Averaged over examples, the Hutchinson log-likelihood agrees with the exact one."""
    sde = SDES["subvp"]
    mixture = GaussianMixture.random(jax.random.key(4), 8, n_components=2)
    x = mixture.sample(jax.random.key(1), 2048, t=jnp.full((2048,), EPS), sde=sde)
    prior = exact_prior(mixture, sde)
    estimate, _ = jax.jit(lambda x: likelihood.log_likelihood(
        jax.random.key(2), sde, mixture.score_fn(sde), x, divergence="hutchinson_gaussian",
        eps=EPS, prior_logp=prior))(x)
    exact = mixture.log_prob(x, jnp.full((2048,), EPS), sde)
    error = estimate - exact
    standard_error = float(jnp.std(error)) / math.sqrt(len(error))
    assert abs(float(jnp.mean(error))) < 4 * standard_error + 1e-3


def test_bits_per_dim():
    # Uniform density on [-1, 1]^D is 8 bits/dim of 8-bit data; on [0, 1]^D likewise.
    d = 3 * 4 * 4
    logp = jnp.full((2,), -d * math.log(2.0))
    np.testing.assert_allclose(likelihood.bits_per_dim(logp, (4, 4, 3), offset=7.0), 8.0)
    np.testing.assert_allclose(likelihood.bits_per_dim(jnp.zeros((2,)), (4, 4, 3), offset=8.0),
                               8.0)


def test_unknown_divergence_is_a_clear_error():
    sde = SDES["vp"]
    with pytest.raises(ValueError, match="Unknown divergence 'hutch'"):
        likelihood.log_likelihood(jax.random.key(0), sde, lambda x, t: -x, jnp.zeros((2, 2)),
                                  divergence="hutch")
