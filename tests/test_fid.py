"""FID, KID, Inception Score and streaming feature statistics, against closed forms (the
Inception network, its input pipeline and its weights are tested in test_inception.py).
"""

import jax
import numpy as np
import pytest
import scipy.linalg
from scipy.stats import norm

from diffusion.metrics import fid, inception


def _spd(rng, d, jitter=0.1):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + jitter * np.eye(d)


# --------------------------------------------------------------------------- frechet_distance


def test_frechet_distance_of_diagonal_gaussians_matches_closed_form():
    rng = np.random.default_rng(0)
    d = 64
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 2.0, d), rng.uniform(0.1, 2.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_non_commuting_covariances_matches_sqrtm():
    rng = np.random.default_rng(1)
    d = 32
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _spd(rng, d), _spd(rng, d)
    assert not np.allclose(s1 @ s2, s2 @ s1)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-6)
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-8 * np.trace(s1)


def test_frechet_distance_with_singular_covariances():
    """64-d covariances of 10 samples (rank 9): finite, non-negative, symmetric, and with
    sigma1 == sigma2 the squared mean difference, to 1e-10 of the trace (the nuclear-norm form
    takes no square roots of the ~55 zero eigenvalues, which would magnify their rounding
    errors to ~sqrt(eps) * lambda_max each)."""
    rng = np.random.default_rng(2)
    d = 64
    x, y = rng.normal(size=(10, d)), rng.normal(size=(10, d)) + 0.5
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    assert np.linalg.matrix_rank(s1) == 9
    mu1, mu2 = x.mean(0), y.mean(0)
    tol = 1e-10 * np.trace(s1)
    d12 = fid.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(d12) and d12 >= -1e-8
    assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(d12, rel=1e-6)
    same = fid.frechet_distance(mu1, s1, mu2, s1)
    assert same == pytest.approx(np.sum((mu1 - mu2) ** 2), abs=tol)
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < tol


def test_frechet_distance_rejects_mismatched_shapes():
    mu, s = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError):
        fid.frechet_distance(mu, s, np.zeros(5), np.eye(5))
    with pytest.raises(ValueError):
        fid.frechet_distance(mu, s, mu, np.eye(5))
    with pytest.raises(ValueError):
        fid.frechet_distance(mu, np.eye(4)[:3], mu, np.eye(4)[:3])


# --------------------------------------------------------------------------- kid


def _poly_mmd2_1d(x, y):
    """Unbiased MMD^2 of 1-d samples with k(u, v) = (u v + 1)^3 = sum_p c_p u^p v^p, in float64
    from power sums: sum_{i != j} u_i^p u_j^p = S_p^2 - S_2p."""
    c = (1.0, 3.0, 3.0, 1.0)
    n, m = len(x), len(y)
    sx = [np.sum(x ** p) for p in range(7)]
    sy = [np.sum(y ** p) for p in range(7)]
    kxx = sum(c[p] * (sx[p] ** 2 - sx[2 * p]) for p in range(4)) / (n * (n - 1))
    kyy = sum(c[p] * (sy[p] ** 2 - sy[2 * p]) for p in range(4)) / (m * (m - 1))
    kxy = sum(c[p] * sx[p] * sy[p] for p in range(4)) / (n * m)
    return kxx + kyy - 2.0 * kxy


def test_kid_of_1d_gaussians_matches_closed_form():
    """x ~ N(a, 1), y ~ N(b, 1), d = 1: E k = f(a, b) for independent draws, so
    MMD^2 = f(a, a) + f(b, b) - 2 f(a, b).

    The cubic kernel's heavy tails make random samples noisy (the 4000-sample MMD^2 has a
    standard deviation of about 11% here), so the samples are stratified instead: the normal
    quantiles at (i + 1/2) / n, shuffled. Their exact full-sample MMD^2 is within 0.5% of the
    closed form; KID's subset mean is unbiased for that full-sample value, with standard error
    std / sqrt(num_subsets) (the subsets are independent given the samples)."""
    def f(a, b):
        return 1 + 3 * a * b + 3 * (1 + a * a) * (1 + b * b) + (a ** 3 + 3 * a) * (b ** 3 + 3 * b)

    a, b, n, num_subsets = 0.0, 0.5, 4000, 100
    closed = f(a, a) + f(b, b) - 2 * f(a, b)                      # 3.578125
    rng = np.random.default_rng(3)
    q = norm.ppf((np.arange(n) + 0.5) / n)
    x, y = a + rng.permutation(q), b + rng.permutation(q)
    full = _poly_mmd2_1d(x, y)
    assert full == pytest.approx(closed, rel=0.01)
    mean, std = fid.kid(x[:, None], y[:, None], num_subsets=num_subsets, subset_size=500)
    se = std / np.sqrt(num_subsets)
    assert 0 < se < 0.05 * closed
    assert abs(mean - full) < 4 * se, (mean, full, se)
    assert abs(mean - closed) < 4 * se + 0.01 * closed


def test_kid_with_sets_no_larger_than_the_subset_is_the_exact_unbiased_mmd():
    """subset_size is capped at the set size; with equal sets every subset is a permutation of
    the whole sets, so each one gives the full-sample unbiased MMD^2 (computed here in float64)."""
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(40, 8)), rng.normal(size=(40, 8)) + 0.3

    def k(a, b):
        return (a @ b.T / 8 + 1.0) ** 3

    n = len(x)
    off = lambda m: (m.sum() - np.trace(m)) / (n * (n - 1))  # noqa: E731
    expected = off(k(x, x)) + off(k(y, y)) - 2 * k(x, y).mean()
    mean, std = fid.kid(x, y, num_subsets=10, subset_size=1000)
    assert mean == pytest.approx(expected, rel=1e-4)
    assert std < 1e-4 * abs(expected)
    mean, std = fid.kid(x, y[:25], num_subsets=10, subset_size=1000)   # capped at 25
    assert np.isfinite(mean) and std > 0


def test_kid_is_unbiased_for_one_distribution_and_positive_for_a_shift():
    """Two samples of one 64-d Gaussian: |mean| below 3 standard errors. The standard error has
    two parts: the subsets' std / sqrt(num_subsets) given the samples, and the full-sample
    estimate's own spread, about std * subset_size / n (the null MMD^2 varies as 1 / n^2)."""
    rng = np.random.default_rng(5)
    n, d, m, num_subsets = 2000, 64, 500, 100
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    mean, std = fid.kid(x, y, num_subsets=num_subsets, subset_size=m)
    se = std * np.sqrt(1 / num_subsets + (m / n) ** 2)
    assert abs(mean) < 3 * se, (mean, se)
    mean2, std2 = fid.kid(x, y, num_subsets=num_subsets, subset_size=m, key=jax.random.key(7))
    assert mean2 != mean
    assert abs(mean2 - mean) < 4 * np.sqrt(2) * std / np.sqrt(num_subsets)
    assert std2 == pytest.approx(std, rel=0.3)
    shifted, shifted_std = fid.kid(x, y + 0.2, num_subsets=num_subsets, subset_size=m)
    assert shifted > 20 * shifted_std / np.sqrt(num_subsets)
    assert shifted > 20 * abs(mean)


def test_kid_needs_two_features():
    x = np.zeros((5, 3))
    with pytest.raises(ValueError):
        fid.kid(x[:1], x)
    with pytest.raises(ValueError):
        fid.kid(x, x[:1])


# --------------------------------------------------------------------------- inception_score


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = fid.inception_score(np.zeros((20, 10)), num_splits=4)
    assert mean == pytest.approx(1.0, abs=1e-6)
    assert std == pytest.approx(0.0, abs=1e-6)


def test_inception_score_of_confident_balanced_predictions_is_the_class_count():
    k, per_split, splits = 8, 8, 5
    labels = np.arange(splits * per_split) % k                     # each split: every class once
    logits = 50.0 * np.eye(k)[labels]
    mean, std = fid.inception_score(logits, num_splits=splits)
    assert mean == pytest.approx(k, rel=1e-4)
    assert std < 1e-4 * k
    # Splits are consecutive rows: sorted by class, each split sees one class only.
    mean, std = fid.inception_score(logits[np.argsort(labels, kind="stable")], num_splits=k)
    assert mean == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_inception_score_matches_numpy(num_splits):
    rng = np.random.default_rng(6)
    logits = 3.0 * rng.normal(size=(103, 20))                      # 103: uneven splits
    scores = []
    for part in np.array_split(logits, num_splits):
        p = np.exp(part - part.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        kl = np.sum(p * (np.log(p) - np.log(p.mean(0, keepdims=True))), axis=1)
        scores.append(np.exp(kl.mean()))
    mean, std = fid.inception_score(logits, num_splits=num_splits)
    assert mean == pytest.approx(np.mean(scores), rel=1e-5)
    assert std == pytest.approx(np.std(scores), abs=1e-5 * np.mean(scores))
    if num_splits > 1:
        assert std > 0


def test_inception_score_rejects_fewer_samples_than_splits():
    with pytest.raises(ValueError):
        fid.inception_score(np.zeros((3, 10)), num_splits=4)


# --------------------------------------------------------------------------- FeatureStats


def _batches(rng, sizes, dim=16, classes=10):
    return [(rng.normal(0.5, 1.0, size=(b, dim)), rng.normal(size=(b, classes))) for b in sizes]


def test_feature_stats_streams_mean_cov_kept_features_and_logits():
    rng = np.random.default_rng(7)
    batches = _batches(rng, [7, 1, 12, 30])
    stats = fid.FeatureStats(dim=16, max_keep=10)
    for feats, logits in batches:
        stats.update(feats, logits)
    all_feats = np.concatenate([f for f, _ in batches])
    mean, cov = stats.mean_cov()
    assert stats.n == 50
    np.testing.assert_allclose(mean, all_feats.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(all_feats, rowvar=False), rtol=1e-10, atol=1e-12)
    assert stats.features.dtype == np.float32
    np.testing.assert_array_equal(stats.features, all_feats[:10].astype(np.float32))
    np.testing.assert_allclose(stats.logits, np.concatenate([g for _, g in batches]), rtol=1e-6)


def test_feature_stats_without_logits_or_data():
    stats = fid.FeatureStats(dim=16, max_keep=100)
    assert stats.logits is None
    assert stats.features.shape == (0, 16)
    stats.update(np.ones((1, 16)))
    with pytest.raises(ValueError):
        stats.mean_cov()                                           # needs 2 features
    stats.update(np.zeros((3, 16)))
    assert stats.features.shape == (4, 16) and stats.logits is None


def test_feature_stats_rejects_wrong_feature_shape():
    stats = fid.FeatureStats(dim=16)
    with pytest.raises(ValueError):
        stats.update(np.zeros((4, 15)))
    with pytest.raises(ValueError):
        stats.update(np.zeros(16))
    assert stats.n == 0


def test_feature_stats_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(8)
    batches = _batches(rng, [9, 14, 5])
    stats = fid.FeatureStats(dim=16, max_keep=20)
    for feats, logits in batches:
        stats.update(feats, logits)
    path = str(tmp_path / "sub" / "ref.npz")
    meta = {"dataset": "cifar10", "n": 28, "weights": "0123abcd"}
    stats.save(path, **meta)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["ref.npz"]
    loaded, loaded_meta = fid.FeatureStats.load(path)
    assert loaded_meta == meta
    assert loaded.n == stats.n and loaded.dim == 16
    for a, b in zip(loaded.mean_cov(), stats.mean_cov(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(loaded.features, stats.features)
    # Streaming on from the loaded statistics equals statistics of all the data.
    more = rng.normal(size=(6, 16))
    loaded.update(more)
    all_feats = np.concatenate([f for f, _ in batches] + [more])
    np.testing.assert_allclose(loaded.mean_cov()[1], np.cov(all_feats, rowvar=False),
                               rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- to_pixels


def test_to_pixels_rounds_and_clips():
    levels = np.arange(256)
    np.testing.assert_array_equal(fid.to_pixels(levels / 255.0), levels)
    np.testing.assert_array_equal(fid.to_pixels([-0.5, 0.0, 0.2 / 255, 0.7 / 255, 1.0, 1.5]),
                                  [0, 0, 0, 1, 255, 255])


# --------------------------------------------------------------------------- strict shapes


def test_inception_score_obeys_strict_rank_promotion():
    assert fid.inception_score(np.zeros((4, 3)), num_splits=2) == pytest.approx((1.0, 0.0))


# --------------------------------------------------------------------------- InceptionExtractor


def test_extractor_stats_regroups_uneven_batches_into_full_network_batches():
    """Sample batches of any size reach the network in full batches (only the last one short),
    and the statistics equal those of all images at once."""

    class Recording(fid.InceptionExtractor):
        def __init__(self):                  # no weights: features are a fixed projection
            self.batch_size, self.calls = 4, []
            self.proj = np.random.default_rng(0).normal(size=(3, inception.FEATURE_DIM))

        def __call__(self, images):
            self.calls.append(len(images))
            return images.reshape(len(images), -1)[:, :3] @ self.proj, None

    rng = np.random.default_rng(1)
    batches = [rng.uniform(0, 255, size=(n, 2, 2, 1)) for n in (3, 3, 1, 6, 2)]
    ext = Recording()
    stats = ext.stats(iter(batches))
    assert ext.calls == [4, 8, 3]   # whole multiples of the batch (split by __call__), then 3
    every = np.concatenate(batches)
    mean, cov = stats.mean_cov()
    ref = every.reshape(len(every), -1)[:, :3] @ ext.proj
    scale = np.abs(ref).max()                     # images pass through float32
    np.testing.assert_allclose(mean, ref.mean(0), atol=1e-6 * scale)
    np.testing.assert_allclose(cov, np.cov(ref, rowvar=False), atol=1e-6 * scale**2)
    np.testing.assert_allclose(stats.features, ref, atol=1e-6 * scale)
