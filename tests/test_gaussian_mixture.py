"""diffusion.gaussian_mixture against independent closed forms.

The references are written here from the mixture's fields alone: log-densities as a brute-force
sum of multivariate normals (numpy slogdet / solve on the explicit covariances
alpha^2 S_k + sigma^2 I), data drawn by numpy, the moments sum_k pi_k alpha mu_k and
alpha^2 Cov_0 + sigma^2 I, the score as jax.grad of log_prob, normalisation by quadrature on a
grid, and sampling against the forward process x_t = alpha x_0 + sigma z applied to data samples.

To keep the file fast on a small CPU, each jitted helper evaluates several SDEs in one program
(the SDEs are static), with the mixture passed as a pytree argument.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import data as data_lib
from diffusion import sde as sde_lib
from diffusion.gaussian_mixture import GaussianMixture

SDES = (sde_lib.VPSDE(), sde_lib.SubVPSDE(), sde_lib.VESDE(), sde_lib.CosineVPSDE())
TIMES = np.array([0.01, 0.3, 0.8])


def make(name):
    """The test mixtures, built inside a test so that their dtype follows the x64 fixture."""
    if name == "ring":
        return GaussianMixture.ring()
    if name == "random16":  # full covariances, well separated means
        return GaussianMixture.random(jax.random.PRNGKey(0), 16)
    if name == "diag3":  # axis-aligned, anisotropic: the rotation-free path
        variances = np.array([[0.1, 2.0, 0.5], [1.0, 0.2, 0.3], [0.4, 0.4, 1.5]])
        return GaussianMixture(jnp.asarray([0.2, 0.5, 0.3]),
                               jnp.asarray([[1.0, -1.0, 0.5], [-2.0, 0.0, 1.0], [0.0, 2.0, -1.5]]),
                               jnp.asarray(np.stack([np.diag(v) for v in variances])))
    raise ValueError(name)


@functools.partial(jax.jit, static_argnames=("sdes", "with_grad"))
def densities(gm, xs, ts, sdes, with_grad=True):
    """log_prob, score and jax.grad of log_prob (or None) for each (x, t, sde), stacked: (S, B),
    (S, B, D), (S, B, D) for xs (S, B, D), ts (S, B); sde None: the data density (t unused)."""
    out = []
    for x, t, sde in zip(xs, ts, sdes, strict=True):
        t = None if sde is None else t
        grad = jax.grad(lambda y, t=t, sde=sde: jnp.sum(gm.log_prob(y, t, sde)))(x) if with_grad \
            else jnp.zeros_like(x)
        out.append((gm.log_prob(x, t, sde), gm.score(x, t, sde), grad))
    logp, score, grad = (jnp.stack(v) for v in zip(*out, strict=True))
    return logp, score, grad if with_grad else None


@functools.partial(jax.jit, static_argnames="sdes")
def log_probs(gm, xs, ts, sdes):
    """log_prob for each (x, t, sde), stacked (S, B); sde None: the data density."""
    return jnp.stack([gm.log_prob(x, None if sde is None else t, sde)
                      for x, t, sde in zip(xs, ts, sdes, strict=True)])


@functools.partial(jax.jit, static_argnames=("n", "sdes"))
def samples(gm, key, n, ts, sdes):
    """n samples of p_t for each (t, sde), stacked (S, n, D), with independent keys; each t a
    scalar or (n,)."""
    keys = jax.random.split(key, len(sdes))
    return jnp.stack([gm.sample(k, n, None if sde is None else t, sde)
                      for k, t, sde in zip(keys, ts, sdes, strict=True)])


def coeffs(sde, t):
    """alpha(t), sigma(t) as float64 numpy, (B,); (1, 0) for sde None."""
    if sde is None:
        return np.ones(len(t)), np.zeros(len(t))
    alpha, sigma = sde.marginal_coeffs(jnp.asarray(t))
    return np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)


def numpy_data(gm, n, seed):
    """n data samples drawn by numpy from the fields (an independent sampler), (n, D)."""
    rng = np.random.default_rng(seed)
    w, mu, cov = (np.asarray(a, np.float64) for a in (gm.weights, gm.means, gm.covs))
    c = rng.choice(len(w), size=n, p=w / w.sum())
    z = rng.standard_normal((n, mu.shape[1]))
    return mu[c] + np.einsum("nij,nj->ni", np.linalg.cholesky(cov)[c], z)


def brute_force(gm, x, alpha, sigma):
    """log p and its score for p = sum_k pi_k N(alpha mu_k, C_k = alpha^2 S_k + sigma^2 I), one
    example at a time (numpy): log-densities from slogdet / solve, the score as
    sum_k r_k (-C_k^{-1} (x - alpha mu_k)); (B,) and (B, D)."""
    w, mu, cov = (np.asarray(a, np.float64) for a in (gm.weights, gm.means, gm.covs))
    x = np.asarray(x, np.float64)
    d = x.shape[1]
    logp, score = [], []
    for xb, a, s in zip(x, alpha, sigma, strict=True):
        terms, grads = [], []
        for k in range(len(w)):
            c = a**2 * cov[k] + s**2 * np.eye(d)
            diff = xb - a * mu[k]
            _, logdet = np.linalg.slogdet(c)
            solved = np.linalg.solve(c, diff)
            terms.append(math.log(w[k]) - 0.5 * (d * math.log(2 * math.pi) + logdet
                                                 + diff @ solved))
            grads.append(-solved)
        terms = np.array(terms)
        top = terms.max()
        logp.append(top + math.log(np.exp(terms - top).sum()))
        score.append(np.exp(terms - logp[-1]) @ np.array(grads))
    return np.array(logp), np.array(score)


def exact_moments(gm, alpha=1.0, sigma=0.0):
    """Mean and covariance of the mixture's marginal, from the fields (numpy)."""
    w, mu, cov = (np.asarray(a, np.float64) for a in (gm.weights, gm.means, gm.covs))
    mean = w @ mu
    second = np.einsum("k,kde->de", w, cov + mu[:, :, None] * mu[:, None, :])
    cov0 = second - np.outer(mean, mean)
    return alpha * mean, alpha**2 * cov0 + sigma**2 * np.eye(len(mean))


def points(gm, sdes, seed, per_time=12):
    """For each sde, points x_t = alpha x_0 + sigma z at each of TIMES (numpy data x_0), plus a few
    pushed far out; (S, B, D) and times (S, B)."""
    t = np.concatenate([np.repeat(TIMES, per_time), TIMES])
    xs = []
    for i, sde in enumerate(sdes):
        alpha, sigma = coeffs(sde, t)
        x0 = numpy_data(gm, len(t), seed + i)
        z = np.random.default_rng(seed + 100 + i).standard_normal(x0.shape)
        x = alpha[:, None] * x0 + sigma[:, None] * z
        x[-len(TIMES):] *= 4.0
        xs.append(x)
    dtype = gm.means.dtype
    return jnp.asarray(np.stack(xs), dtype), jnp.asarray(np.stack([t] * len(sdes)), dtype)


# ----------------------------------------------------------------------- score and density


@pytest.mark.parametrize("name", ["ring", "random16"])
def test_score_and_log_prob_closed_forms(x64, name):
    """For the data and each SDE at several t: the score is jax.grad of log_prob and the
    brute-force score, and log_prob is the brute-force sum of multivariate normal densities."""
    gm, sdes = make(name), (None, *SDES)
    xs, ts = points(gm, sdes, seed=1)
    logp, score, grad = densities(gm, xs, ts, sdes)
    assert logp.dtype == score.dtype == jnp.float64 and score.shape == xs.shape
    for i, sde in enumerate(sdes):
        label = type(sde).__name__
        np.testing.assert_allclose(score[i], grad[i], rtol=1e-9, atol=1e-9, err_msg=label)
        ref_logp, ref_score = brute_force(gm, xs[i], *coeffs(sde, ts[i]))
        np.testing.assert_allclose(logp[i], ref_logp, rtol=1e-12, err_msg=label)
        np.testing.assert_allclose(score[i], ref_score, rtol=1e-9, atol=1e-9, err_msg=label)


def test_diagonal_path_equals_rotated_path(x64):
    """Rotating an axis-aligned mixture by an orthogonal R (full covariances, general path):
    log p_R(R x) = log p(x) and score_R(R x) = R score(x) at every t (the latter checked
    against the brute-force density above)."""
    gm, sdes = make("diag3"), (None, SDES[0], SDES[2])
    r = jnp.asarray(np.linalg.qr(np.random.default_rng(7).standard_normal((3, 3)))[0])
    rotated = GaussianMixture(gm.weights, gm.means @ r.T,
                              jnp.einsum("de,kef,gf->kdg", r, gm.covs, r))
    assert gm.diagonal and gm.eigvecs is None and not rotated.diagonal
    xs, ts = points(gm, sdes, seed=8)
    logp, score, _ = densities(gm, xs, ts, sdes, with_grad=False)
    logp_r, score_r, _ = densities(rotated, xs @ r.T, ts, sdes, with_grad=False)
    np.testing.assert_allclose(logp_r, logp, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(score_r, score @ r.T, rtol=1e-10, atol=1e-10)


def test_float32_jit_and_pytree():
    """float32 in, float32 out, close to the float64 references; score_fn jitted with the mixture
    closed over equals the score with it as a jit argument; the large case (B = 10,000, D = 64,
    K = 8) runs and stays finite."""
    sde = SDES[0]
    gm = GaussianMixture.random(jax.random.PRNGKey(3), 8)
    assert gm.means.dtype == jnp.float32 and not gm.diagonal
    xs, ts = points(gm, (sde,), seed=4)
    logp, score, _ = densities(gm, xs, ts, (sde,), with_grad=False)
    assert xs.dtype == logp.dtype == score.dtype == jnp.float32
    ref_logp, ref_score = brute_force(gm, xs[0], *coeffs(sde, np.asarray(ts[0], np.float64)))
    np.testing.assert_allclose(logp[0], ref_logp, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(score[0], ref_score, rtol=1e-4,
                               atol=1e-4 * np.abs(ref_score).max())
    closed_over = jax.jit(gm.score_fn(sde))(xs[0], ts[0])
    np.testing.assert_allclose(closed_over, score[0], rtol=1e-5, atol=1e-5)

    big, n = GaussianMixture.random(jax.random.PRNGKey(5), 64, n_components=8), 10_000
    x = jnp.asarray(2.0 * np.random.default_rng(6).standard_normal((n, 64)), jnp.float32)
    t = jnp.linspace(1e-3, 1.0, n)
    logp, score = jax.jit(lambda g, x, t: (g.log_prob(x, t, sde), g.score(x, t, sde)))(big, x, t)
    assert logp.shape == (n,) and score.shape == (n, 64) and score.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logp))) and bool(jnp.all(jnp.isfinite(score)))


def test_densities_integrate_to_one(x64):
    """The 2-D ring (data, VP at t = 0.5, VE at t = 0.2) and a 1-D mixture, summed on a grid."""
    ring, step, sdes = GaussianMixture.ring(), 0.05, (None, SDES[0], SDES[2])
    axis = np.arange(-7.0, 7.0 + step / 2, step)
    grid = np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2)
    ts = np.array([0.0, 0.5, 0.2])[:, None] * np.ones(len(grid))
    mass = np.sum(np.exp(log_probs(ring, jnp.asarray(np.stack([grid] * 3)), ts, sdes)), 1)
    np.testing.assert_allclose(mass * step**2, 1.0, rtol=0, atol=1e-6)

    line, step, sdes = GaussianMixture.random(jax.random.PRNGKey(10), 1, 3, 2.0), 0.01, (
        None, SDES[1], SDES[3])
    grid = np.arange(-15.0, 15.0, step)[:, None]
    ts = np.array([0.0, 0.6, 0.3])[:, None] * np.ones(len(grid))
    mass = np.sum(np.exp(log_probs(line, jnp.asarray(np.stack([grid] * 3)), ts, sdes)), 1)
    np.testing.assert_allclose(mass * step, 1.0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["ring", "random16"])
def test_marginal_at_T_is_the_prior(x64, name):
    """log p_T is within a small gap of the prior's log-density on prior samples (second order in
    alpha(T) mu for the centred ring, first order for the random mixture, whose mean is not 0),
    whereas at t = 0.3 it is far from it."""
    gm, n = make(name), 256
    zs = jnp.stack([sde.prior_sampling(jax.random.PRNGKey(11), (n, gm.dim)) for sde in SDES])
    zs = jnp.concatenate([zs, zs], axis=1)
    ts = jnp.concatenate([jnp.ones((len(SDES), n)), jnp.full((len(SDES), n), 0.3)], axis=1)
    logp = log_probs(gm, zs, ts, SDES)
    tol = 1e-3 if name == "ring" else 0.05
    for i, sde in enumerate(SDES):
        gap = np.abs(np.asarray(logp[i]) - np.asarray(sde.prior_logp(zs[i])))
        assert gap[:n].mean() < tol and gap[:n].max() < 10 * tol, type(sde).__name__
        assert gap[n:].mean() > 0.3, type(sde).__name__


# ----------------------------------------------------------------------- samples


def _assert_moments(x, mean, cov, z=5.0):
    """Sample mean and covariance of x (n, D) within z standard errors of mean and cov."""
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    se_mean = x.std(0) / math.sqrt(n)
    assert np.all(np.abs(x.mean(0) - mean) < z * se_mean), np.abs(x.mean(0) - mean) / se_mean
    c = x - x.mean(0)
    products = c[:, :, None] * c[:, None, :]
    se_cov = products.std(0) / math.sqrt(n)
    err = np.abs(products.mean(0) - cov)
    assert np.all(err < z * se_cov), np.max(err / se_cov)


def _check_moments(gm, x, t, sde):
    """`moments` and the moments of samples x of p_t against the closed form."""
    alpha, sigma = (c[0] for c in coeffs(sde, np.array([t])))
    mean, cov = exact_moments(gm, alpha, sigma)
    got_mean, got_cov = gm.moments(None if sde is None else t, sde)
    np.testing.assert_allclose(got_mean, mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_cov, cov, rtol=1e-12, atol=1e-12)
    _assert_moments(x, mean, cov)


N_SAMPLES = 20_000
RANDOM16_CASES = ((0.0, None), (0.2, SDES[0]), (0.5, SDES[1]), (0.4, SDES[2]), (0.6, SDES[3]))


@pytest.fixture(scope="module")
def random16_samples():
    """N_SAMPLES samples of the random 16-D mixture for each of RANDOM16_CASES (float64 numpy)."""
    with jax.enable_x64(True):
        gm = make("random16")
        times, sdes = zip(*RANDOM16_CASES, strict=True)
        ts = np.array(times)[:, None] * np.ones(N_SAMPLES)
        return np.asarray(samples(gm, jax.random.PRNGKey(12), N_SAMPLES, ts, sdes))


def test_random16_samples_have_exact_moments(x64, random16_samples):
    """Mean and covariance of 20k samples of p_0 and of p_t under each SDE, and `moments`."""
    gm = make("random16")
    assert random16_samples.shape == (len(RANDOM16_CASES), N_SAMPLES, 16)
    for x, (t, sde) in zip(random16_samples, RANDOM16_CASES, strict=True):
        _check_moments(gm, x, t, sde)


def test_samples_equal_forward_process_of_data(x64, random16_samples):
    """sample(t) and alpha x_0 + sigma z for data samples x_0 agree in mean, covariance and the
    mean of log p_t (a statistic of every moment), up to two-sample errors (VP and VE)."""
    gm, n = make("random16"), N_SAMPLES
    x0 = random16_samples[0]
    noise = np.random.default_rng(14).standard_normal((n, gm.dim))
    pairs, sdes, ts = [], [], []
    for i in (1, 3):
        t, sde = RANDOM16_CASES[i]
        alpha, sigma = coeffs(sde, np.full(n, t))
        pushed, direct = alpha[:, None] * x0 + sigma[:, None] * noise, random16_samples[i]
        se = np.sqrt((pushed.var(0) + direct.var(0)) / n)
        assert np.all(np.abs(pushed.mean(0) - direct.mean(0)) < 5 * se)
        ca, cb = pushed - pushed.mean(0), direct - direct.mean(0)
        pa, pb = ca[:, :, None] * ca[:, None, :], cb[:, :, None] * cb[:, None, :]
        se = np.sqrt((pa.var(0) + pb.var(0)) / n)
        assert np.all(np.abs(pa.mean(0) - pb.mean(0)) < 5 * se)
        pairs += [pushed, direct]
        sdes += [sde, sde]
        ts += [np.full(n, t)] * 2
    logp = np.asarray(log_probs(gm, jnp.asarray(np.stack(pairs)), np.stack(ts), tuple(sdes)))
    for la, lb in [(logp[0], logp[1]), (logp[2], logp[3])]:
        assert abs(la.mean() - lb.mean()) < 5 * math.sqrt((la.var() + lb.var()) / n)


def test_ring_samples_times_keys_and_marginal(x64):
    """Moments of ring samples (diagonal path) with no t, a scalar t and a vector t; samples are
    deterministic in the key; `marginal` gives alpha mu_k and alpha^2 lam_k + sigma^2."""
    gm, n, sdes = GaussianMixture.ring(), N_SAMPLES, (None, SDES[0], SDES[2])
    ts = (None, jnp.asarray(0.05), np.full(n, 0.4))
    key = jax.random.PRNGKey(15)
    x = samples(gm, key, n, ts, sdes)
    for xi, t, sde in zip(x, (0.0, 0.05, 0.4), sdes, strict=True):
        _check_moments(gm, xi, t, sde)
    np.testing.assert_array_equal(samples(gm, key, n, ts, sdes), x)
    assert not np.any(np.asarray(samples(gm, jax.random.PRNGKey(16), n, ts, sdes) == x))
    means, variances = gm.marginal(SDES[0], jnp.array([0.0, 0.5]))
    assert means.shape == variances.shape == (2, 8, 2)
    alpha, sigma = coeffs(SDES[0], np.array([0.0, 0.5]))
    np.testing.assert_allclose(means[1], alpha[1] * gm.means, rtol=1e-12)
    np.testing.assert_allclose(variances[1], alpha[1] ** 2 * gm.eigvals + sigma[1] ** 2,
                               rtol=1e-12)
    np.testing.assert_allclose(variances[0], gm.eigvals, rtol=1e-12)


# ----------------------------------------------------------------------- construction


def test_ring_random_and_isotropic():
    with jax.enable_x64(True):
        gm = GaussianMixture.ring()
        weights, means, covs = data_lib.gmm_params()  # the "gmm" toy dataset
        np.testing.assert_array_equal(gm.weights, weights)
        np.testing.assert_array_equal(gm.means, means)
        np.testing.assert_array_equal(gm.covs, covs)
        assert gm.diagonal and gm.eigvecs is None and gm.dim == 2
        wide = GaussianMixture.ring(n_components=5, radius=3.0, std=0.5, dim=4)
        assert wide.means.shape == (5, 4) and np.all(np.asarray(wide.means[:, 2:]) == 0)
        np.testing.assert_allclose(np.linalg.norm(wide.means, axis=1), 3.0, rtol=1e-12)
    iso = GaussianMixture.isotropic(jnp.array([0.25, 0.75]), jnp.zeros((2, 3)), jnp.array([1., 2.]))
    np.testing.assert_array_equal(iso.covs[1], 4.0 * np.eye(3))
    random = GaussianMixture.random(jax.random.PRNGKey(16), 5, n_components=3, min_eig=0.2)
    again = GaussianMixture.random(jax.random.PRNGKey(16), 5, n_components=3, min_eig=0.2)
    other = GaussianMixture.random(jax.random.PRNGKey(17), 5, n_components=3, min_eig=0.2)
    np.testing.assert_array_equal(random.covs, again.covs)
    assert not np.array_equal(random.covs, other.covs) and not random.diagonal
    eig = np.linalg.eigvalsh(np.asarray(random.covs, np.float64))
    assert eig.min() >= 0.2 - 1e-5 and eig.max() <= 1.0 + 1e-5


def test_validation_errors():
    w, mu, cov = np.array([0.5, 0.5]), np.zeros((2, 3)), np.stack([np.eye(3)] * 2)

    def changed(a, index, value):
        a = a.copy()
        a[index] = value
        return a

    with pytest.raises(ValueError, match=r"weights must have shape \(K,\)"):
        GaussianMixture(w[None], mu, cov)
    with pytest.raises(ValueError, match=r"means must have shape \(K, D\) = \(2, D\)"):
        GaussianMixture(w, np.zeros((3, 3)), cov)
    with pytest.raises(ValueError, match=r"covs must have shape \(K, D, D\) = \(2, 3, 3\)"):
        GaussianMixture(w, mu, np.stack([np.eye(2)] * 2))
    with pytest.raises(ValueError, match="weights must sum to 1"):
        GaussianMixture(np.array([0.5, 0.6]), mu, cov)
    with pytest.raises(ValueError, match="non-negative"):
        GaussianMixture(np.array([1.5, -0.5]), mu, cov)
    with pytest.raises(ValueError, match="symmetric; component 1"):
        GaussianMixture(w, mu, changed(cov, (1, 0, 2), 0.5))
    with pytest.raises(ValueError, match="positive definite; component 0"):
        GaussianMixture(w, mu, changed(cov, (0, 2, 2), 0.0))
    with pytest.raises(ValueError, match="positive definite"):  # symmetric, indefinite, full
        GaussianMixture(w, mu, changed(cov, (0, [0, 1], [1, 0]), 2.0))
    with pytest.raises(ValueError, match="finite"):
        GaussianMixture(w, changed(mu, (0, 0), np.nan), cov)
    with pytest.raises(ValueError, match="std must be positive"):
        GaussianMixture.isotropic(w, mu, np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="dim >= 2"):
        GaussianMixture.ring(dim=1)
    gm = GaussianMixture(w, mu, cov)
    with pytest.raises(ValueError, match=r"x must have shape \(B, D\) with D = 3"):
        gm.log_prob(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="needs the sde"):
        gm.score(np.zeros((4, 3)), np.ones(4))
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(4,\)"):
        gm.log_prob(np.zeros((4, 3)), np.ones(3), SDES[0])
