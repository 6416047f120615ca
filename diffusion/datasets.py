"""Datasets as random-access sources, and every batch as a pure function of the step.

A `Dataset` (`sources.py`) holds two random-access splits (`len()` and `source[i] -> {"x",
"label"}` with `x` raw: uint8 pixel levels (H, W, C) for images, float (D,) for points).
`batch_at` (`batching.py`, re-exported here) turns (seed, step) into the batch of that step, so
the training loop's data position is the step number itself: a resumed run reads exactly the
batches it would have read, with no iterator state to checkpoint.

    dataset = get_dataset(config)                  # reads config.data.* only
    batch = batch_at(dataset, "train", step, 128, seed=config.seed, random_flip=True)
    batch["x"]      # float32 (128, *dataset.data_shape) in data space ([-1, 1] images if centered)
    batch["label"]  # int32 (128,)
    with BatchIterator(dataset, "train", start_step, 128, seed=config.seed) as batches:
        for batch in batches: ...      # batch_at(start_step), batch_at(start_step + 1), ...

Datasets (`config.data.dataset`):
  "digits"                       scikit-learn's embedded 8x8 handwritten digits (no download):
                                 1,497 train / 300 eval, 17 pixel levels, label = the digit;
                                 image_size 16 upsamples them 2x (nearest neighbour).
  "gmm", "moons", "swiss_roll"   2-D toys, generated from a fixed seed: 100,000 train / 10,000 eval.
                                 The GMM's exact parameters are `gmm_params()`.
  "folder"                       the PNG / JPEG images under `data.path` (`diffusion/folder.py`):
                                 labels from subfolder names, centre-cropped and resized.
  any other name                 a tfds dataset with an "image" feature ("cifar10", "mnist",
                                 "celeb_a", ...), read with `tfds.data_source` (array_record
                                 format), center-cropped and resized to `data.image_size` when
                                 that differs.

tensorflow_datasets, scikit-learn and Pillow are imported only when a dataset needs them, so
importing this module is cheap.
"""

from __future__ import annotations

import functools

import numpy as np

from diffusion.batching import BatchIterator as BatchIterator
from diffusion.batching import batch_at as batch_at
from diffusion.batching import batch_indices as batch_indices
from diffusion.batching import data_scaler as data_scaler
from diffusion.batching import examples_at as examples_at
from diffusion.batching import inverse_scaler as inverse_scaler
from diffusion.batching import take as take
from diffusion.folder import load_folder
from diffusion.sources import EMBEDDED_DATASETS as EMBEDDED_DATASETS
from diffusion.sources import SPLITS as SPLITS
from diffusion.sources import ArraySource as ArraySource
from diffusion.sources import Dataset as Dataset
from diffusion.sources import DatasetNotFoundError as DatasetNotFoundError
from diffusion.sources import TfdsImageSource as TfdsImageSource
from diffusion.sources import center_crop_resize as center_crop_resize
from diffusion.sources import load_tfds

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


# --------------------------------------------------------------------------- loading


def get_dataset(config, *, shape_only: bool = False) -> Dataset:
    """The dataset named by `config.data.dataset`, checked against `config.data`.

    Reads data.dataset, image_size, num_channels, crop_size, data_dir, train_split and eval_split
    (the last four only for tfds datasets). An image_size or num_channels of 0/None means "as
    stored"; crop_size 0/None crops the largest centered square before resizing.
    Raises DatasetNotFoundError (a ValueError) for an unknown or unprepared dataset and ValueError
    when image_size / num_channels disagree with the data.

    shape_only: for work that needs only the shape of an example (sampling): a tfds dataset whose
    config fixes image_size and num_channels is then not opened (it may not be prepared on this
    machine); its splits are empty and it has 8-bit levels. Embedded datasets load as usual.
    """
    data = config.data
    if (shape_only and data.dataset != "digits" and data.dataset not in TOY_DATASETS
            and data.get("image_size") and data.get("num_channels")):
        shape = (data.image_size, data.image_size, data.num_channels)
        return Dataset(data.dataset, (), (), data_shape=shape, is_image=True, num_levels=256)
    return load_dataset(data.dataset, image_size=data.get("image_size"),
                        num_channels=data.get("num_channels"), crop_size=data.get("crop_size"),
                        data_dir=data.get("data_dir"), path=data.get("path"),
                        train_split=data.get("train_split") or "train",
                        eval_split=data.get("eval_split") or "test")


def load_dataset(name: str, *, image_size: int | None = None, num_channels: int | None = None,
                 crop_size: int | None = None, data_dir: str | None = None,
                 train_split: str = "train",
                 eval_split: str = "test", path: str | None = None) -> Dataset:
    """`get_dataset` with plain arguments (see there)."""
    if name == "folder":
        return load_folder(path, image_size, num_channels, crop_size)
    if name == "digits":
        return _load_digits(image_size, num_channels)
    if name in TOY_DATASETS:
        if image_size or num_channels:
            raise ValueError(
                f"Dataset {name!r} is 2-D points, not images, but config.data.image_size="
                f"{image_size} and config.data.num_channels={num_channels}: set "
                f"--config.data.image_size=0 --config.data.num_channels=0 (as "
                f"experiments/toy_2d.py does).")
        return _load_toy(name)
    return load_tfds(name, image_size, num_channels, crop_size, data_dir, train_split,
                      eval_split)


def _load_digits(image_size: int | None, num_channels: int | None) -> Dataset:
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
def _load_toy(name: str) -> Dataset:
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
