"""The paper datasets from their original archives, written as tfds datasets without TensorFlow.

    python scripts/prepare_data.py cifar10 --archive cifar-10-python.tar.gz
    python scripts/prepare_data.py celeb_a --archive img_align_celeba.zip \
        --partition list_eval_partition.txt --attributes list_attr_celeba.txt \
        --landmarks list_landmarks_align_celeba.txt --identity identity_CelebA.txt

`prepare(name, data_dir, **files)` writes exactly what `tfds build NAME --file_format
array_record` writes (the registered tfds builder's name, version, features, splits and
dataset_info, in array_record files), so the configs read it through `tfds.data_source` as
usual. The records come from the archive a researcher downloads from the dataset's home page
instead of tfds' download step; tfds' own builders need TensorFlow to build and we do not.

Safety and integrity: CIFAR-10's python batches are pickles, read by `safe_unpickle`, which
builds numpy arrays, lists, dicts, bytes and str and refuses every other global (an archive
from elsewhere cannot run code). A wrong or truncated archive stops with one message before
anything is written; the dataset is built in a temporary folder next to its destination and
renamed into place at the end, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable

import numpy as np

from diffusion.progress import progress

DATASETS = ("cifar10", "celeb_a")


class ArchiveError(ValueError):
    """The archive is not the expected one, or is truncated / corrupted."""


# --------------------------------------------------------------------------- safe unpickling

# The globals a pickled numpy array needs (numpy 1 and 2 module paths), and _codecs.encode, with
# which Python 3 writes bytes at pickle protocol 2 (the original batches are Python 2 pickles and
# need none of them for their bytes); nothing else is built.
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a CIFAR-10 batch holds only numpy arrays, lists, "
            f"bytes and str, and loading anything else could run code from the archive")


def safe_unpickle(data: bytes):
    """Unpickles CIFAR-10's (Python 2) batches: numpy arrays, containers, bytes and str only."""
    return _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()


# --------------------------------------------------------------------------- CIFAR-10

CIFAR10_MEMBERS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR10_DIR = "cifar-10-batches-py"


def _tar_member(tar: tarfile.TarFile, name: str, archive: str) -> bytes:
    try:
        f = tar.extractfile(f"{CIFAR10_DIR}/{name}")
    except KeyError:
        raise ArchiveError(
            f"{archive} has no {CIFAR10_DIR}/{name}: it is not CIFAR-10's python archive "
            f"(cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html)") from None
    return f.read()


def read_cifar10(archive: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """{"train": (images (50000, 32, 32, 3) uint8, labels (50000,)), "test": ...} and the 10
    class names, from cifar-10-python.tar.gz; ArchiveError for a wrong or damaged archive."""
    splits = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            meta = safe_unpickle(_tar_member(tar, "batches.meta", archive))
            names = [n.decode() if isinstance(n, bytes) else n for n in meta[b"label_names"]]
            for split, members in CIFAR10_MEMBERS.items():
                images, labels = [], []
                for member in members:
                    batch = safe_unpickle(_tar_member(tar, member, archive))
                    data = np.asarray(batch[b"data"], np.uint8)
                    if data.ndim != 2 or data.shape[1] != 3072:
                        raise ArchiveError(f"{archive}: {member} holds data of shape "
                                           f"{data.shape}, not (N, 3072) CIFAR-10 images")
                    images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                    labels.append(np.asarray(batch[b"labels"], np.int64))
                splits[split] = (np.concatenate(images), np.concatenate(labels))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise ArchiveError(f"{archive} is not a readable tar archive ({type(e).__name__}: {e}): "
                           f"it may be truncated; download it again") from None
    except (pickle.UnpicklingError, KeyError, ValueError) as e:
        if isinstance(e, ArchiveError):
            raise
        raise ArchiveError(f"{archive}: a CIFAR-10 batch could not be read: {e}") from None
    for split, (images, labels) in splits.items():
        if len(images) != len(labels) or not np.all((labels >= 0) & (labels < len(names))):
            raise ArchiveError(f"{archive}: the {split} batches have {len(images)} images and "
                               f"{len(labels)} labels in 0..{len(names) - 1}")
    return splits, names


# --------------------------------------------------------------------------- CelebA

CELEBA_SPLITS = {"train": 0, "validation": 1, "test": 2}


def _read_table(path: str, headed: bool) -> tuple[list[str], dict[str, list[int]]]:
    """CelebA's annotation files: [count line, header line,] then "file v1 v2 ..." per line."""
    with open(path) as f:
        lines = [line.split() for line in f.read().splitlines() if line.strip()]
    keys = lines[1] if headed else []
    rows = lines[2:] if headed else lines
    try:
        return keys, {row[0]: [int(v) for v in row[1:]] for row in rows}
    except ValueError:
        raise ArchiveError(f"{path} is not a CelebA annotation file (non-integer values)") from None


def read_celeb_a_annotations(partition: str, attributes: str, landmarks: str, identity: str):
    """Per split, the sorted file names, and per file its attributes / landmarks / identity."""
    _, part = _read_table(partition, headed=False)
    bad = sorted({v[0] for v in part.values()} - set(CELEBA_SPLITS.values()))
    if bad or any(len(v) != 1 for v in part.values()):
        raise ArchiveError(f"{partition} is not list_eval_partition.txt (lines 'file.jpg 0|1|2')")
    tables = {"attributes": _read_table(attributes, headed=True),
              "landmarks": _read_table(landmarks, headed=True),
              "identity": (["Identity_No"], _read_table(identity, headed=False)[1])}
    for what, (_, values) in tables.items():
        missing = sorted(set(part) - set(values))
        if missing:
            raise ArchiveError(f"the {what} file has no line for {len(missing)} image(s), e.g. "
                               f"{missing[0]}")
    files = {split: sorted(f for f, (p,) in part.items() if p == code)
             for split, code in CELEBA_SPLITS.items()}
    return files, tables


# --------------------------------------------------------------------------- writing

def png_file(image: np.ndarray) -> io.BytesIO:
    """A PNG of a uint8 image (tfds' Image feature takes encoded files without TensorFlow)."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, "PNG")
    out.seek(0)
    return out


def _builder_class(name: str, splits: list[str], split_examples: Callable,
                   label_names: list[str] | None = None):
    """A subclass of the registered tfds builder `name` (same name, version and features) whose
    `splits` come from `split_examples(split) -> iterator of (key, example)`."""
    import tensorflow_datasets as tfds

    base = tfds.builder_cls(name)

    class FromArchive(base, skip_registration=True):
        def _split_generators(self, dl_manager):
            del dl_manager
            if label_names is not None:
                self.info.features["label"].names = label_names
            return {split: split_examples(split) for split in splits}

    FromArchive.name = base.name
    FromArchive.__name__ = base.__name__
    return FromArchive


def _write(name: str, data_dir: str, splits: list[str], split_examples: Callable,
           label_names: list[str] | None = None) -> str:
    """Builds dataset `name` in a temporary folder of data_dir, then moves it into place."""
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()   # ours (`progress`) instead of one tqdm bar per stage
    cls = _builder_class(name, splits, split_examples, label_names)
    version = str(cls.VERSION)
    final = os.path.join(data_dir, name, version)
    os.makedirs(data_dir, exist_ok=True)
    tmp_root = tempfile.mkdtemp(prefix=f".{name}-prepare-", dir=data_dir)
    try:
        builder = cls(data_dir=tmp_root, file_format="array_record")
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.rename(os.path.join(tmp_root, name, version), final)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return final


def prepared_path(name: str, data_dir: str) -> str | None:
    """The folder of a prepared dataset `name` in data_dir, or None."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception:   # noqa: BLE001 (an unreadable folder counts as not prepared)
        return None
    return builder.data_dir if builder.is_prepared() else None


def prepare_cifar10(archive: str, data_dir: str) -> str:
    splits, names = read_cifar10(archive)   # reads and checks everything before writing

    def examples(split):
        images, labels = splits[split]
        prefix = "train_" if split == "train" else "test_"
        for i in progress(range(len(images)), len(images), 1, f"cifar10 {split}", 10.0):
            yield i, {"id": f"{prefix}{i:05d}", "image": png_file(images[i]),
                      "label": int(labels[i])}

    return _write("cifar10", data_dir, list(splits), examples, names)


def prepare_celeb_a(archive: str, data_dir: str, partition: str, attributes: str,
                    landmarks: str, identity: str) -> str:
    files, tables = read_celeb_a_annotations(partition, attributes, landmarks, identity)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise ArchiveError(f"{archive} is not a readable zip archive ({e}): it may be truncated; "
                           f"download img_align_celeba.zip again") from None
    with zf:
        members = {os.path.basename(n): n for n in zf.namelist() if n.lower().endswith(".jpg")}
        wanted = [f for split in files.values() for f in split]
        missing = [f for f in wanted if f not in members]
        if missing:
            raise ArchiveError(f"{archive} lacks {len(missing)} of the {len(wanted)} images "
                               f"listed in {partition}, e.g. {missing[0]}: it is not "
                               f"img_align_celeba.zip, or not the whole of it")
        bad = zf.testzip()
        if bad is not None:
            raise ArchiveError(f"{archive} is damaged: {bad} fails its CRC check; download it "
                               f"again")
        attr_keys, attrs = tables["attributes"]
        mark_keys, marks = tables["landmarks"]
        id_keys, ids = tables["identity"]

        def examples(split):
            for f in progress(files[split], len(files[split]), 1, f"celeb_a {split}", 10.0):
                yield f, {"image": io.BytesIO(zf.read(members[f])),
                          "landmarks": dict(zip(mark_keys, marks[f], strict=True)),
                          "attributes": {k: v > 0 for k, v in zip(attr_keys, attrs[f],
                                                                  strict=True)},
                          "identity": dict(zip(id_keys, ids[f], strict=True))}

        return _write("celeb_a", data_dir, list(files), examples)
