"""The datasets that ship with the code: scikit-learn's 8x8 digits and the 2-D toys.

  "digits"                       1,497 train / 300 eval, 17 pixel levels, label = the digit;
                                 image_size 16 upsamples them 2x (nearest neighbour).
  "gmm", "moons", "swiss_roll"   generated from a fixed seed: 100,000 train / 10,000 eval points.
                                 The GMM's exact parameters are `gmm_params()`.
"""

from __future__ import annotations

import functools

import numpy as np

from diffusion.data.sources import ArraySource, Dataset

TOY_DATASETS = ("gmm", "moons", "swiss_roll")

DIGITS_NUM_EVAL = 300           # the last 300 of scikit-learn's 1,797 digits (other writers)
DIGITS_LEVELS = 17              # pixel values 0..16

TOY_SEED = 0                    # the toys are the same points on every machine
TOY_TRAIN_SIZE = 100_000
TOY_EVAL_SIZE = 10_000

# The Gaussian mixture: GMM_COMPONENTS equal-weight isotropic Gaussians (std GMM_STD) centred on
# a circle of radius GMM_RADIUS, the first on the positive x axis. Per-coordinate variance of the
# mixture: GMM_RADIUS**2 / 2 + GMM_STD**2 = 2.0625 (std about 1.44).
GMM_COMPONENTS = 8
GMM_RADIUS = 2.0
GMM_STD = 0.25



def load_digits(image_size: int | None, num_channels: int | None) -> Dataset:
    from sklearn.datasets import load_digits

    if num_channels and num_channels != 1:
        raise ValueError(f"The digits are grayscale (1 channel), but config.data.num_channels="
                         f"{num_channels}: set --config.data.num_channels=1.")
    size = image_size or 8
    if size not in (8, 16):
        raise ValueError(f"The digits are 8x8 images, but config.data.image_size={image_size}: "
                         f"set --config.data.image_size=8 (or 16 for a 2x nearest-neighbour "
                         f"upsampling).")
    digits = load_digits()
    x = digits.images.astype(np.uint8)[..., None]                 # (1797, 8, 8, 1), levels 0..16
    factor = size // 8
    x = np.repeat(np.repeat(x, factor, axis=1), factor, axis=2)
    label = digits.target.astype(np.int64)
    cut = len(x) - DIGITS_NUM_EVAL
    return Dataset("digits", ArraySource(x[:cut], label[:cut]), ArraySource(x[cut:], label[cut:]),
                   data_shape=(size, size, 1), is_image=True, num_levels=DIGITS_LEVELS,
                   num_classes=10)


# --------------------------------------------------------------------------- 2-D toys


def gmm_params() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact parameters of the "gmm" toy: weights (K,), means (K, 2), covs (K, 2, 2), float64.

    K = GMM_COMPONENTS equal weights; means GMM_RADIUS * (cos, sin)(2 pi k / K); covs GMM_STD**2 I.
    """
    weights = np.full(GMM_COMPONENTS, 1.0 / GMM_COMPONENTS)
    means = ring_means(GMM_COMPONENTS, GMM_RADIUS)
    covs = np.broadcast_to(GMM_STD**2 * np.eye(2), (GMM_COMPONENTS, 2, 2)).copy()
    return weights, means, covs


def ring_means(n_components: int, radius: float, dim: int = 2) -> np.ndarray:
    """(n_components, dim) points on a circle of `radius` in the first two coordinates (the
    others 0), equally spaced, the first on the positive x axis."""
    angles = 2.0 * np.pi * np.arange(n_components) / n_components
    means = np.zeros((n_components, dim))
    means[:, 0], means[:, 1] = radius * np.cos(angles), radius * np.sin(angles)
    return means


def _sample_gmm(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    weights, means, covs = gmm_params()
    component = rng.choice(len(weights), size=n, p=weights)
    z = rng.standard_normal((n, 2))
    x = means[component] + np.einsum("nij,nj->ni", np.linalg.cholesky(covs)[component], z)
    return x, component


def _sample_moons(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaved half circles (scikit-learn's make_moons) with noise std 0.1."""
    upper = rng.random(n) < 0.5
    t = np.pi * rng.random(n)
    x = np.where(upper[:, None], np.stack([np.cos(t), np.sin(t)], -1),
                 np.stack([1.0 - np.cos(t), 0.5 - np.sin(t)], -1))
    return x + 0.1 * rng.standard_normal((n, 2)), np.zeros(n, np.int64)


def _sample_swiss_roll(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A 2-D spiral (scikit-learn's make_swiss_roll, x and z coordinates) with noise std 0.5."""
    t = 1.5 * np.pi * (1.0 + 2.0 * rng.random(n))
    x = np.stack([t * np.cos(t), t * np.sin(t)], -1)
    return x + 0.5 * rng.standard_normal((n, 2)), np.zeros(n, np.int64)


_TOY_SAMPLERS = {"gmm": _sample_gmm, "moons": _sample_moons, "swiss_roll": _sample_swiss_roll}


@functools.lru_cache(maxsize=len(TOY_DATASETS))
def load_toy(name: str) -> Dataset:
    """Points from TOY_SEED. moons and swiss_roll are standardised by the train split's mean and
    one overall scale (the shape is kept); the gmm is used as is, so `gmm_params` stays exact."""
    code = TOY_DATASETS.index(name)
    sample = _TOY_SAMPLERS[name]
    x_train, y_train = sample(np.random.default_rng([TOY_SEED, code, 0]), TOY_TRAIN_SIZE)
    x_eval, y_eval = sample(np.random.default_rng([TOY_SEED, code, 1]), TOY_EVAL_SIZE)
    if name != "gmm":
        mean = x_train.mean(axis=0)
        scale = np.sqrt(np.mean(x_train.var(axis=0)))
        x_train, x_eval = (x_train - mean) / scale, (x_eval - mean) / scale
    x_train, x_eval = x_train.astype(np.float32), x_eval.astype(np.float32)
    for a in (x_train, x_eval, y_train, y_eval):
        a.setflags(write=False)                                  # shared by the cache
    return Dataset(name, ArraySource(x_train, y_train), ArraySource(x_eval, y_eval),
                   data_shape=(2,),
                   is_image=False, num_classes=GMM_COMPONENTS if name == "gmm" else None)
