"""Datasets as random-access sources, and every batch as a pure function of the step.

A `Dataset` holds two random-access splits (`len()` and `source[i] -> {"x", "label"}` with `x`
raw: uint8 pixel levels (H, W, C) for images, float (D,) for points). `batch_at` turns
(seed, step) into the batch of that step, so the training loop's data position is the step
number itself: a resumed run reads exactly the batches it would have read, with no iterator
state to checkpoint.

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
  any other name                 a tfds dataset with an "image" feature ("cifar10", "mnist",
                                 "celeb_a", ...), read with `tfds.data_source` (array_record
                                 format), center-cropped and resized to `data.image_size` when
                                 that differs.

tensorflow_datasets, scikit-learn and Pillow are imported only when a dataset needs them, so
importing this module is cheap.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

TOY_DATASETS = ("gmm", "moons", "swiss_roll")
EMBEDDED_DATASETS = ("digits", *TOY_DATASETS)
SPLITS = ("train", "eval")

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

# Streams of randomness derived from the seed (never reused for two purposes).
_PERMUTATION_STREAM = 0
_AUGMENT_STREAM = 1


class DatasetNotFoundError(ValueError):
    """The dataset name is unknown, or the tfds dataset is not prepared where we looked."""


# --------------------------------------------------------------------------- containers


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Two random-access splits and what a batch of them looks like.

    Attributes:
      name: the config's `data.dataset`.
      train, eval: sources with `len()` and `source[i] -> {"x": raw example, "label": int}`; `x`
        is uint8 pixel levels (H, W, C) for images and float (D,) for points.
      data_shape: the shape of one example: (H, W, C) for images, (D,) for points.
      is_image: whether `x` holds pixel levels (mapped to [0, 1] / [-1, 1] by `batch_at`).
      num_levels: pixel levels of the raw images (17 for digits, 256 for 8-bit); None for points.
      num_classes: the labels lie in [0, num_classes); None when every label is 0.
    """

    name: str
    train: Sequence
    eval: Sequence
    data_shape: tuple[int, ...]
    is_image: bool
    num_levels: int | None = None
    num_classes: int | None = None

    def split(self, split: str) -> Sequence:
        """The source of `split` ("train" or "eval")."""
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; use one of {SPLITS}.")
        return self.train if split == "train" else self.eval


class ArraySource(Sequence):
    """A random-access source over in-memory arrays: x (N, ...) and integer labels (N,)."""

    def __init__(self, x: np.ndarray, label: np.ndarray):
        if len(x) != len(label):
            raise ValueError(f"{len(x)} examples but {len(label)} labels.")
        self.x = x
        self.label = label

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "label": int(self.label[i])}

    def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(x (n, ...), label (n,)) of the examples at `indices`, in one vectorized read."""
        return self.x[indices], self.label[indices]


class TfdsImageSource(Sequence):
    """A tfds data source whose records become {"x": uint8 (size, size, C), "label": int}.

    Images that are not `size` x `size` are center-cropped to a square (of side `crop`, else the
    largest) and resized with Pillow (bicubic, antialiased). Records without a "label" get
    label 0; other fields are ignored.
    """

    def __init__(self, source: Sequence, size: int, crop: int | None = None):
        self.source = source
        self.size = size
        self.crop = crop

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self.source)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} examples")
        record = self.source[i % n]
        image = np.asarray(record["image"])
        if image.ndim == 2:
            image = image[..., None]
        if self.crop or image.shape[:2] != (self.size, self.size):
            image = center_crop_resize(image, self.size, self.crop)
        return {"x": image, "label": int(record.get("label", 0))}


def center_crop_resize(image: np.ndarray, size: int, crop: int | None = None) -> np.ndarray:
    """Center-crops (H, W, C) pixels to a square and resizes them to (size, size, C), same dtype.

    The square's side is `crop` (e.g. 140 for CelebA's faces, as score_sde and DDIM) or, if None
    or 0, min(H, W). Resizing is Pillow's bicubic filter, which is antialiased when shrinking.
    """
    from PIL import Image

    h, w = image.shape[:2]
    side = min(h, w)
    if crop:
        if crop > side:
            raise ValueError(f"config.data.crop_size={crop} exceeds the {h}x{w} images; use at "
                             f"most {side} (or 0 for the largest centered square).")
        side = crop
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top:top + side, left:left + side]
    if side == size:
        return np.ascontiguousarray(square)
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(square[..., c]))
                           .resize((size, size), Image.Resampling.BICUBIC))
                for c in range(square.shape[-1])]
    return np.stack(channels, axis=-1).astype(image.dtype, copy=False)


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
                        data_dir=data.get("data_dir"),
                        train_split=data.get("train_split") or "train",
                        eval_split=data.get("eval_split") or "test")


def load_dataset(name: str, *, image_size: int | None = None, num_channels: int | None = None,
                 crop_size: int | None = None, data_dir: str | None = None,
                 train_split: str = "train",
                 eval_split: str = "test") -> Dataset:
    """`get_dataset` with plain arguments (see there)."""
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
    return _load_tfds(name, image_size, num_channels, crop_size, data_dir, train_split,
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
    angles = 2.0 * np.pi * np.arange(GMM_COMPONENTS) / GMM_COMPONENTS
    weights = np.full(GMM_COMPONENTS, 1.0 / GMM_COMPONENTS)
    means = GMM_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    covs = np.broadcast_to(GMM_STD**2 * np.eye(2), (GMM_COMPONENTS, 2, 2)).copy()
    return weights, means, covs


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


# --------------------------------------------------------------------------- tfds


def _open_tfds(name: str, split: str, data_dir: str | None) -> Sequence:
    """tfds.data_source(name, split), never downloading; one clear error when that fails."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DatasetNotFoundError(
            f"Dataset {name!r} is not embedded ({', '.join(EMBEDDED_DATASETS)}) and "
            f"tensorflow_datasets is not installed: pip install tensorflow-datasets "
            f"array-record.") from None
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise DatasetNotFoundError(
            f"Unknown dataset {name!r}: it is neither embedded ({', '.join(EMBEDDED_DATASETS)}) "
            f"nor a tfds dataset (see https://www.tensorflow.org/datasets/catalog).") from None
    except Exception as error:  # tfds raises many kinds here; the message is what matters
        lines = str(error).strip().splitlines()
        reason = lines[0][:300] if lines else repr(error)
    try:
        prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
    except Exception:
        prepared = False
    where = data_dir or "DIR"
    location = data_dir or "the default tfds data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
    if not prepared:
        raise DatasetNotFoundError(
            f"tfds dataset {name!r} is not prepared in {location}. Prepare it on a machine with "
            f"internet: `tfds build {name.split(':')[0]} --data_dir {where} --file_format "
            f"array_record`, then pass --config.data.data_dir={where}.")
    raise DatasetNotFoundError(
        f"tfds dataset {name!r} in {location} could not be opened for split {split!r}: "
        f"{reason}. Check config.data.train_split / eval_split; a dataset built as tfrecord "
        f"needs `tfds convert_format --root_data_dir {where} --out_file_format array_record`.")


def _load_tfds(name: str, image_size: int | None, num_channels: int | None,
               crop_size: int | None, data_dir: str | None, train_split: str,
               eval_split: str) -> Dataset:
    train = _open_tfds(name, train_split, data_dir)
    eval_ = _open_tfds(name, eval_split, data_dir)
    features = train.dataset_info.features
    if "image" not in features:
        raise ValueError(f"tfds dataset {name!r} has no 'image' feature (it has "
                         f"{', '.join(features.keys())}); only image datasets are supported.")
    height, width, channels = features["image"].shape
    if num_channels and channels is not None and num_channels != channels:
        raise ValueError(f"tfds dataset {name!r} has {channels}-channel images, but "
                         f"config.data.num_channels={num_channels}: set "
                         f"--config.data.num_channels={channels}.")
    if not image_size:
        if height is None or height != width:
            raise ValueError(f"tfds dataset {name!r} has {height}x{width} images: set "
                             f"config.data.image_size to the square size to crop and resize to.")
        image_size = height
    channels = channels or num_channels
    if not channels:
        raise ValueError(f"tfds dataset {name!r} does not fix its number of channels: set "
                         f"config.data.num_channels.")
    dtype = np.dtype(getattr(features["image"], "np_dtype", np.uint8))
    label = features["label"] if "label" in features else None
    return Dataset(name, TfdsImageSource(train, image_size, crop_size),
                   TfdsImageSource(eval_, image_size, crop_size),
                   data_shape=(image_size, image_size, channels), is_image=True,
                   num_levels=int(np.iinfo(dtype).max) + 1,
                   num_classes=getattr(label, "num_classes", None))


# --------------------------------------------------------------------------- batches


def data_scaler(centered: bool) -> Callable:
    """Maps images in [0, 1] to data space: [-1, 1] if centered, else unchanged."""
    return (lambda x: x * 2.0 - 1.0) if centered else (lambda x: x)


def inverse_scaler(centered: bool) -> Callable:
    """Maps data space back to [0, 1] images (the inverse of `data_scaler`)."""
    return (lambda x: (x + 1.0) / 2.0) if centered else (lambda x: x)


@functools.lru_cache(maxsize=16)
def _permutation(seed: int, split: str, epoch: int, n: int) -> np.ndarray:
    rng = np.random.default_rng([seed, _PERMUTATION_STREAM, SPLITS.index(split), epoch])
    order = rng.permutation(n)
    order.setflags(write=False)
    return order


def _check_batch_args(step: int, batch_size: int, seed: int, process_index: int,
                      process_count: int) -> None:
    if batch_size <= 0 or process_count <= 0:
        raise ValueError(f"batch_size ({batch_size}) and process_count ({process_count}) must be "
                         f"positive.")
    if batch_size % process_count:
        raise ValueError(f"The global batch size {batch_size} is not divisible by the "
                         f"{process_count} processes: choose a batch size that is a multiple of "
                         f"{process_count}.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
    if step < 0 or seed < 0:
        raise ValueError(f"step ({step}) and seed ({seed}) must be non-negative.")


def _positions(step: int, batch_size: int, process_index: int, process_count: int) -> np.ndarray:
    """Positions in the endless stream of examples that this process reads at `step`."""
    local = batch_size // process_count
    start = int(step) * int(batch_size) + int(process_index) * local
    return np.arange(start, start + local, dtype=np.int64)


def batch_indices(n: int, split: str, step: int, batch_size: int, *, seed: int,
                  process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """Indices (batch_size // process_count,) into a split of `n` examples read at `step`.

    The examples form an endless stream: epoch e is the permutation of range(n) drawn from
    np.random.default_rng([seed, 0, split, e]), and global batch `step` is stream positions
    [step * batch_size, (step + 1) * batch_size), of which process p reads the p-th contiguous
    part. So every example appears once per epoch, batches may straddle epochs, and the result
    depends only on its arguments (resuming at any step reads the same examples).
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {SPLITS}.")
    if n <= 0:
        raise ValueError(f"The {split} split is empty.")
    _check_batch_args(step, batch_size, seed, process_index, process_count)
    return _stream_indices(n, split, _positions(step, batch_size, process_index, process_count),
                           seed)


def _stream_indices(n: int, split: str, positions: np.ndarray, seed: int) -> np.ndarray:
    """Example indices at stream `positions`: permutation_e[p mod n] of epoch e = p // n."""
    epochs, offsets = np.divmod(positions, n)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
        here = epochs == epoch
        indices[here] = _permutation(int(seed), split, int(epoch), int(n))[offsets[here]]
    return indices


def take(source: Sequence, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stored examples at `indices`: (pixel levels or points, labels), no augmentation."""
    return _gather(source, np.asarray(indices))


def _gather(source: Sequence, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(source, ArraySource):
        return source.take(indices)
    records = [source[int(i)] for i in indices]
    return (np.stack([np.asarray(r["x"]) for r in records]),
            np.asarray([r.get("label", 0) for r in records]))


def _to_unit_interval(pixels: np.ndarray, num_levels: int, positions: np.ndarray, seed: int,
                      split: str, dequantize: bool, flip: bool) -> np.ndarray:
    """Pixel levels (b, H, W, C) -> float32 in [0, 1], with per-example dequantization / flips.

    Without dequantization x / (L - 1), so levels 0 and L - 1 map to 0 and 1; with it (x + u) / L,
    u ~ U[0, 1). Each example's coin and noise come from its own generator seeded by its stream
    position, so they do not depend on the batch size's split over processes.
    """
    if not (dequantize or flip):
        return pixels.astype(np.float32) / np.float32(num_levels - 1)
    x = np.empty(pixels.shape, np.float32)
    for i, position in enumerate(positions):
        rng = np.random.default_rng([seed, _AUGMENT_STREAM, SPLITS.index(split), int(position)])
        mirrored = rng.random() < 0.5                            # drawn always: noise stays put
        image = pixels[i].astype(np.float32)
        if dequantize:
            x[i] = (image + rng.random(image.shape, np.float32)) / np.float32(num_levels)
        else:
            x[i] = image / np.float32(num_levels - 1)
        if flip and mirrored:
            x[i] = x[i, :, ::-1]
    return x


def batch_at(dataset: Dataset, split: str, step: int, batch_size: int, *, seed: int,
             process_index: int = 0, process_count: int = 1, train: bool = True,
             centered: bool = True, uniform_dequantization: bool = False,
             random_flip: bool = False) -> dict[str, np.ndarray]:
    """This process's part of global batch `step`: a pure function of (seed, step).

    Args:
      dataset: from `get_dataset`.
      split: "train" or "eval".
      step: the global batch number (the training step); examples per `batch_indices`.
      batch_size: the global batch size; must be divisible by process_count.
      seed: the data seed (non-negative).
      process_index, process_count: this process reads the process_index-th of process_count
        contiguous parts, so the parts concatenated in process order are the global batch.
      train: random flips only happen when True.
      centered: images in [-1, 1] (else [0, 1]).
      uniform_dequantization: images (x + u) / levels with u ~ U[0, 1) (else x / (levels - 1)).
      random_flip: mirror each image left-right with probability 1/2 (train only).
      The last four apply to images only; points are returned as stored.

    Returns:
      {"x": float32 (batch_size // process_count, *data_shape), "label": int32 (same,)}.
    """
    _check_batch_args(step, batch_size, seed, process_index, process_count)
    return examples_at(dataset, split, _positions(step, batch_size, process_index, process_count),
                       seed=seed, centered=centered,
                       uniform_dequantization=uniform_dequantization,
                       random_flip=random_flip and train)


def examples_at(dataset: Dataset, split: str, positions: np.ndarray, *, seed: int,
                centered: bool = True, uniform_dequantization: bool = False,
                random_flip: bool = False) -> dict[str, np.ndarray]:
    """The examples at `positions` (b,) of the split's endless stream (see `batch_indices`).

    Position p is example permutation_e[p mod n] of epoch e = p // n, with its own flip coin and
    dequantization noise (seeded by p), so the same example at two positions gets two noises.
    Returns {"x": float32 (b, *data_shape) in data space, "label": int32 (b,)}; the options are
    `batch_at`'s (images only).
    """
    source = dataset.split(split)
    positions = np.asarray(positions, np.int64)
    n = len(source)
    if n <= 0:
        raise ValueError(f"The {split} split is empty.")
    x, label = _gather(source, _stream_indices(n, split, positions, seed))
    if dataset.is_image:
        x = _to_unit_interval(x, dataset.num_levels, positions, seed, split,
                              uniform_dequantization, random_flip)
        x = data_scaler(centered)(x)
    return {"x": np.asarray(x, np.float32), "label": np.asarray(label, np.int32)}


# --------------------------------------------------------------------------- prefetching


_WORKER_DATASET: Dataset | None = None   # the dataset of a BatchIterator worker process


def _set_worker_dataset(dataset: Dataset) -> None:
    global _WORKER_DATASET
    _WORKER_DATASET = dataset


def _worker_batch(split: str, **kwargs) -> dict[str, np.ndarray]:
    return batch_at(_WORKER_DATASET, split, **kwargs)


class BatchIterator(Iterator):
    """`batch_at(dataset, split, step, batch_size, **kwargs)` for step = start_step, +1, ...

    The next `prefetch` batches are prepared in the background and come back in step order:
    with num_workers=0 by one thread (enough for in-memory data), with num_workers=N by N
    spawned worker processes, each holding its own copy of `dataset` (which must pickle, as tfds
    sources and arrays do). Use processes for tfds datasets: reading and decoding their records
    is Python code holding the GIL, so threads do not add throughput (measured in
    benchmarks/train_throughput.py --pipeline). Iteration ends before `stop_step` (never when
    None); `step` is the step of the next batch returned. An error while preparing a batch is
    raised by the `next()` that would have returned it. Call `close()`, or use it as a context
    manager, to stop the workers.
    """

    def __init__(self, dataset: Dataset, split: str, start_step: int, batch_size: int, *,
                 prefetch: int = 4, num_workers: int = 0, stop_step: int | None = None,
                 **batch_kwargs):
        dataset.split(split)                                     # fail here, not in a worker
        _check_batch_args(start_step, batch_size, batch_kwargs.get("seed", 0),
                          batch_kwargs.get("process_index", 0),
                          batch_kwargs.get("process_count", 1))
        self.step = start_step
        if num_workers > 0:
            import multiprocessing

            # spawn, not fork: forking a process that runs JAX's threads can deadlock.
            self._pool = concurrent.futures.ProcessPoolExecutor(
                num_workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_set_worker_dataset, initargs=(dataset,))
            self._make = functools.partial(_worker_batch, split, batch_size=batch_size,
                                           **batch_kwargs)
        else:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"BatchIterator-{dataset.name}-{split}")
            self._make = functools.partial(batch_at, dataset, split, batch_size=batch_size,
                                           **batch_kwargs)
        self._prefetch = max(1, prefetch, 2 * num_workers)
        self._stop_step = stop_step
        self._pending: collections.deque = collections.deque()   # futures of steps in order
        self._next_step = start_step
        self._closed = False
        self._fill()

    def _fill(self) -> None:
        while len(self._pending) < self._prefetch and (
                self._stop_step is None or self._next_step < self._stop_step):
            self._pending.append(self._pool.submit(self._make, step=self._next_step))
            self._next_step += 1

    def __next__(self) -> dict[str, np.ndarray]:
        if self._closed or not self._pending:
            self.close()
            raise StopIteration
        future = self._pending.popleft()
        try:
            batch = future.result()
        except BaseException:
            self.close()
            raise
        self.step += 1
        self._fill()
        return batch

    def close(self) -> None:
        """Stops the workers and drops the batches they prepared; idempotent."""
        self._closed = True
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
