"""Any folder of images as a dataset: `data.dataset = "folder"`, `data.path = DIR`.

    python scripts/run.py --config experiments/folder.py --workdir runs/faces \
        --config.data.path=/data/faces --config.data.image_size=64

Every PNG / JPEG (also .bmp, .gif, .webp) under DIR, found recursively. Splits: DIR/train and
DIR/test (or DIR/eval, or DIR/validation) when DIR has them; otherwise every 50th image in
sorted order is held out for evaluation (2%, at least one). Labels: the name of an image's
top-level subfolder inside its split, classes numbered in sorted order (num_classes = their
number); images at the top level of a split have label 0 and, when all are there, the dataset
has no classes. Images are decoded with Pillow, converted to RGB (or L for 1 channel),
centre-cropped to a square (of side data.crop_size, else the largest) and resized to
data.image_size with Pillow's antialiased bicubic filter, the same path as tfds images.

The index (relative paths and labels) is built once and cached in
~/.cache/diffusion/folder_index/ (`$DIFFUSION_CACHE` overrides the root), keyed by the folder's
absolute path; files whose size and modification time are unchanged are not opened again.
Building it opens every image once: a file Pillow cannot read is reported by name and skipped
(and stays skipped until it changes). An empty folder is refused with one message.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from diffusion import files

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
SPLIT_DIRS = {"train": ("train",), "eval": ("test", "eval", "validation")}
HOLD_OUT_EVERY = 50
_INDEX_VERSION = 1


def _cache_file(root: str) -> str:
    base = os.environ.get("DIFFUSION_CACHE") or os.path.expanduser("~/.cache/diffusion")
    digest = hashlib.sha256(os.path.abspath(root).encode()).hexdigest()[:16]
    return os.path.join(base, "folder_index", f"{digest}.json")


def _image_files(root: str) -> list[str]:
    """Relative paths of the image files under root, sorted (hidden folders skipped)."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if name.lower().endswith(EXTENSIONS) and not name.startswith("."):
                found.append(os.path.relpath(os.path.join(folder, name), root))
    return sorted(found)


def _readable(path: str) -> str | None:
    """None if Pillow reads the image, else why not."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except Exception as e:   # noqa: BLE001 (Pillow raises many kinds for a bad file)
        return f"{type(e).__name__}: {e}"
    return None


def build_index(root: str) -> list[str]:
    """The readable image files under root (relative, sorted), from the cache where it is
    current; unreadable ones are printed and left out."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data.path={root!r} is not a folder: set "
                                f"--config.data.path to the folder of your images.")
    cache_path = _cache_file(root)
    try:
        with open(cache_path) as f:
            cache = json.load(f)
        if cache.get("version") != _INDEX_VERSION:
            cache = {}
    except (OSError, ValueError):
        cache = {}
    known = cache.get("files", {})
    entries, bad = {}, []
    for rel in _image_files(root):
        stat = os.stat(os.path.join(root, rel))
        signature = [stat.st_size, stat.st_mtime_ns]
        if rel in known and known[rel][:2] == signature:
            ok = known[rel][2]
        else:
            reason = _readable(os.path.join(root, rel))
            ok = reason is None
            if not ok:
                bad.append((rel, reason))
        entries[rel] = [*signature, ok]
    for rel, reason in bad:
        print(f"folder dataset: skipping {os.path.join(root, rel)}, which cannot be read as an "
              f"image ({reason})", file=sys.stderr)
    if entries != known:
        try:
            os.makedirs(os.path.dirname(cache_path), exist_ok=True)
            files.atomic_write_text(cache_path, json.dumps({"version": _INDEX_VERSION,
                                                            "root": os.path.abspath(root),
                                                            "files": entries}))
        except OSError:
            pass   # a read-only home: the index is rebuilt next time
    readable = [rel for rel, (_, _, ok) in entries.items() if ok]
    if not readable:
        raise ValueError(f"data.path={root!r} holds no readable image "
                         f"({', '.join(EXTENSIONS)}, searched recursively): point "
                         f"--config.data.path at the folder of your images.")
    return sorted(readable)


def _split(paths: list[str]) -> tuple[dict[str, list[str]], bool]:
    """({"train": paths, "eval": paths}, whether they come from split folders): the split
    folders when present, else every HOLD_OUT_EVERY-th path held out."""
    tops = {p.split(os.sep)[0] for p in paths if os.sep in p}
    train_dir = next((d for d in SPLIT_DIRS["train"] if d in tops), None)
    eval_dir = next((d for d in SPLIT_DIRS["eval"] if d in tops), None)
    if train_dir and eval_dir:
        return {split: [p for p in paths if p.split(os.sep)[0] == d]
                for split, d in (("train", train_dir), ("eval", eval_dir))}, True
    held = set(paths[::HOLD_OUT_EVERY])
    return {"train": [p for p in paths if p not in held] or paths,
            "eval": [p for p in paths if p in held]}, False


def _class_of(path: str, split_folders: bool) -> str | None:
    """The top-level subfolder of an image within its split (None at the split's top level)."""
    parts = path.split(os.sep)[1:] if split_folders else path.split(os.sep)
    return parts[0] if len(parts) > 1 else None


def _labels(root: str, splits: dict[str, list[str]], split_folders: bool):
    """Class names (sorted subfolder names) and each split's labels."""
    classes = sorted({c for ps in splits.values() for p in ps
                      if (c := _class_of(p, split_folders)) is not None})
    if classes:
        loose = [p for ps in splits.values() for p in ps if _class_of(p, split_folders) is None]
        if loose:
            raise ValueError(
                f"{root} has images in class subfolders ({', '.join(classes[:3])}"
                f"{', ...' if len(classes) > 3 else ''}) and {len(loose)} outside them (e.g. "
                f"{loose[0]}): put every image in its class folder, or all of them at the top.")
    ids = {c: i for i, c in enumerate(classes)}
    return classes, {split: [ids.get(_class_of(p, split_folders), 0) for p in ps]
                     for split, ps in splits.items()}


class FolderSource(Sequence):
    """Images of a folder as {"x": uint8 (size, size, C), "label": int}; picklable (worker
    processes and other hosts open the files themselves)."""

    def __init__(self, root: str, paths: list[str], labels: list[int], size: int,
                 channels: int, crop: int | None = None):
        self.root, self.paths, self.labels = root, paths, np.asarray(labels, np.int64)
        self.size, self.channels, self.crop = size, channels, crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from PIL import Image

        from diffusion.data.sources import check_index, square_image

        i = check_index(i, len(self.paths))
        with Image.open(os.path.join(self.root, self.paths[i])) as image:
            pixels = np.asarray(image.convert("L" if self.channels == 1 else "RGB"))
        return {"x": square_image(pixels, self.size, self.crop), "label": int(self.labels[i])}


def load_folder(root: str | None, image_size: int | None, num_channels: int | None,
                crop_size: int | None):
    """The `Dataset` of a folder of images (see the module docstring)."""
    from diffusion.data.sources import Dataset

    if not root:
        raise ValueError("data.dataset='folder' reads the images under data.path: set "
                         "--config.data.path=DIR.")
    if not image_size:
        raise ValueError("data.dataset='folder' resizes every image to data.image_size: set "
                         "--config.data.image_size (e.g. 64).")
    channels = num_channels or 3
    if channels not in (1, 3):
        raise ValueError(f"data.num_channels={num_channels}: a folder of images is read as RGB "
                         f"(3) or grayscale (1).")
    root = os.path.expanduser(root)
    splits, split_folders = _split(build_index(root))
    classes, labels = _labels(root, splits, split_folders)
    sources = {split: FolderSource(root, ps, labels[split], image_size, channels, crop_size)
               for split, ps in splits.items()}
    return Dataset("folder", sources["train"], sources["eval"],
                   data_shape=(image_size, image_size, channels), is_image=True,
                   num_levels=256, num_classes=len(classes) or None)
