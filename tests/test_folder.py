"""data.dataset = "folder": any folder of images (diffusion/folder.py, experiments/folder.py)."""

import os

import numpy as np
import pytest
from PIL import Image

from diffusion import data as data_lib
from diffusion.data import folder
from experiments import folder as folder_config


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_CACHE", str(tmp_path / "cache"))


def _write(path, pixels, fmt="PNG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, fmt)


def _config(path, size=8, channels=3):
    config = folder_config.get_config()
    config.data.path = str(path)
    config.data.image_size = size
    config.data.num_channels = channels
    return config


def _images(rng, n, size=8):
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_pixels_labels_and_splits_from_class_folders(tmp_path):
    rng = np.random.default_rng(0)
    put = {}
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            for i, img in enumerate(_images(rng, n)):
                _write(tmp_path / "data" / split / cls / f"{i}.png", img)
                put.setdefault(split, []).append((img.tobytes(), ["cat", "dog"].index(cls)))
    data = data_lib.get_dataset(_config(tmp_path / "data"))
    assert data.num_classes == 2 and data.data_shape == (8, 8, 3) and data.num_levels == 256
    for split, source in (("train", data.train), ("test", data.eval)):
        got = sorted((source[i]["x"].tobytes(), source[i]["label"]) for i in range(len(source)))
        assert got == sorted(put[split])                   # exactly the pixels and labels put in


def test_hold_out_resize_crop_grayscale_and_jpeg(tmp_path):
    """No split folders: every 50th image is the eval split. A 40x20 image is centre-cropped
    to 20x20 and resized; JPEG decodes as Pillow decodes it; num_channels=1 reads L."""
    rng = np.random.default_rng(1)
    for i in range(101):
        _write(tmp_path / "d" / f"{i:03d}.png", _images(rng, 1)[0])
    wide = rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)
    _write(tmp_path / "d" / "zz_wide.png", wide)
    _write(tmp_path / "d" / "zz_photo.jpg", _images(rng, 1)[0], "JPEG")
    data = data_lib.get_dataset(_config(tmp_path / "d"))
    assert (len(data.train), len(data.eval)) == (100, 3) and data.num_classes is None
    paths = data.train.paths + data.eval.paths
    wide_i = data.train.paths.index("zz_wide.png")
    expected = data_lib.center_crop_resize(wide[:, 10:30], 8)
    np.testing.assert_array_equal(data.train[wide_i]["x"], expected)
    src = data.train if "zz_photo.jpg" in data.train.paths else data.eval
    j = src.paths.index("zz_photo.jpg")
    np.testing.assert_array_equal(src[j]["x"], np.asarray(Image.open(tmp_path / "d" /
                                                                     "zz_photo.jpg")))
    assert sorted(paths) == sorted(os.listdir(tmp_path / "d"))
    gray = data_lib.get_dataset(_config(tmp_path / "d", channels=1))
    assert gray.train[0]["x"].shape == (8, 8, 1)


def test_batches_are_a_function_of_the_step_in_threads_processes_and_two_hosts(tmp_path):
    rng = np.random.default_rng(2)
    for i in range(24):
        _write(tmp_path / "d" / ("a" if i % 2 else "b") / f"{i}.png", _images(rng, 1)[0])
    data = data_lib.get_dataset(_config(tmp_path / "d"))
    kwargs = dict(seed=3, random_flip=True)
    first = [data_lib.batch_at(data, "train", s, 8, **kwargs) for s in range(3)]
    again = data_lib.batch_at(data, "train", 1, 8, **kwargs)
    np.testing.assert_array_equal(first[1]["x"], again["x"])
    with data_lib.BatchIterator(data, "train", 0, 8, num_workers=2, stop_step=3,
                                **kwargs) as batches:
        for batch, expected in zip(batches, first, strict=True):
            np.testing.assert_array_equal(batch["x"], expected["x"])
            np.testing.assert_array_equal(batch["label"], expected["label"])
    halves = [data_lib.batch_at(data, "train", 2, 8, process_index=p, process_count=2, **kwargs)
              for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["x"] for h in halves]), first[2]["x"])


def test_a_corrupt_image_is_reported_by_name_skipped_and_not_reopened(tmp_path, capsys,
                                                                      monkeypatch):
    rng = np.random.default_rng(3)
    for i in range(3):
        _write(tmp_path / "d" / f"{i}.png", _images(rng, 1)[0])
    (tmp_path / "d" / "broken.png").write_bytes(b"\x89PNG not really")
    data = data_lib.get_dataset(_config(tmp_path / "d"))
    assert "broken.png" not in data.train.paths + data.eval.paths
    assert len(data.train) + len(data.eval) == 3
    err = capsys.readouterr().err
    assert f"skipping {tmp_path / 'd' / 'broken.png'}, which cannot be read" in err
    # The cached index: nothing is opened again while the files are unchanged.
    monkeypatch.setattr(folder, "_readable", lambda path: pytest.fail(f"reopened {path}"))
    again = data_lib.get_dataset(_config(tmp_path / "d"))
    assert again.train.paths == data.train.paths
    assert "skipping" not in capsys.readouterr().err


def test_empty_missing_and_mixed_folders_are_refused(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"holds no readable image"):
        data_lib.get_dataset(_config(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"is not a folder"):
        data_lib.get_dataset(_config(tmp_path / "absent"))
    config = _config(tmp_path / "empty")
    config.data.path = None
    with pytest.raises(ValueError, match=r"set --config.data.path=DIR"):
        data_lib.get_dataset(config)
    rng = np.random.default_rng(4)
    _write(tmp_path / "mixed" / "cat" / "0.png", _images(rng, 1)[0])
    _write(tmp_path / "mixed" / "loose.png", _images(rng, 1)[0])
    with pytest.raises(ValueError, match=r"class subfolders \(cat\) and 1 outside them"):
        data_lib.get_dataset(_config(tmp_path / "mixed"))


@pytest.mark.slow   # compiles the DDPM++ smoke network (about 30 s on 2 cores)
def test_folder_config_trains_and_samples_from_the_command_line(tmp_path):
    import subprocess
    import sys

    rng = np.random.default_rng(5)
    for cls in ("a", "b"):
        for i in range(6):
            _write(tmp_path / "imgs" / cls / f"{i}.jpg", _images(rng, 1, size=20)[0], "JPEG")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = [sys.executable, os.path.join(root, "scripts", "run.py"),
            f"--config={os.path.join(root, 'experiments', 'folder.py')}:smoke",
            f"--workdir={tmp_path / 'run'}", f"--config.data.path={tmp_path / 'imgs'}",
            "--config.model.num_classes=2"]
    env = {**os.environ, "DIFFUSION_CACHE": str(tmp_path / "cache")}
    for extra in ([], ["--mode=sample"]):
        done = subprocess.run(base + extra, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
    with np.load(tmp_path / "run" / "samples" / "step_2.npz") as f:
        assert f["samples"].shape == (4, 16, 16, 3) and np.all(np.isfinite(f["samples"]))
