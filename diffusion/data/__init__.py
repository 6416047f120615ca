"""Datasets as random-access sources, and every batch as a pure function of the step.

A `Dataset` (`data/sources.py`) holds two random-access splits (`len()` and `source[i] -> {"x",
"label"}` with `x` raw: uint8 pixel levels (H, W, C) for images, float (D,) for points).
`batch_at` (`batching.py`, re-exported here) turns (seed, step) into the batch of that step, so
the training loop's data position is the step number itself: a resumed run reads exactly the
batches it would have read, with no iterator state to checkpoint.

    dataset = load_dataset("digits")               # experiment.build passes config.data.*
    batch = batch_at(dataset, "train", step, 128, seed=config.seed, random_flip=True)
    batch["x"]      # float32 (128, *dataset.data_shape) in data space ([-1, 1] images if centered)
    batch["label"]  # int32 (128,)
    with BatchIterator(dataset, "train", start_step, 128, seed=config.seed) as batches:
        for batch in batches: ...      # batch_at(start_step), batch_at(start_step + 1), ...

Datasets (`config.data.dataset`):
  "digits"                       scikit-learn's 8x8 handwritten digits (`data/embedded.py`):
                                 1,497 train / 300 eval, 17 pixel levels, label = the digit;
                                 image_size 16 upsamples them 2x (nearest neighbour).
  "gmm", "moons", "swiss_roll"   2-D toys, generated from a fixed seed: 100,000 train / 10,000 eval.
                                 The GMM's exact parameters are `gmm_params()`.
  "folder"                       the PNG / JPEG images under `data.path` (`data/folder.py`):
                                 labels from subfolder names, centre-cropped and resized.
  any other name                 a tfds dataset with an "image" feature ("cifar10", "mnist",
                                 "celeb_a", ...), read with `tfds.data_source` (`data/tfds.py`,
                                 array_record format), center-cropped and resized to
                                 `data.image_size` when that differs.

tensorflow_datasets, scikit-learn and Pillow are imported only when a dataset needs them, so
importing this module is cheap.
"""

from __future__ import annotations

from diffusion.data.batching import BatchIterator as BatchIterator
from diffusion.data.batching import batch_at as batch_at
from diffusion.data.batching import batch_indices as batch_indices
from diffusion.data.batching import data_scaler as data_scaler
from diffusion.data.batching import examples_at as examples_at
from diffusion.data.batching import inverse_scaler as inverse_scaler
from diffusion.data.batching import take as take
from diffusion.data.embedded import DIGITS_LEVELS as DIGITS_LEVELS
from diffusion.data.embedded import GMM_COMPONENTS as GMM_COMPONENTS
from diffusion.data.embedded import TOY_DATASETS as TOY_DATASETS
from diffusion.data.embedded import gmm_params as gmm_params
from diffusion.data.embedded import load_digits, load_toy
from diffusion.data.embedded import ring_means as ring_means
from diffusion.data.folder import load_folder
from diffusion.data.sources import EMBEDDED_DATASETS as EMBEDDED_DATASETS
from diffusion.data.sources import SPLITS as SPLITS
from diffusion.data.sources import ArraySource as ArraySource
from diffusion.data.sources import Dataset as Dataset
from diffusion.data.sources import DatasetNotFoundError as DatasetNotFoundError
from diffusion.data.sources import center_crop_resize as center_crop_resize
from diffusion.data.tfds import TfdsImageSource as TfdsImageSource
from diffusion.data.tfds import load_tfds


def load_dataset(name: str, *, image_size: int | None = None, num_channels: int | None = None,
                 crop_size: int | None = None, data_dir: str | None = None,
                 train_split: str = "train", eval_split: str = "test", path: str | None = None,
                 shape_only: bool = False) -> Dataset:
    """The dataset called `name` (a config's data.dataset; the other arguments its data.* keys).

    An image_size or num_channels of 0/None means "as stored"; crop_size 0/None crops the largest
    centered square before resizing. data_dir, train_split and eval_split are read for tfds
    datasets, path for "folder". Raises DatasetNotFoundError (a ValueError) for an unknown or
    unprepared dataset and ValueError when image_size / num_channels disagree with the data.

    shape_only: for work that needs only the shape of an example (sampling): a tfds dataset whose
    size and channels are given, or a folder, is then not opened (it may not be on this machine);
    its splits are empty and it has 8-bit levels. Embedded datasets load as usual.
    """
    if name == "digits":
        return load_digits(image_size, num_channels)
    if name in TOY_DATASETS:
        if image_size or num_channels:
            raise ValueError(
                f"Dataset {name!r} is 2-D points, not images, but config.data.image_size="
                f"{image_size} and config.data.num_channels={num_channels}: set "
                f"--config.data.image_size=0 --config.data.num_channels=0 (as "
                f"experiments/toy_2d.py does).")
        return load_toy(name)
    if shape_only and image_size and num_channels:
        return Dataset(name, (), (), data_shape=(image_size, image_size, num_channels),
                       is_image=True, num_levels=256)
    if name == "folder":
        return load_folder(path, image_size, num_channels, crop_size)
    return load_tfds(name, image_size, num_channels, crop_size, data_dir, train_split,
                     eval_split)


def get_dataset(config, *, shape_only: bool = False) -> Dataset:
    """The dataset of a config's `data` block: `load_dataset` with the arguments
    `experiment.dataset_args` unpacks from it (a convenience for scripts and notebooks)."""
    from diffusion import experiment  # the config reader imports this package

    return load_dataset(**experiment.dataset_args(config), shape_only=shape_only)
