"""scripts/prepare_data.py / diffusion/archives.py: CIFAR-10 and CelebA from archives in their
original formats (built here from random images), read back through the paper configs' own
loaders; malicious, wrong and truncated archives refused with nothing left behind."""

import io
import os
import pickle
import tarfile
import zipfile

import numpy as np
import pytest

from diffusion import data as data_lib
from diffusion.data import archives
from experiments import vp_celeba64, vp_cifar
from scripts import prepare_data

pytest.importorskip("tensorflow_datasets")

CIFAR_NAMES = "airplane automobile bird cat deer dog frog horse ship truck".split()


def _cifar_batch(rng, n):
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    return {b"batch_label": b"batch", b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": data, b"filenames": [b"x.png"] * n}


def make_cifar_archive(path, n=3, seed=0, replace=None, members=None):
    """cifar-10-python.tar.gz's layout: protocol-2 pickles of dicts with bytes keys (the original
    batches are Python 2 pickles, read with encoding='bytes'). Returns {split: (images, labels)}
    in the order of the batches. `replace` maps a member to raw bytes written instead."""
    rng = np.random.default_rng(seed)
    batches = {name: _cifar_batch(rng, n) for name in
               [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}
    files = {"batches.meta": pickle.dumps({b"label_names": [c.encode() for c in CIFAR_NAMES],
                                           b"num_vis": 3072}, protocol=2),
             **{k: pickle.dumps(v, protocol=2) for k, v in batches.items()}, **(replace or {})}
    with tarfile.open(path, "w:gz") as tar:
        for name in members or files:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(files[name])
            tar.addfile(info, io.BytesIO(files[name]))

    def split(names):
        images = np.concatenate([batches[k][b"data"] for k in names])
        return (images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1),
                np.concatenate([batches[k][b"labels"] for k in names]))

    return {"train": split([f"data_batch_{i}" for i in range(1, 6)]),
            "test": split(["test_batch"])}


def _pairs(images, labels):
    """The (pixels, label) multiset, order-free (tfds shuffles examples by key)."""
    return sorted((img.tobytes(), int(y)) for img, y in zip(images, labels, strict=True))


def _read_split(config, split):
    data = data_lib.get_dataset(config)
    source = data.train if split == "train" else data.eval
    examples = [source[i] for i in range(len(source))]
    return [e["x"] for e in examples], [e["label"] for e in examples], data


def test_cifar10_from_the_python_archive_reads_back_exactly(tmp_path, capsys):
    archive = str(tmp_path / "cifar-10-python.tar.gz")
    put = make_cifar_archive(archive)
    data_dir = str(tmp_path / "tfds")
    assert prepare_data.main(["cifar10", "--archive", archive, "--data_dir", data_dir]) == 0
    out = capsys.readouterr()
    assert "cifar10 train: 15/15" in out.out and "ETA" in out.out     # progress lines
    assert f"--config.data.data_dir={data_dir}" in out.out
    assert sorted(os.listdir(data_dir)) == ["cifar10"]                # no temporary folder left
    config = vp_cifar.get_config()
    config.data.data_dir = data_dir
    for split in ("train", "test"):
        images, labels, data = _read_split(config, split)
        assert _pairs(images, labels) == _pairs(*put[split])
    assert data.num_classes == 10 and data.data_shape == (32, 32, 3)
    import tensorflow_datasets as tfds
    source = tfds.data_source("cifar10", split="test", data_dir=data_dir, download=False)
    assert source.dataset_info.features["label"].names == CIFAR_NAMES
    assert source.dataset_info.version == "3.0.2"      # tfds' own cifar10 version
    ids = sorted(r["id"].decode() for r in source)
    assert ids == [f"test_{i:05d}" for i in range(3)]  # tfds' ids
    # A second run says so and writes nothing.
    assert prepare_data.main(["cifar10", "--archive", archive, "--data_dir", data_dir]) == 0
    assert "already prepared" in capsys.readouterr().out


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_malicious_cifar10_batch_is_refused_before_it_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    archive = str(tmp_path / "evil.tar.gz")
    make_cifar_archive(archive, replace={"data_batch_3": pickle.dumps(
        {b"data": _Exploit(), b"labels": [0]}, protocol=2)})
    with pytest.raises(archives.ArchiveError, match=r"refusing to load posix\.system"):
        archives.read_cifar10(archive)
    data_dir = tmp_path / "tfds"
    assert prepare_data.main(["cifar10", "--archive", archive, "--data_dir", str(data_dir)]) == 1
    assert "refusing to load" in capsys.readouterr().err
    assert not (tmp_path / "PWNED").exists() and not data_dir.exists()


def test_truncated_and_wrong_cifar10_archives_leave_nothing(tmp_path, capsys):
    archive = tmp_path / "cifar-10-python.tar.gz"
    make_cifar_archive(str(archive), n=50)
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    wrong = tmp_path / "wrong.tar.gz"
    make_cifar_archive(str(wrong), members=["batches.meta", "data_batch_1"])
    data_dir = tmp_path / "tfds"
    for path, message in [(truncated, "may be truncated; download it again"),
                          (wrong, "has no cifar-10-batches-py/data_batch_2: it is not "
                                  "CIFAR-10's python archive")]:
        assert prepare_data.main(["cifar10", "--archive", str(path),
                                  "--data_dir", str(data_dir)]) == 1
        err = capsys.readouterr().err
        assert message in err and "Nothing was written" in err
        assert err.count("\n") == 1                      # one line, no traceback
        assert not data_dir.exists()


# --------------------------------------------------------------------------- CelebA

ATTRS = ["Smiling", "Young"]           # the real file has 40; the format is what matters
MARKS = ["lefteye_x", "lefteye_y"]


def make_celeba(tmp_path, n=6, seed=0):
    """img_align_celeba.zip with n random 218x178 JPEGs and the four annotation files; returns
    the paths and {split: {file: (pixels as decoded by Pillow, attributes)}}."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = [f"{i:06d}.jpg" for i in range(1, n + 1)]
    parts = [i % 3 for i in range(n)]
    put = {"train": {}, "validation": {}, "test": {}}
    with zipfile.ZipFile(tmp_path / "img_align_celeba.zip", "w") as zf:
        for name, part in zip(names, parts, strict=True):
            jpeg = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(jpeg, "JPEG")
            zf.writestr(f"img_align_celeba/{name}", jpeg.getvalue())
            pixels = np.asarray(Image.open(io.BytesIO(jpeg.getvalue())))
            attrs = [1 if rng.random() < 0.5 else -1 for _ in ATTRS]
            put[list(put)[part]][name] = (pixels, attrs)
    (tmp_path / "list_eval_partition.txt").write_text(
        "".join(f"{n} {p}\n" for n, p in zip(names, parts, strict=True)))
    all_attrs = {n: a for split in put.values() for n, (_, a) in split.items()}
    (tmp_path / "list_attr_celeba.txt").write_text(
        f"{n}\n{' '.join(ATTRS)}\n" + "".join(f"{k} {' '.join(map(str, all_attrs[k]))}\n"
                                              for k in names))
    (tmp_path / "list_landmarks_align_celeba.txt").write_text(
        f"{n}\n{' '.join(MARKS)}\n" + "".join(f"{k} 69 {i}\n" for i, k in enumerate(names)))
    (tmp_path / "identity_CelebA.txt").write_text(
        "".join(f"{k} {i % 2 + 1}\n" for i, k in enumerate(names)))
    args = ["--archive", str(tmp_path / "img_align_celeba.zip"),
            "--partition", str(tmp_path / "list_eval_partition.txt"),
            "--attributes", str(tmp_path / "list_attr_celeba.txt"),
            "--landmarks", str(tmp_path / "list_landmarks_align_celeba.txt"),
            "--identity", str(tmp_path / "identity_CelebA.txt")]
    return args, put


def _celeba_builder_features(monkeypatch):
    """The real builder has 40 attributes and 10 landmarks; the test files have fewer."""
    import tensorflow_datasets as tfds
    module = __import__(tfds.builder_cls("celeb_a").__module__, fromlist=["x"])
    monkeypatch.setattr(module, "ATTR_HEADINGS", ATTRS)
    monkeypatch.setattr(module, "LANDMARK_HEADINGS", MARKS)


def test_celeb_a_from_the_zip_reads_back_exactly(tmp_path, monkeypatch):
    _celeba_builder_features(monkeypatch)
    args, put = make_celeba(tmp_path)
    data_dir = str(tmp_path / "tfds")
    assert prepare_data.main(["celeb_a", *args, "--data_dir", data_dir]) == 0
    import tensorflow_datasets as tfds
    for split, files in put.items():
        source = tfds.data_source("celeb_a", split=split, data_dir=data_dir, download=False)
        assert len(source) == len(files)
        got = sorted((r["image"].tobytes(), tuple(bool(r["attributes"][a]) for a in ATTRS))
                     for r in source)
        want = sorted((p.tobytes(), tuple(a > 0 for a in attrs)) for p, attrs in files.values())
        assert got == want                                # the JPEGs' pixels, exactly
    # Through the CelebA 64x64 config's loader: its 140x140 centre crop, resized to 64.
    config = vp_celeba64.get_config()
    config.data.data_dir = data_dir
    images, _, data = _read_split(config, "train")
    expected = [data_lib.center_crop_resize(p, 64, 140) for p, _ in put["train"].values()]
    assert sorted(i.tobytes() for i in images) == sorted(e.tobytes() for e in expected)
    assert data.data_shape == (64, 64, 3)


def test_celeb_a_with_a_missing_image_or_a_damaged_zip_leaves_nothing(tmp_path, monkeypatch,
                                                                       capsys):
    _celeba_builder_features(monkeypatch)
    args, _ = make_celeba(tmp_path)
    zip_path = tmp_path / "img_align_celeba.zip"
    data_dir = tmp_path / "tfds"
    (tmp_path / "short.zip").write_bytes(zip_path.read_bytes()[:-200])
    with zipfile.ZipFile(tmp_path / "partial.zip", "w") as zf:
        zf.writestr("img_align_celeba/000001.jpg", b"not a jpeg")
    for archive, message in [("short.zip", "may be truncated"),
                             ("partial.zip", "lacks 5 of the 6 images")]:
        bad = [*args]
        bad[1] = str(tmp_path / archive)
        assert prepare_data.main(["celeb_a", *bad, "--data_dir", str(data_dir)]) == 1
        err = capsys.readouterr().err
        assert message in err and "Nothing was written" in err
        assert not data_dir.exists()
