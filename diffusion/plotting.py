"""Pictures a person looks at: image grids of samples and scatter plots of 2-D samples."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from diffusion.files import atomic_path


def image_grid(images: np.ndarray, ncol: int | None = None, pad: int = 1,
               transform: Callable | None = None) -> np.ndarray:
    """Tiles images (N, H, W, C) in [0, 1] into one uint8 array (rows*(H+pad), cols*(W+pad), C).

    `transform` (elementwise, e.g. `data.inverse_scaler`) maps each image into [0, 1] first.
    Image by image: memory beyond the input is the uint8 grid and one image, not float copies of
    all N images.
    """
    images = np.asarray(images)
    n, h, w, c = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        img = np.asarray(transform(img) if transform is not None else img, np.float32)
        r, k = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        grid[top:top + h, left:left + w] = np.round(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)
    return grid


def save_image_grid(path: str, images: np.ndarray, ncol: int | None = None,
                    min_size: int = 256, transform: Callable | None = None) -> None:
    """Writes images (N, H, W, C) in [0, 1] (after `transform`, see `image_grid`) as one PNG,
    upscaled (nearest) to >= `min_size` px."""
    from PIL import Image

    grid = image_grid(images, ncol, transform=transform)
    scale = max(1, math.ceil(min_size / max(grid.shape[:2])))
    if scale > 1:
        grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    mode = "L" if grid.shape[-1] == 1 else "RGB"
    img = Image.fromarray(grid[..., 0] if mode == "L" else grid, mode=mode)
    with atomic_path(path, suffix=".png") as tmp:
        img.save(tmp, format="PNG")


def save_scatter(path: str, samples: np.ndarray, reference: np.ndarray | None = None,
                 title: str = "") -> None:
    """Scatter plot of 2-D samples (N, 2), with reference data beside them if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("samples", samples)] + ([("data", reference)] if reference is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.5), squeeze=False)
    pts = np.concatenate([p for _, p in panels])
    lo, hi = np.percentile(pts, 0.5, axis=0), np.percentile(pts, 99.5, axis=0)
    margin = 0.1 * (hi - lo)
    for ax, (name, p) in zip(axes[0], panels, strict=True):
        ax.scatter(p[:, 0], p[:, 1], s=1, alpha=0.4)
        ax.set_title(f"{name} (n={len(p)})")
        ax.set_xlim(lo[0] - margin[0], hi[0] + margin[0])
        ax.set_ylim(lo[1] - margin[1], hi[1] + margin[1])
        ax.set_aspect("equal")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)


def save_samples(path: str, samples: np.ndarray, *, is_image: bool,
                 transform: Callable | None = None, reference: np.ndarray | None = None,
                 title: str = "", ncol: int | None = None) -> None:
    """Samples as a picture: an image grid of images (N, H, W, C) mapped into [0, 1] by
    `transform` (`ncol` columns, e.g. one per class), or a scatter plot of points (N, D) over
    `reference` points (their first two coordinates)."""
    if is_image:
        save_image_grid(path, samples, ncol, transform=transform)
    else:
        ref = None if reference is None else reference[:, :2]
        save_scatter(path, samples, ref, title=title)


def task_rows(task: str, samples: np.ndarray, cond: np.ndarray, mask: np.ndarray | None,
              originals: np.ndarray | None, *, low: float, sr_factor: int,
              columns: int = 8) -> np.ndarray:
    """The rows of a task's picture, `columns` examples each, stacked (rows * columns, H, W, C):
    the conditioning as an image (unknown pixels at `low`, grey images in every channel,
    low-resolution ones upsampled by `sr_factor`), the samples, and the originals when known."""
    n = min(columns, len(samples))
    known = cond[:n]
    if task == "inpaint":
        shown = known * mask[:n] + low * (1 - mask[:n])
    elif task == "colorize":
        shown = np.broadcast_to(known, (*known.shape[:-1], samples.shape[-1]))
    else:
        from diffusion.models.layers import naive_upsample

        shown = np.asarray(naive_upsample(known, sr_factor))
    rows = [shown, samples[:n]] + ([originals[:n]] if originals is not None else [])
    return np.concatenate(rows)
