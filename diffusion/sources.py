"""Where examples come from: the `Dataset` container and its random-access sources.

A `Dataset` holds two random-access splits (`len()` and `source[i] -> {"x", "label"}`, `x` raw:
uint8 pixel levels (H, W, C) for images, float (D,) for points): `ArraySource` over in-memory
arrays (the embedded datasets) or `TfdsImageSource` over a prepared tfds dataset, read with
`tfds.data_source` (array_record files, no TensorFlow). `datasets.get_dataset(config)` picks one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

SPLITS = ("train", "eval")
# The datasets that ship with the code (no tfds), for the messages below.
EMBEDDED_DATASETS = ("digits", "gmm", "moons", "swiss_roll")


class DatasetNotFoundError(ValueError):
    """The dataset name is unknown, or the tfds dataset is not prepared where we looked."""


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
        if np.issubdtype(np.asarray(x).dtype, np.floating):
            bad = np.flatnonzero(~np.isfinite(np.asarray(x)).reshape(len(x), -1).all(axis=1))
            if len(bad):
                raise ValueError(f"{len(bad)} of {len(x)} examples have NaN or infinite values "
                                 f"(the first at index {bad[0]}): remove or repair them.")
        if len(label) and np.min(label) < 0:
            raise ValueError(f"Labels must be >= 0, got {np.min(label)} (index "
                             f"{int(np.argmin(label))}).")
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
        record = self.source[check_index(i, len(self.source))]
        return {"x": square_image(np.asarray(record["image"]), self.size, self.crop),
                "label": int(record.get("label", 0))}


def check_index(i: int, n: int) -> int:
    """i as an index in [0, n); IndexError outside [-n, n)."""
    if not -n <= i < n:
        raise IndexError(f"index {i} out of range for {n} examples")
    return i % n


def square_image(image: np.ndarray, size: int, crop: int | None) -> np.ndarray:
    """(H, W[, C]) pixels as (size, size, C): centre-cropped and resized unless already so."""
    if image.ndim == 2:
        image = image[..., None]
    if crop or image.shape[:2] != (size, size):
        image = center_crop_resize(image, size, crop)
    return image


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


# --------------------------------------------------------------------------- tfds


# Datasets scripts/prepare_data.py writes from their original archives: the files it needs.
PREPARE_COMMANDS = {
    "cifar10": "--archive cifar-10-python.tar.gz",
    "celeb_a": ("--archive img_align_celeba.zip --partition list_eval_partition.txt "
                "--attributes list_attr_celeba.txt --landmarks list_landmarks_align_celeba.txt "
                "--identity identity_CelebA.txt"),
}


def open_tfds(name: str, split: str, data_dir: str | None) -> Sequence:
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
        base = name.split(":")[0]
        if base in PREPARE_COMMANDS:   # from the original archive, without TensorFlow
            how = (f"from its original archive, without TensorFlow: `python scripts/"
                   f"prepare_data.py {base} {PREPARE_COMMANDS[base]} --data_dir {where}` (see "
                   f"the README, \"Preparing CIFAR-10 / CelebA without TensorFlow\")")
        else:
            how = (f"on a machine with internet and TensorFlow (`pip install tensorflow`; "
                   f"tfds needs it to build): `tfds build {base} --data_dir {where} "
                   f"--file_format array_record`")
        raise DatasetNotFoundError(
            f"tfds dataset {name!r} is not prepared in {location}. Prepare it {how}, then pass "
            f"--config.data.data_dir={where}.")
    raise DatasetNotFoundError(
        f"tfds dataset {name!r} in {location} could not be opened for split {split!r}: "
        f"{reason}. Check config.data.train_split / eval_split; a dataset built as tfrecord "
        f"needs `tfds convert_format --root_data_dir {where} --out_file_format array_record`.")


def load_tfds(name: str, image_size: int | None, num_channels: int | None,
               crop_size: int | None, data_dir: str | None, train_split: str,
               eval_split: str) -> Dataset:
    train = open_tfds(name, train_split, data_dir)
    eval_ = open_tfds(name, eval_split, data_dir)
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
