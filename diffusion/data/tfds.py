"""tfds datasets read with `tfds.data_source` (array_record files, no TensorFlow): any tfds
dataset with an "image" feature, center-cropped and resized to the configured size."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from diffusion.data.sources import (
    EMBEDDED_DATASETS,
    Dataset,
    DatasetNotFoundError,
    check_index,
    square_image,
)


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
                   f"docs/paper_configs.md, \"Preparing CIFAR-10 / CelebA without TensorFlow\")")
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
