"""A tfds image dataset built locally, without a download or TensorFlow, for tests and benchmarks.

`build(data_dir)` writes "synthetic_images": CIFAR-10-shaped records (a PNG-encoded 32x32x3
"image" and a 10-class "label", the features of tfds `cifar10`) in the array_record format, the
way `tfds build cifar10 --file_format array_record` would, so reading it exercises the real path
of `datasets.get_dataset` (tfds.data_source, record reads, PNG decoding) rather than a mock.

    name = synthetic_tfds.build("/tmp/tfds", num_train=5000, num_test=500)
    config.data.dataset, config.data.data_dir = name, "/tmp/tfds"

Images are uniform noise (a worst case for PNG decoding) from a fixed seed; label = index mod 10.
Importing this module imports tensorflow_datasets.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from diffusion.data.archives import png_file

NAME = "synthetic_images"
IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10


class SyntheticImages(tfds.core.GeneratorBasedBuilder):
    """CIFAR-10-shaped random images; split sizes from the class attributes when built."""

    VERSION = tfds.core.Version("1.0.0")
    num_train = 1000
    num_test = 100

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: `dataset_info_from_configs` wants a package directory.
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=IMAGE_SHAPE),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(self.num_train, seed=0),
                "test": self._generate_examples(self.num_test, seed=1)}

    def _generate_examples(self, n: int, seed: int):
        rng = np.random.default_rng(seed)
        for i in range(n):
            image = rng.integers(0, 256, IMAGE_SHAPE, dtype=np.uint8)
            yield i, {"image": png_file(image), "label": i % NUM_CLASSES}


def build(data_dir: str, num_train: int = 1000, num_test: int = 100) -> str:
    """Writes the dataset under `data_dir` (once; a prepared one is reused) and returns its name.

    A dataset already prepared in `data_dir` keeps its sizes: use a new data_dir for new ones.
    """
    SyntheticImages.num_train, SyntheticImages.num_test = num_train, num_test
    builder = SyntheticImages(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return NAME
