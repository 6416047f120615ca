"""FID, KID, Inception Score, streaming feature statistics and the Inception input pipeline and
weight conversion, against closed forms (the Inception network itself is not run here; see
test_inception.py).
"""

import functools

import jax
import jax.numpy as jnp
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


# --------------------------------------------------------------------------- TF1 bilinear resize


@pytest.mark.parametrize("n_in,n_out", [(8, 299), (32, 299), (299, 299), (512, 299), (300, 299)])
def test_tf1_resize_matrix_rows_are_convex_weights(n_in, n_out):
    m = inception._tf1_resize_matrix(n_in, n_out)
    assert m.shape == (n_out, n_in)
    assert np.all(m >= 0)
    np.testing.assert_allclose(m.sum(1), 1.0, rtol=1e-6)
    assert np.all(np.count_nonzero(m, axis=1) <= 2)
    if n_in == n_out:
        np.testing.assert_array_equal(m, np.eye(n_in))


def test_tf1_resize_matrix_hand_example():
    """2 -> 4: sources s = 0, 0.5, 1, 1.5; the last clamps to the border."""
    expected = [[1, 0], [0.5, 0.5], [0, 1], [0, 1]]
    np.testing.assert_array_equal(inception._tf1_resize_matrix(2, 4), expected)
    # 4 -> 2 samples s = 0, 2 (no averaging, no half-pixel offset).
    np.testing.assert_array_equal(inception._tf1_resize_matrix(4, 2), [[1, 0, 0, 0],
                                                                       [0, 0, 1, 0]])


def test_tf1_resize_bilinear_constant_identity_and_ramps():
    const = jnp.full((2, 8, 12, 3), 37.0)
    np.testing.assert_allclose(inception.tf1_resize_bilinear(const), 37.0, rtol=1e-6)
    same = jax.random.uniform(jax.random.key(0), (1, 299, 299, 3))
    np.testing.assert_array_equal(inception.tf1_resize_bilinear(same), same)
    # value(row, col) = 10 row + col on a 5 x 8 image: bilinear reproduces the linear ramp at
    # s = o * n_in / 299, clamped at the last pixel.
    rows, cols = np.arange(5.0), np.arange(8.0)
    image = (10 * rows[:, None] + cols[None, :])[None, :, :, None]
    out = np.asarray(inception.tf1_resize_bilinear(jnp.asarray(image, jnp.float32)))
    o = np.arange(299)
    expected = 10 * np.minimum(o * 5 / 299, 4)[:, None] + np.minimum(o * 8 / 299, 7)[None, :]
    assert out.shape == (1, 299, 299, 1)
    np.testing.assert_allclose(out[0, :, :, 0], expected, rtol=1e-6, atol=1e-5)


# --------------------------------------------------------------------------- preprocess


def test_preprocess_grayscale_range_and_bad_shape():
    gray = jax.random.randint(jax.random.key(1), (2, 16, 16, 1), 0, 256).astype(jnp.float32)
    out = inception.preprocess(gray)
    assert out.shape == (2, 299, 299, 3)
    np.testing.assert_array_equal(out, inception.preprocess(jnp.repeat(gray, 3, axis=-1)))
    extremes = jnp.concatenate([jnp.zeros((1, 8, 8, 3)), jnp.full((1, 8, 8, 3), 255.0)])
    out = np.asarray(inception.preprocess(extremes))
    np.testing.assert_allclose(out[0], -1.0, atol=1e-6)
    np.testing.assert_allclose(out[1], 127.0 / 128.0, atol=1e-6)
    with pytest.raises(ValueError):
        inception.preprocess(jnp.zeros((2, 16, 16, 2)))
    with pytest.raises(ValueError):
        inception.preprocess(jnp.zeros((16, 16, 3)))


# --------------------------------------------------------------------------- weight conversion

LAYER = "mixed.tower.conv_1"                                       # a 5 x 5 conv, 48 -> 64


@functools.lru_cache(maxsize=1)
def _param_shapes():
    """{"mixed.tower.conv": (kh, kw, I, O), ...} of the Flax network, traced, not run."""
    tree = jax.eval_shape(inception.InceptionV3().init, jax.random.key(0),
                          jnp.zeros((1, 299, 299, 3)))["params"]
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(k.key for k in path[:-1]): leaf.shape
            for path, leaf in flat if path[-1].key == "kernel"}


def _fake_state_dict(rng):
    """A torch-layout state dict of the right shapes: zeros except the layer LAYER."""
    state = {}
    for module, (kh, kw, i, o) in _param_shapes().items():
        prefix = f"net.layers.{module}."
        state[prefix + "weight"] = np.zeros((o, i, kh, kw), np.float32)
        state[prefix + "beta"] = np.zeros(o, np.float32)
        state[prefix + "mean"] = np.zeros(o, np.float32)
        state[prefix + "var"] = np.ones(o, np.float32)
        if module == LAYER:
            state[prefix + "weight"] = rng.normal(size=(o, i, kh, kw)).astype(np.float32)
            state[prefix + "beta"] = rng.normal(size=o).astype(np.float32)
            state[prefix + "mean"] = rng.normal(size=o).astype(np.float32)
            state[prefix + "var"] = rng.uniform(0.01, 2.0, o).astype(np.float32)
    return state


def test_params_from_state_dict_folds_batch_norm_and_transposes():
    rng = np.random.default_rng(9)
    state = _fake_state_dict(rng)
    assert len(state) == 4 * 94
    assert _param_shapes()[LAYER] == (5, 5, 48, 64)
    w_out = rng.normal(size=(inception.NUM_LOGITS, inception.FEATURE_DIM)).astype(np.float32)
    state["output.weight"] = w_out
    state["output.bias"] = np.ones(inception.NUM_LOGITS, np.float32)
    params = inception.params_from_state_dict(state)

    p = f"net.layers.{LAYER}."
    w, m, v, b = (state[p + k].astype(np.float64) for k in ("weight", "mean", "var", "beta"))
    scale = 1.0 / np.sqrt(v + 1e-3)
    node = params["net"]["mixed"]["tower"]["conv_1"]
    assert node["kernel"].shape == (5, 5, 48, 64)
    np.testing.assert_allclose(node["kernel"], np.transpose(w, (2, 3, 1, 0)) * scale, rtol=1e-6)
    np.testing.assert_allclose(node["bias"], b - m * scale, rtol=1e-6, atol=1e-6)
    other = params["net"]["mixed_10"]["tower_1_conv_1"]
    np.testing.assert_array_equal(other["bias"], 0.0)
    assert other["kernel"].shape == (3, 3, 448, 384)
    assert params["logits"].shape == (2048, 1008)
    np.testing.assert_array_equal(params["logits"], w_out.T)
    # The exports' "net." / "layers." prefixes are optional; no classifier, no logits.
    bare = {k.removeprefix("net.layers."): val for k, val in state.items()
            if not k.startswith("output.")}
    params2 = inception.params_from_state_dict(bare)
    assert "logits" not in params2
    np.testing.assert_array_equal(params2["net"]["mixed"]["tower"]["conv_1"]["kernel"],
                                  node["kernel"])


def test_params_from_state_dict_missing_key_names_the_module():
    state = _fake_state_dict(np.random.default_rng(10))
    del state[f"net.layers.{LAYER}.var"]
    with pytest.raises(ValueError, match=r"mixed\.tower\.conv_1 lacks \['var'\]"):
        inception.params_from_state_dict(state)


def test_params_from_state_dict_rejects_a_missing_layer():
    state = _fake_state_dict(np.random.default_rng(11))
    for k in ("weight", "beta", "mean", "var"):
        del state[f"net.layers.mixed_10.conv.{k}"]
    with pytest.raises(ValueError, match="do not fit"):
        inception.params_from_state_dict(state)


# --------------------------------------------------------------------------- strict shapes


def test_inception_score_obeys_strict_rank_promotion():
    assert fid.inception_score(np.zeros((4, 3)), num_splits=2) == pytest.approx((1.0, 0.0))


def test_inception_network_obeys_strict_rank_promotion():
    out = jax.eval_shape(inception.ConvBN(4).init_with_output, jax.random.key(0),
                         jnp.zeros((1, 8, 8, 3)))[0]
    assert out.shape == (1, 8, 8, 4)


def test_params_from_state_dict_names_a_wrongly_shaped_layer():
    state = _fake_state_dict(np.random.default_rng(12))
    state["net.layers.conv.weight"] = np.zeros((32, 3, 5, 5), np.float32)   # 3 x 3 expected
    with pytest.raises(ValueError, match="do not fit") as err:
        inception.params_from_state_dict(state)
    assert "188 arrays, 188 expected" in str(err.value)
    assert "['conv']['kernel']" in str(err.value)


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
