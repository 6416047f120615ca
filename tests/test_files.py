"""Result files are written atomically: an interrupted write leaves the old file or none, and no
half file that a rerun would trust (samples, FID reference statistics, Inception weights)."""

import os

import numpy as np
import pytest

from diffusion import files


def test_atomic_savez_writes_and_replaces(tmp_path):
    path = str(tmp_path / "sub" / "stats.npz")
    files.atomic_savez(path, a=np.arange(3))
    files.atomic_savez(path, a=np.arange(5))
    with np.load(path) as f:
        np.testing.assert_array_equal(f["a"], np.arange(5))
    assert os.listdir(tmp_path / "sub") == ["stats.npz"]       # no temporary file left


def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_partial_one(tmp_path,
                                                                         monkeypatch):
    path = str(tmp_path / "samples.npz")
    files.atomic_savez(path, samples=np.ones(4))

    def dies_half_way(file, **arrays):
        with open(file, "wb") as f:
            f.write(b"PK\x03\x04 half a zip")               # what a killed writer leaves
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", dies_half_way)
    with pytest.raises(OSError, match="No space left on device"):
        files.atomic_savez(path, samples=np.zeros(4))
    monkeypatch.undo()
    with np.load(path) as f:                                  # the old samples, intact
        np.testing.assert_array_equal(f["samples"], np.ones(4))
    assert os.listdir(tmp_path) == ["samples.npz"]
    fresh = str(tmp_path / "new.npz")
    monkeypatch.setattr(np, "savez", dies_half_way)
    with pytest.raises(OSError):
        files.atomic_savez(fresh, x=np.zeros(1))
    assert not os.path.exists(fresh)                          # no file a rerun would trust


def test_an_interrupted_png_keeps_the_old_grid_and_leaves_no_temporary(tmp_path, monkeypatch):
    """The sample grids and scatter plots go through the same writer."""
    import matplotlib.figure
    from PIL import Image

    from diffusion import plotting

    grid, scatter = str(tmp_path / "grid.png"), str(tmp_path / "scatter.png")
    plotting.save_image_grid(grid, np.ones((4, 8, 8, 1)))
    points = np.random.default_rng(0).normal(size=(10, 2))
    plotting.save_scatter(scatter, points)
    before = {p: (tmp_path / p).read_bytes() for p in (grid, scatter)}

    def dies_half_way(self, file, *args, **kwargs):
        with open(file, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", dies_half_way)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        plotting.save_image_grid(grid, np.zeros((4, 8, 8, 1)))
    with pytest.raises(OSError, match="No space left"):
        plotting.save_scatter(scatter, -points)
    assert sorted(os.listdir(tmp_path)) == ["grid.png", "scatter.png"]
    assert {p: (tmp_path / p).read_bytes() for p in (grid, scatter)} == before
