"""diffusion.datasets: batches as pure functions of (seed, step), the embedded data, tfds."""

import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from diffusion import data as data_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name, image_size=0, num_channels=0, **data):
    config = ml_collections.ConfigDict()
    config.data = ml_collections.ConfigDict(dict(
        dataset=name, image_size=image_size, num_channels=num_channels, data_dir=None,
        train_split="train", eval_split="test", **data))
    return config


@pytest.fixture(scope="module")
def digits():
    return data_lib.get_dataset(_config("digits", 8, 1))


def _tiny(n=12):
    """A 12-example point dataset whose x records the example's index."""
    x = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    source = data_lib.ArraySource(x, np.arange(n))
    return data_lib.Dataset("tiny", source, source, data_shape=(2,), is_image=False)


def test_import_is_cheap():
    """Importing the data modules pulls in neither tfds, scikit-learn nor Pillow (they load when
    a dataset needs them), so spawned batch workers start quickly."""
    code = ("import sys\n"
            "import diffusion.data\n"
            "heavy = {'tensorflow_datasets', 'sklearn', 'PIL'} & set(sys.modules)\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=ROOT)


# --------------------------------------------------------------------------- determinism


def test_same_step_same_batch_and_steps_differ(digits):
    kwargs = dict(seed=3, uniform_dequantization=True, random_flip=True)
    a = data_lib.batch_at(digits, "train", 7, 32, **kwargs)
    b = data_lib.batch_at(digits, "train", 7, 32, **kwargs)
    np.testing.assert_array_equal(a["x"], b["x"])
    np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(a["x"], data_lib.batch_at(digits, "train", 8, 32, **kwargs)["x"])
    assert not np.array_equal(a["x"], data_lib.batch_at(digits, "train", 7, 32, seed=4)["x"])


def test_every_example_once_per_epoch():
    data = _tiny(12)
    steps = [data_lib.batch_at(data, "train", s, 4, seed=0)["x"][:, 0] for s in range(6)]
    first, second = np.concatenate(steps[:3]), np.concatenate(steps[3:])
    np.testing.assert_array_equal(np.sort(first), np.arange(12))
    np.testing.assert_array_equal(np.sort(second), np.arange(12))
    assert not np.array_equal(first, second)  # a fresh permutation each epoch


def test_batches_straddle_epochs_and_exceed_the_split():
    """The stream of examples is epoch after epoch whatever the batch size."""
    for batch_size in (5, 30):
        stream = np.concatenate([data_lib.batch_indices(12, "train", s, batch_size, seed=1)
                                 for s in range(12)])
        for epoch in stream.reshape(-1, 12):
            np.testing.assert_array_equal(np.sort(epoch), np.arange(12))
    np.testing.assert_array_equal(stream[:12], data_lib.batch_indices(12, "train", 0, 12, seed=1))


def test_process_parts_concatenate_to_the_global_batch(digits):
    kwargs = dict(seed=5, uniform_dequantization=True, random_flip=True)
    whole = data_lib.batch_at(digits, "train", 11, 16, **kwargs)
    parts = [data_lib.batch_at(digits, "train", 11, 16, process_index=p, process_count=2, **kwargs)
             for p in range(2)]
    assert parts[0]["x"].shape == (8, 8, 8, 1)
    for key in ("x", "label"):
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_batch_argument_errors(digits):
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        data_lib.batch_at(digits, "train", 0, 16, seed=0, process_count=3)
    with pytest.raises(ValueError, match="process_index"):
        data_lib.batch_at(digits, "train", 0, 16, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="Unknown split"):
        data_lib.batch_at(digits, "test", 0, 16, seed=0)


# --------------------------------------------------------------------------- image values


def test_digits_shapes_labels_and_levels(digits):
    assert (len(digits.train), len(digits.eval)) == (1497, 300)
    assert digits.data_shape == (8, 8, 1) and digits.is_image
    assert (digits.num_levels, digits.num_classes) == (17, 10)
    record = digits.eval[0]
    assert record["x"].dtype == np.uint8 and record["x"].shape == (8, 8, 1)
    from sklearn.datasets import load_digits

    reference = load_digits()
    np.testing.assert_array_equal(record["x"][..., 0], reference.images[1497])
    assert record["label"] == reference.target[1497]
    batch = data_lib.batch_at(digits, "eval", 0, 300, seed=0, train=False)
    assert batch["x"].dtype == np.float32 and batch["label"].dtype == np.int32
    np.testing.assert_array_equal(np.sort(batch["label"]), np.sort(reference.target[1497:]))


def test_value_ranges_and_dequantization(digits):
    plain = data_lib.batch_at(digits, "train", 2, 128, seed=0, centered=False)["x"]
    levels = plain * 16
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-5)
    assert plain.min() == 0.0 and plain.max() == 1.0
    centered = data_lib.batch_at(digits, "train", 2, 128, seed=0)["x"]
    np.testing.assert_allclose(centered, 2 * plain - 1, atol=1e-6)
    assert centered.min() == -1.0 and centered.max() == 1.0

    noisy = data_lib.batch_at(digits, "train", 2, 128, seed=0, centered=False,
                              uniform_dequantization=True)["x"]
    assert 0.0 <= noisy.min() and noisy.max() < 1.0
    np.testing.assert_array_equal(np.floor(noisy * 17), np.round(levels))  # same pixels + U[0, 1)
    frac = noisy * 17 - np.floor(noisy * 17)
    assert 0.45 < frac.mean() < 0.55 and frac.std() > 0.25  # uniform noise, not a constant
    noisy_c = data_lib.batch_at(digits, "train", 2, 128, seed=0, uniform_dequantization=True)["x"]
    np.testing.assert_allclose(noisy_c, 2 * noisy - 1, atol=1e-6)
    np.testing.assert_allclose(data_lib.inverse_scaler(True)(noisy_c), noisy, atol=1e-6)
    np.testing.assert_array_equal(data_lib.inverse_scaler(False)(noisy), noisy)


def test_flips_only_in_train(digits):
    plain = data_lib.batch_at(digits, "train", 4, 128, seed=0)["x"]
    flipped = data_lib.batch_at(digits, "train", 4, 128, seed=0, random_flip=True)["x"]
    mirrored = np.all(flipped == plain[:, :, ::-1], axis=(1, 2, 3))
    unchanged = np.all(flipped == plain, axis=(1, 2, 3))
    assert np.all(mirrored | unchanged)
    assert 30 < np.sum(mirrored & ~unchanged) < 98
    not_train = data_lib.batch_at(digits, "train", 4, 128, seed=0, random_flip=True, train=False)
    np.testing.assert_array_equal(not_train["x"], plain)


def test_digits_upsampled_and_config_checked():
    big = data_lib.get_dataset(_config("digits", 16, 1))
    small = data_lib.get_dataset(_config("digits", 8, 1))
    assert big.data_shape == (16, 16, 1)
    np.testing.assert_array_equal(big.train[3]["x"],
                                  small.train[3]["x"].repeat(2, axis=0).repeat(2, axis=1))
    with pytest.raises(ValueError, match="image_size=8"):
        data_lib.get_dataset(_config("digits", 32, 1))
    with pytest.raises(ValueError, match="num_channels=1"):
        data_lib.get_dataset(_config("digits", 8, 3))


# --------------------------------------------------------------------------- 2-D toys


def test_gmm_samples_follow_gmm_params():
    weights, means, covs = data_lib.gmm_params()
    assert weights.shape == (8,) and means.shape == (8, 2) and covs.shape == (8, 2, 2)
    np.testing.assert_allclose(weights.sum(), 1.0)
    data = data_lib.get_dataset(_config("gmm"))
    assert data.data_shape == (2,) and not data.is_image and data.num_classes == 8
    x, label = data.train.x.astype(np.float64), data.train.label
    assert x.shape == (100_000, 2) and len(data.eval) == 10_000

    mean = weights @ means
    second = np.einsum("k,kij->ij", weights, covs + np.einsum("ki,kj->kij", means, means))
    np.testing.assert_allclose(x.mean(0), mean, atol=0.03)
    np.testing.assert_allclose(np.cov(x.T), second - np.outer(mean, mean), atol=0.05)
    np.testing.assert_allclose(np.bincount(label) / len(label), weights, atol=0.01)
    for k in (0, 3):  # the label is the component
        np.testing.assert_allclose(x[label == k].mean(0), means[k], atol=0.02)
        np.testing.assert_allclose(np.cov(x[label == k].T), covs[k], atol=0.01)


@pytest.mark.parametrize("name", ["moons", "swiss_roll"])
def test_toys_standardised_and_passed_through(name):
    data = data_lib.get_dataset(_config(name))
    x = data.train.x
    np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-3)
    np.testing.assert_allclose(np.mean(x.var(0)), 1.0, atol=1e-3)
    assert np.all(data.train.label == 0) and data.num_classes is None
    indices = data_lib.batch_indices(len(data.train), "train", 3, 64, seed=2)
    batch = data_lib.batch_at(data, "train", 3, 64, seed=2, centered=True,
                              uniform_dequantization=True, random_flip=True)
    np.testing.assert_array_equal(batch["x"], x[indices])  # image options do not touch points
    assert not np.array_equal(data.train.x[:100], data.eval.x[:100])


def test_toy_with_image_config_is_refused():
    with pytest.raises(ValueError, match="image_size=0"):
        data_lib.get_dataset(_config("gmm", 32, 3))


# --------------------------------------------------------------------------- tfds


def test_tfds_cifar10_from_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=24):
        data = data_lib.get_dataset(_config("cifar10", 32, 3))
        small = data_lib.get_dataset(_config("cifar10", 16, 3))
        assert data.data_shape == (32, 32, 3) and data.is_image
        assert (data.num_levels, data.num_classes, len(data.train)) == (256, 10, 24)
        batch = data_lib.batch_at(data, "train", 1, 8, seed=0, centered=False)
        indices = data_lib.batch_indices(24, "train", 1, 8, seed=0)
        raw = np.stack([data.train[int(i)]["x"] for i in indices])
        np.testing.assert_allclose(batch["x"], raw / 255.0, atol=1e-6)
        assert batch["label"].dtype == np.int32 and np.all((0 <= batch["label"])
                                                           & (batch["label"] < 10))
        centered = data_lib.batch_at(data, "eval", 0, 8, seed=0, uniform_dequantization=True)
        assert centered["x"].shape == (8, 32, 32, 3)
        assert -1.0 <= centered["x"].min() and centered["x"].max() < 1.0
        assert small.train[0]["x"].shape == (16, 16, 3) and small.train[0]["x"].dtype == np.uint8
        with pytest.raises(ValueError, match="num_channels=3"):
            data_lib.get_dataset(_config("cifar10", 32, 1))


@pytest.fixture(scope="module")
def built_tfds(tmp_path_factory):
    """A real (locally built, array_record, PNG-encoded) tfds dataset: (name, data_dir)."""
    pytest.importorskip("tensorflow_datasets")
    from tests import synthetic_tfds

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    return synthetic_tfds.build(data_dir, num_train=40, num_test=12), data_dir


def test_tfds_locally_built_dataset_reads_through_data_dir(built_tfds):
    import tensorflow_datasets as tfds

    name, data_dir = built_tfds
    config = _config(name, 32, 3)
    config.data.data_dir = data_dir
    data = data_lib.get_dataset(config)
    assert (len(data.train), len(data.eval), data.num_levels, data.num_classes) == (40, 12, 256, 10)
    raw = tfds.data_source(name, split="train", data_dir=data_dir)
    indices = data_lib.batch_indices(40, "train", 3, 8, seed=1)
    batch = data_lib.batch_at(data, "train", 3, 8, seed=1, centered=False)
    expected = np.stack([raw[int(i)]["image"] for i in indices]) / 255.0
    np.testing.assert_allclose(batch["x"], expected, atol=1e-6)
    np.testing.assert_array_equal(batch["label"], [raw[int(i)]["label"] for i in indices])
    # Worker processes hand back exactly the batches of their steps, in order.
    with data_lib.BatchIterator(data, "train", 2, 8, prefetch=5, num_workers=2,
                                stop_step=9, seed=1, centered=False) as batches:
        for step in range(2, 9):
            expected = data_lib.batch_at(data, "train", step, 8, seed=1, centered=False)
            np.testing.assert_array_equal(next(batches)["x"], expected["x"])
        with pytest.raises(StopIteration):
            next(batches)
    assert _workers_stopped(batches)


def test_tfds_crop_size_crops_before_resizing(built_tfds):
    name, data_dir = built_tfds
    plain = data_lib.load_dataset(name, image_size=8, data_dir=data_dir)
    cropped = data_lib.load_dataset(name, image_size=8, crop_size=16, data_dir=data_dir)
    full = data_lib.load_dataset(name, image_size=32, data_dir=data_dir).train[5]["x"]
    np.testing.assert_array_equal(cropped.train[5]["x"],
                                  data_lib.center_crop_resize(full[8:24, 8:24], 8))
    np.testing.assert_array_equal(plain.train[5]["x"], data_lib.center_crop_resize(full, 8))
    with pytest.raises(ValueError, match="crop_size=40 exceeds the 32x32 images"):
        data_lib.load_dataset(name, image_size=8, crop_size=40, data_dir=data_dir).train[0]


def test_center_crop_resize_keeps_the_center():
    image = np.zeros((30, 50, 1), np.uint8)
    image[:, 10:40] = 200                      # the central 30x30 square
    out = data_lib.center_crop_resize(image, 12)
    assert out.shape == (12, 12, 1) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, 200)


def test_tfds_not_prepared_is_one_clear_error(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    config = _config("cifar10", 32, 3)
    config.data.data_dir = str(tmp_path)
    with pytest.raises(data_lib.DatasetNotFoundError) as info:
        data_lib.get_dataset(config)
    message = str(info.value)
    assert "not prepared" in message and str(tmp_path) in message
    assert "python scripts/prepare_data.py cifar10 --archive cifar-10-python.tar.gz" in message
    assert "without TensorFlow" in message and f"--config.data.data_dir={tmp_path}" in message
    assert info.value.__cause__ is None  # no chained tfds traceback
    assert info.value.__context__ is None or info.value.__suppress_context__
    assert not os.listdir(tmp_path)  # nothing downloaded or created
    # A dataset prepare_data.py does not write: tfds build, which needs TensorFlow (said so).
    config = _config("mnist", 28, 1)
    config.data.data_dir = str(tmp_path)
    with pytest.raises(data_lib.DatasetNotFoundError,
                       match=r"internet and TensorFlow \(`pip install tensorflow`; tfds needs it "
                             r"to build\): `tfds build mnist"):
        data_lib.get_dataset(config)


def test_unknown_dataset_lists_the_embedded_ones():
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(data_lib.DatasetNotFoundError, match="digits, gmm, moons, swiss_roll"):
        data_lib.get_dataset(_config("no_such_dataset_xyz", 32, 3))


# --------------------------------------------------------------------------- prefetching


def test_batch_iterator_matches_batch_at_and_stops(digits):
    kwargs = dict(seed=9, uniform_dequantization=True, random_flip=True)
    with data_lib.BatchIterator(digits, "train", 5, 16, prefetch=2, **kwargs) as batches:
        for step in range(5, 9):
            assert batches.step == step
            expected = data_lib.batch_at(digits, "train", step, 16, **kwargs)
            np.testing.assert_array_equal(next(batches)["x"], expected["x"])
    assert _workers_stopped(batches)
    with pytest.raises(StopIteration):
        next(batches)
    finite = list(data_lib.BatchIterator(digits, "eval", 2, 16, stop_step=5, seed=0))
    assert len(finite) == 3


def _workers_stopped(batches) -> bool:
    pool = batches._pool
    workers = getattr(pool, "_threads", None) or (getattr(pool, "_processes", None) or {}).values()
    return batches._closed and not any(w.is_alive() for w in workers)


def test_batch_iterator_raises_errors_from_the_thread():
    class Broken(data_lib.ArraySource):
        def take(self, indices):
            raise RuntimeError("disk on fire")

    source = Broken(np.zeros((4, 2), np.float32), np.zeros(4))
    data = data_lib.Dataset("broken", source, source, data_shape=(2,), is_image=False)
    batches = data_lib.BatchIterator(data, "train", 0, 2, seed=0)
    with pytest.raises(RuntimeError, match="disk on fire"):
        next(batches)
    assert _workers_stopped(batches)
    with pytest.raises(ValueError, match="not divisible"):
        data_lib.BatchIterator(data, "train", 0, 3, seed=0, process_count=2)
