"""Where examples come from: the `Dataset` container and its random-access sources.

A `Dataset` holds two random-access splits (`len()` and `source[i] -> {"x", "label"}`, `x` raw:
uint8 pixel levels (H, W, C) for images, float (D,) for points): `ArraySource` over in-memory
arrays (the embedded datasets), `tfds.TfdsImageSource` over a prepared tfds dataset or
`folder.FolderSource` over a folder of images. `data.load_dataset` picks one.
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
