"""score_sde's own checkpoints, converted, give the score score_sde computes on them.

The fixtures in tests/data/score_sde/ (copied from ../shared/fixtures/score_sde, see its README)
were written by score_sde's model code: small DDPM++ (VP, sub-VP) and NCSN++ (VE) checkpoints in
its msgpack format, with inputs x, times t and the score of its `get_score_fn` on the EMA
parameters. The configs are this codebase's CIFAR-10 configs with the fixtures' width overrides.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import models, train, train_state
from diffusion.compat import score_sde
from experiments import digits, subvp_cifar, ve_cifar, vp_cifar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "score_sde")
INDEX = json.load(open(os.path.join(DATA, "index.json")))
CONFIGS = {"vp_ddpmpp": vp_cifar, "subvp_ddpmpp": subvp_cifar, "ve_ncsnpp": ve_cifar}


def fixture_config(tag, **changes):
    config = CONFIGS[tag].get_config()
    for key, value in INDEX[tag]["overrides"].items():   # model.nf 8, num_res_blocks 1, ...
        section, name = key.split(".")
        config[section][name] = value
    for key, value in changes.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


@pytest.fixture(scope="module")
def fixtures():
    out = {}
    for tag, info in INDEX.items():
        io = np.load(os.path.join(DATA, info["io"]))
        out[tag] = (score_sde.load_state_dict(os.path.join(DATA, info["checkpoint"])),
                    {k: jnp.asarray(io[k]) for k in ("x", "t", "score")})
    return out


def relative_errors(score, reference):
    """Per-example ||s - ref|| / ||ref|| (one per time t)."""
    diff = np.asarray(score - reference).reshape(len(reference), -1)
    return np.linalg.norm(diff, axis=1) / np.linalg.norm(np.reshape(reference, (len(diff), -1)),
                                                         axis=1)


def score_of(config, params, io):
    return jax.jit(models.get_score_model(config))(params, io["x"], io["t"])


@pytest.mark.parametrize("tag", sorted(INDEX))
def test_converted_checkpoint_reproduces_score_sde_score(tag, fixtures):
    state_dict, io = fixtures[tag]
    config = fixture_config(tag)
    params = score_sde.convert(state_dict, config)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    assert n_params == INDEX[tag]["params"]
    score = score_of(config, params, io)
    errors = relative_errors(score, io["score"])
    assert np.all(errors < 1e-4), dict(zip(np.asarray(io["t"]).tolist(), errors, strict=True))
    # Element by element too, against the example's largest entry.
    scale = np.max(np.abs(np.asarray(io["score"])), axis=(1, 2, 3), keepdims=True)
    assert np.all(np.abs(np.asarray(score - io["score"])) <= 1e-4 * scale)


def test_raw_optimizer_params_are_not_the_sampling_weights(fixtures):
    """score_sde samples with params_ema; optimizer.target misses its score by 25-35%."""
    state_dict, io = fixtures["vp_ddpmpp"]
    config = fixture_config("vp_ddpmpp")
    raw = score_sde.convert(state_dict, config, which="raw")
    assert np.all(relative_errors(score_of(config, raw, io), io["score"]) > 0.1)
    # Without params_ema, `convert` falls back to the raw parameters.
    fallback = score_sde.convert({k: v for k, v in state_dict.items() if k != "params_ema"},
                                 config)
    jax.tree.map(np.testing.assert_array_equal, fallback, raw)


@pytest.mark.parametrize("tag, change", [
    ("ve_ncsnpp", {"sde__exact_std": True}),          # the exact VE std: another sigma(t)
    pytest.param("ve_ncsnpp", {"data__centered": True},           # x instead of 2 x - 1
                 marks=pytest.mark.slow),
    pytest.param("subvp_ddpmpp", {"model__scale_input": True},    # x / sqrt(alpha^2 + sigma^2)
                 marks=pytest.mark.slow),
])
def test_our_options_compute_another_score(tag, change, fixtures):
    """The named options that are off in the paper configs do change the score: the
    reproduction above is not a tolerance that would hide them."""
    state_dict, io = fixtures[tag]
    config = fixture_config(tag, **change)
    score = score_of(config, score_sde.convert(state_dict, config), io)
    assert np.max(relative_errors(score, io["score"])) > 1e-2


def test_architecture_mismatches_name_the_first_differing_parameter(fixtures):
    state_dict, _ = fixtures["ve_ncsnpp"]
    with pytest.raises(score_sde.ConversionError,
                       match=r"Parameter AttnBlock_0/GroupNorm_0/bias: .*\(16,\).*\(32,\)"):
        score_sde.convert(state_dict, fixture_config("ve_ncsnpp", model__nf=16))
    with pytest.raises(score_sde.ConversionError,
                       match=r"no parameter for AttnBlock_3/GroupNorm_0/bias"):
        score_sde.convert(state_dict, fixture_config("ve_ncsnpp", model__num_res_blocks=2))
    with pytest.raises(score_sde.ConversionError, match=r"Downsample_0/FIRConv_0/bias .*no place"):
        score_sde.convert(state_dict, fixture_config("ve_ncsnpp",
                                                     model__progressive_input="none"))
    with pytest.raises(score_sde.ConversionError, match="NCSN\\+\\+ / DDPM\\+\\+.*UNet"):
        score_sde.convert(state_dict, digits.get_config("smoke"))
    with pytest.raises(score_sde.ConversionError, match="no parameters"):
        score_sde.convert({"step": 1}, fixture_config("ve_ncsnpp"))


def test_rename_of_ddpm_blocks():
    """ResnetBlockDDPMpp's NIN skip becomes a 1x1 convolution kernel; attention NINs q/k/v/out."""
    tree = {"ResnetBlockDDPMpp_3": {"NIN_0": {"W": np.ones((4, 8)), "b": np.zeros(8)},
                                    "Conv_0": {"kernel": np.ones((3, 3, 4, 8))}},
            "AttnBlockpp_0": {"NIN_3": {"W": np.ones((8, 8)), "b": np.zeros(8)}},
            "Upsample_1": {"Conv2d_0": {"weight": np.ones((3, 3, 8, 8))}}}
    renamed = score_sde.rename(tree)
    assert renamed[("ResnetBlock_3", "skip", "kernel")].shape == (1, 1, 4, 8)
    assert renamed[("ResnetBlock_3", "skip", "bias")].shape == (8,)
    assert renamed[("ResnetBlock_3", "Conv_0", "kernel")].shape == (3, 3, 4, 8)
    assert ("AttnBlock_0", "proj_out", "kernel") in renamed
    assert ("Upsample_1", "FIRConv_0", "kernel") in renamed


@pytest.mark.slow   # 26 s on 2 cores; the conversion itself is tested above
def test_convert_script_writes_a_checkpoint_that_samples(tmp_path, fixtures):
    """scripts/convert_score_sde.py, then `sample` (what --mode sample runs) from the workdir,
    with no CIFAR-10 data on the machine; a second conversion is refused and changes nothing."""
    workdir = str(tmp_path / "w")
    overrides = [f"--config.{k}={v}" for k, v in INDEX["ve_ncsnpp"]["overrides"].items()]
    command = [sys.executable, os.path.join(ROOT, "scripts", "convert_score_sde.py"),
               "--config", os.path.join(ROOT, "experiments", "ve_cifar.py"), *overrides,
               "--checkpoint", os.path.join(DATA, INDEX["ve_ncsnpp"]["checkpoint"]),
               "--workdir", workdir]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "score_sde step 26" in done.stdout
    again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode != 0 and "already holds checkpoints" in again.stderr
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["26"]

    config = fixture_config("ve_ncsnpp")
    config.data.data_dir = str(tmp_path / "no_tfds_data")   # sampling needs only the shape
    config.sampling.method, config.sampling.steps = "dpm_solver", 3
    config.sampling.num_samples = config.sampling.batch_size = 4
    path = train.sample(config, workdir)
    samples = np.load(path)["samples"]
    assert samples.shape == (4, 32, 32, 3) and np.all(np.isfinite(samples))
    # The checkpoint's EMA parameters are the converted params_ema.
    exp = train.build(config, shape_only_data=True)
    state = train_state.restore_latest(exp, workdir, train.data_mesh())
    assert int(state.step) == 26
    state_dict, io = fixtures["ve_ncsnpp"]
    expected = score_sde.convert(state_dict, config)
    jax.tree.map(np.testing.assert_array_equal, state.ema_params, expected)
