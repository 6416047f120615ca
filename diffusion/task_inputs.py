"""The inputs of a sampling task (`sampling.task`: inpaint / colorize / super_resolve): the
measurement to condition on, from the eval split or a file, and the inpainting mask.

    cond, originals = task_inputs(exp, num)   # {"cond": (num, ...), "mask": ...}, (num, ...) | None
"""

from __future__ import annotations

import os

import jax
import numpy as np

from diffusion import data as data_lib
from diffusion import guidance
from diffusion.experiment import Experiment


def task_inputs(exp: Experiment, num: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The conditioning of `sampling.task` for `num` samples, and the originals it came from
    (None when read from a file).

    sampling.task_input "eval": the first `num` images of the eval split, measured (masked,
    turned grey, or average-pooled by sampling.sr_factor). A .npz file (array "images", uint8 in
    [0, 255] or float in [0, 1], (N, h, w, c)) or a .png image: the measurement itself (the
    low-resolution images for super_resolve, grey or colour images for colorize, whole images
    for inpaint, masked by sampling.mask), used in turn for the `num` samples.
    """
    g, shape = exp.sampling.guide, exp.dataset.data_shape
    h, w, c = shape
    scale = data_lib.data_scaler(exp.data.centered)
    if g.task_input == "eval":
        n = min(num, len(exp.dataset.eval))
        originals = data_lib.examples_at(exp.dataset, "eval", np.arange(num) % n, seed=exp.seed,
                                         centered=exp.data.centered)["x"]
        measured = {"inpaint": lambda x: x, "colorize": lambda x: x.mean(-1, keepdims=True),
                    "super_resolve": lambda x: np.asarray(guidance.downsample(x, g.sr_factor))}
        cond = measured[g.task](originals)
    else:
        originals = None
        cond = scale(_read_images(g.task_input))
        expected = {"inpaint": (h, w, (c,)), "colorize": (h, w, (1, c)),
                    "super_resolve": (h // g.sr_factor, w // g.sr_factor, (c,))}[g.task]
        if cond.shape[1:3] != expected[:2] or cond.shape[3] not in expected[2]:
            channels = " or ".join(map(str, expected[2]))
            raise ValueError(f"sampling.task_input={g.task_input} holds images of shape "
                             f"{cond.shape[1:]}; sampling.task={g.task!r} needs "
                             f"{expected[0]}x{expected[1]} with {channels} channel(s).")
        if g.task == "colorize":
            cond = cond.mean(-1, keepdims=True)
        cond = cond[np.arange(num) % len(cond)]
    out = {"cond": np.asarray(cond, np.float32)}
    if g.task == "inpaint":
        out["mask"] = np.broadcast_to(inpaint_mask(g.mask, h, w, exp.key("mask")),
                                      (num, h, w, 1)).astype(np.float32)
    return out, originals


def inpaint_mask(kind: str, h: int, w: int, key: jax.Array) -> np.ndarray:
    """(h, w, 1) mask, 1 = known: `kind` names the part to fill in."""
    mask = np.ones((h, w, 1), np.float32)
    if kind == "right_half":
        mask[:, w // 2:] = 0
    elif kind == "bottom_half":
        mask[h // 2:] = 0
    elif kind == "center":
        mask[h // 4:h - h // 4, w // 4:w - w // 4] = 0
    elif kind == "random":
        mask = np.asarray(jax.random.bernoulli(key, 0.5, (h, w, 1)), np.float32)
    else:
        raise ValueError(f"Unknown inpainting mask {kind!r}.")
    return mask


def _read_images(path: str) -> np.ndarray:
    """Images (N, h, w, c) in [0, 1] from a .npz (array "images") or an image file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"sampling.task_input={path} does not exist (give 'eval', a .npz "
                                f"with an array 'images', or a .png).")
    if path.endswith(".npz"):
        with np.load(path) as f:
            if "images" not in f:
                raise ValueError(f"{path} has arrays {list(f)}; sampling.task_input needs one "
                                 f"called 'images' (N, h, w, c).")
            images = f["images"]
    else:
        from PIL import Image

        images = np.asarray(Image.open(path))[None]
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    images = images.astype(np.float32)
    if images.min() < 0 or images.max() > 1:
        raise ValueError(f"{path}: float images must lie in [0, 1] (uint8 in [0, 255]).")
    return images
