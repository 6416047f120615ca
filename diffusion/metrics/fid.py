"""FID, KID and Inception Score, and streaming Inception statistics of image sets.

    stats = fid.FeatureStats()
    for images in batches:                      # (B, H, W, C) in [0, 255]
        stats.update(*extractor(images))        # extractor = fid.InceptionExtractor()
    d = fid.frechet_distance(*stats.mean_cov(), *ref.mean_cov())
    kid_mean, kid_std = fid.kid(stats.features, ref.features)
    is_mean, is_std = fid.inception_score(stats.logits)

Definitions follow the papers and the reference implementations the published numbers came from:
FID (Heusel et al. 2017): |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) of the Inception pool_3
features; KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over random subsets; IS (Salimans et al. 2016):
exp(E_x KL(p(y|x) || p(y))), averaged over splits.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import files
from diffusion.metrics import inception, inception_weights
from diffusion.parallel import to_host

Array = jax.Array


# --------------------------------------------------------------------------- the measures


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2); FID when given Inception stats.

    Computed in float64 on the host. The trace of the matrix square root uses
    tr (S1 S2)^(1/2) = tr (A S2 A)^(1/2) = tr ((B A)^T (B A))^(1/2) = ||B A||_* with
    A = S1^(1/2), B = S2^(1/2) (symmetric roots from eigendecompositions): the sum of singular
    values of B A. No complex parts and no diagonal jitter, as a general `sqrtm` needs on
    singular covariances (fewer samples than dimensions), and no square roots of the near-zero
    eigenvalues that magnify rounding errors.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"frechet_distance: shapes differ: mu {mu1.shape} / {mu2.shape}, "
                         f"sigma {s1.shape} / {s2.shape}.")
    tr_covmean = np.sum(np.linalg.svd(_psd_sqrt(s2) @ _psd_sqrt(s1), compute_uv=False))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _poly_mmd2(x: Array, y: Array) -> Array:
    """Unbiased MMD^2 of two equal-size sets with k(a, b) = (a.b / d + 1)^3."""
    d = x.shape[1]
    hp = jax.lax.Precision.HIGHEST
    kernel = lambda a, b: (jnp.dot(a, b.T, precision=hp) / d + 1.0) ** 3
    m = x.shape[0]
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    off_diag = lambda k: (jnp.sum(k) - jnp.trace(k)) / (m * (m - 1))
    return off_diag(kxx) + off_diag(kyy) - 2.0 * jnp.mean(kxy)


@functools.partial(jax.jit, static_argnames=("num_subsets", "subset_size"))
def _kid_subsets(key, x, y, num_subsets: int, subset_size: int) -> Array:
    def one(k):
        kx, ky = jax.random.split(k)
        ix = jax.random.permutation(kx, x.shape[0])[:subset_size]
        iy = jax.random.permutation(ky, y.shape[0])[:subset_size]
        return _poly_mmd2(x[ix], y[iy])

    return jax.lax.map(one, jax.random.split(key, num_subsets))


def kid(feats1, feats2, num_subsets: int = 100, subset_size: int = 1000,
        key: Array | None = None) -> tuple[float, float]:
    """Kernel Inception Distance: mean and standard deviation over `num_subsets` subsets.

    Each subset draws `subset_size` rows of each set without replacement (capped at the smaller
    set's size) and takes the unbiased MMD^2 estimate, so the mean is unbiased for the squared
    MMD (near 0, possibly negative, for two samples of one distribution). Key None: a fixed key.
    """
    x, y = jnp.asarray(feats1, jnp.float32), jnp.asarray(feats2, jnp.float32)
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 features in each set; got {x.shape[0]} and "
                         f"{y.shape[0]}.")
    key = jax.random.key(0) if key is None else key
    values = np.asarray(_kid_subsets(key, x, y, num_subsets, m), np.float64)
    return float(values.mean()), float(values.std())


def inception_score(logits, num_splits: int = 10) -> tuple[float, float]:
    """Inception Score exp(E KL(p(y|x) || p(y))) of `logits` (N, classes): mean and std over splits.

    The N rows are cut into `num_splits` consecutive parts (as the original code does); p(y) is
    each part's mean prediction.
    """
    logits = jnp.asarray(logits, jnp.float32)
    n = logits.shape[0]
    if n < num_splits:
        raise ValueError(f"inception_score: {n} samples cannot be cut into {num_splits} splits.")
    scores = []
    for part in np.array_split(np.arange(n), num_splits):
        logp = jax.nn.log_softmax(logits[part[0]:part[-1] + 1], axis=-1)
        log_py = jax.nn.logsumexp(logp, axis=0, keepdims=True) - np.log(len(part))
        kl = jnp.sum(jnp.exp(logp) * (logp - log_py), axis=-1)
        scores.append(float(jnp.exp(jnp.mean(kl))))
    return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------- streaming statistics


class FeatureStats:
    """Running mean and covariance (float64) of features, plus up to `max_keep` of them for KID
    and every row of logits for the Inception Score. Memory is O(d^2 + max_keep d), not O(N d)."""

    def __init__(self, dim: int = inception.FEATURE_DIM, max_keep: int = 10_000):
        self.dim, self.max_keep = dim, max_keep
        self.n = 0
        self._sum = np.zeros(dim, np.float64)
        self._outer = np.zeros((dim, dim), np.float64)
        self._kept: list[np.ndarray] = []
        self._logits: list[np.ndarray] = []

    def update(self, feats, logits=None) -> None:
        f = np.asarray(feats, np.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"FeatureStats: features must be (N, {self.dim}); got {f.shape}.")
        self.n += len(f)
        self._sum += f.sum(axis=0)
        self._outer += f.T @ f
        room = self.max_keep - sum(len(k) for k in self._kept)
        if room > 0:
            self._kept.append(np.asarray(feats[:room], np.float32))
        if logits is not None:
            self._logits.append(np.asarray(logits, np.float32))

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance (divides by N - 1, as numpy's `cov` and TTUR do)."""
        if self.n < 2:
            raise ValueError(f"FeatureStats: need at least 2 features, have {self.n}.")
        mean = self._sum / self.n
        cov = (self._outer - self.n * np.outer(mean, mean)) / (self.n - 1)
        return mean, cov

    @property
    def features(self) -> np.ndarray:
        return np.concatenate(self._kept) if self._kept else np.zeros((0, self.dim), np.float32)

    @property
    def logits(self) -> np.ndarray | None:
        return np.concatenate(self._logits) if self._logits else None

    def save(self, path: str, **meta) -> None:
        """Atomically writes mean, covariance, kept features and `meta` (JSON) to `path` (.npz)."""
        mean, cov = self.mean_cov()
        files.atomic_savez(path, mu=mean, sigma=cov, n=self.n, features=self.features,
                           meta=json.dumps(meta, sort_keys=True))

    @classmethod
    def load(cls, path: str) -> tuple[FeatureStats, dict]:
        with np.load(path) as f:
            mean, cov, n = f["mu"], f["sigma"], int(f["n"])
            stats = cls(dim=mean.shape[0], max_keep=len(f["features"]))
            stats.n = n
            stats._sum = mean * n
            stats._outer = cov * (n - 1) + n * np.outer(mean, mean)
            stats._kept = [f["features"]]
            meta = json.loads(str(f["meta"]))
        return stats, meta


# --------------------------------------------------------------------------- image sets -> stats


def to_pixels(images01) -> np.ndarray:
    """[0, 1] images -> [0, 255] floats quantised to 8 bits, as saved PNGs would be."""
    return np.round(np.clip(np.asarray(images01, np.float32), 0.0, 1.0) * 255.0)


def weights_fingerprint(path: str) -> str:
    """A short hash of the converted weights, so statistics from other weights are not reused."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


class InceptionExtractor:
    """Calls the Inception network on batches of any size with one compiled batch shape.

    images (B, H, W, C) in [0, 255] -> (pool (B, 2048), logits (B, 1008) or None) as numpy. Each
    batch is padded to `batch_size` (and split if larger), and split over the devices of
    `sharding` if given. That sharding may span several processes (the global data mesh): each
    process then holds the same images, places only its own devices' rows, and the features are
    gathered back to every process, so a pod shares the Inception work instead of repeating it.
    """

    def __init__(self, weights_path: str | None = None, batch_size: int = 200, sharding=None):
        self.weights_path = os.path.expanduser(weights_path
                                               or inception_weights.default_weights_path())
        self.params = inception_weights.load_params(self.weights_path)
        self.batch_size = batch_size
        self.sharding = sharding
        self.has_logits = "logits" in self.params

    def __call__(self, images) -> tuple[np.ndarray, np.ndarray | None]:
        images = np.asarray(images, np.float32)
        pools, logits = [], []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            n = len(chunk)
            if n < self.batch_size:
                pad = np.zeros((self.batch_size - n, *chunk.shape[1:]), chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            if self.sharding is not None:
                chunk = jax.make_array_from_callback(chunk.shape, self.sharding,
                                                     lambda index, c=chunk: c[index])
            pool, logit = inception.features(self.params, chunk)
            pools.append(to_host(pool)[:n])
            if logit is not None:
                logits.append(to_host(logit)[:n])
        return np.concatenate(pools), (np.concatenate(logits) if logits else None)

    def stats(self, batches: Iterable, max_keep: int = 10_000) -> FeatureStats:
        """Statistics of all images in `batches` (any sizes), regrouped into full network
        batches so that only the last one is padded."""
        stats = FeatureStats(max_keep=max_keep)
        pending: list[np.ndarray] = []
        count = 0
        for images in batches:
            pending.append(np.asarray(images, np.float32))
            count += len(images)
            if count >= self.batch_size:
                merged = np.concatenate(pending)
                full = count - count % self.batch_size
                stats.update(*self(merged[:full]))
                pending, count = [merged[full:]], count - full
        if count:
            stats.update(*self(np.concatenate(pending)))
        return stats


@functools.lru_cache(maxsize=2)
def _cached_params(path: str) -> dict:
    return inception_weights.load_params(path)


def inception_features(images, params: dict | None = None) -> tuple[Array, Array | None]:
    """pool_3 features (N, 2048) and logits (N, 1008; None if the weights lack the classifier)
    of images (N, H, W, 3) in [0, 255]. params None: the default converted weights."""
    if params is None:
        params = _cached_params(inception_weights.default_weights_path())
    return inception.features(params, jnp.asarray(images, jnp.float32))


def sample_quality(gen: FeatureStats, ref: FeatureStats, kid_subsets: int = 100,
                   kid_subset_size: int = 1000, is_splits: int = 10) -> dict:
    """FID and KID of `gen` against `ref`, and the Inception Score of `gen` if it has logits."""
    out = {"fid": frechet_distance(*gen.mean_cov(), *ref.mean_cov())}
    out["kid"], out["kid_std"] = kid(gen.features, ref.features, kid_subsets, kid_subset_size)
    logits = gen.logits
    if logits is not None and len(logits) >= is_splits:
        out["inception_score"], out["inception_score_std"] = inception_score(logits, is_splits)
    return out
