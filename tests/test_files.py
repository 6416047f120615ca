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
