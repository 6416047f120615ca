"""Bad input stops `train_and_evaluate` (and sampling / evaluation) with one clear message,
before anything is written; a refused run leaves an existing workdir exactly as it was.

(Config keys: tests/test_config_checks.py; the loaders' own messages: test_datasets.py; a
corrupted newest checkpoint skipped by training, and a full disk: test_train.py.)
"""

import os

import numpy as np
import pytest

from diffusion import checkpointing, train
from diffusion import data as data_lib
from experiments import digits, toy_2d, vp_cifar


def _refused(config, tmp_path, error, match):
    workdir = tmp_path / "run"
    with pytest.raises(error, match=match):
        train.train_and_evaluate(config, str(workdir))
    assert not workdir.exists() or not any(workdir.iterdir()), "a refused run wrote files"


def _files(workdir) -> dict:
    """Every file under `workdir` with its size and modification time."""
    out = {}
    for root, _, names in os.walk(workdir):
        for name in names:
            path = os.path.join(root, name)
            out[os.path.relpath(path, workdir)] = (os.path.getsize(path), os.stat(path).st_mtime_ns)
    return out


# (key, bad value, what the one message says): unknown names, then sizes and step counts.
BAD_VALUES = [
    ("sde.name", "vpp", r"Unknown SDE 'vpp': config\.sde\.name must be one of \['cosine_vpsde', "
                        r"'rectified_flow', 'subvpsde', 'vesde', 'vpsde'\]"),
    ("model.name", "resnet", r"Unknown model 'resnet': config\.model\.name must be one of "
                             r"\['classifier', 'ddpmpp', 'dit', 'mlp', 'ncsnpp', 'unet', "
                             r"'uvit'\]"),
    ("sampling.method", "magic", r"Unknown sampler 'magic': config\.sampling\.method must be "
                                 r"one of \['consistency', 'ddim', 'ddpm', 'dpm_solver', 'edm', "
                                 r"'ode', 'pc'\]"),
    ("data.dataset", "no_such_dataset_xyz", r"Unknown dataset 'no_such_dataset_xyz': it is "
                                            r"neither embedded \(digits, gmm, moons, swiss_roll\)"),
    ("model.parameterization", "eps", r"Unknown parameterization 'eps'"),
    ("sampling.predictor", "rk9", r"sampling\.predictor='rk9' is not one of \['ancestral', "
                                  r"'euler_maruyama', 'reverse_diffusion'\] \(or 'none'\)"),
    ("sampling.corrector", "foo", r"sampling\.corrector='foo' is not one of \['ald', "
                                  r"'langevin'\]"),
    ("eval.bpd_divergence", "exactly", r"eval\.bpd_divergence='exactly' is not one of \['exact', "
                                       r"'hutchinson_gaussian', 'hutchinson_rademacher'\]"),
    ("model.embed_at", "output", r"model\.embed_at='output' is not one of \['every_layer', "
                                 r"'input'\]"),
    ("model.activation", "gelu", r"model\.activation='gelu' is not one of \['relu', 'silu'\]"),
    ("sampling.steps", -1, r"sampling\.steps must be >= 0, got -1"),
    ("training.batch_size", 0, r"training\.batch_size must be >= 1, got 0"),
    ("training.n_iters", 0, r"training\.n_iters must be >= 1, got 0"),
    ("sde.N", 0, r"sde\.N must be >= 1, got 0"),
    ("sampling.num_samples", 0, r"sampling\.num_samples must be >= 1"),
    ("training.log_freq", -2, r"training\.log_freq must be >= 0"),
    ("training.batch_size", 6, r"training\.batch_size=6 must be divisible by the number of "
                               r"devices \(4\)"),
    ("sampling.batch_size", 10, r"sampling\.batch_size=10 must be divisible by the number of "
                                r"devices \(4\)"),
]


@pytest.mark.parametrize("key, value, match", BAD_VALUES)
def test_bad_values(key, value, match, tmp_path):
    config = toy_2d.get_config("smoke")
    section, field = key.split(".")
    config[section][field] = value
    _refused(config, tmp_path, ValueError, match)


def test_an_unknown_ode_solver(tmp_path):
    config = toy_2d.get_config("smoke")
    config.sampling.method, config.sampling.ode_solver = "ode", "rk4"
    _refused(config, tmp_path, ValueError, r"sampling\.ode_solver='rk4' is not one of "
                                           r"\['dopri5', 'tsit5'\]")


def test_a_tfds_dataset_that_is_not_prepared(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    config = vp_cifar.get_config("smoke")
    config.data.data_dir = str(tmp_path / "tfds")
    os.makedirs(config.data.data_dir)
    _refused(config, tmp_path, data_lib.DatasetNotFoundError, r"not prepared")
    assert not os.listdir(config.data.data_dir)


def test_an_image_shape_the_network_cannot_take(tmp_path):
    config = digits.get_config("smoke")
    config.model.ch_mult = (1, 2, 2, 2, 2)     # halves 8x8 images four times
    _refused(config, tmp_path, ValueError, r"halves the image 4 times, so height and width must "
                                           r"be divisible by 16; got 8x8")


def test_labels_beyond_the_model_classes(tmp_path):
    config = digits.get_config("smoke")
    config.model.num_classes = 5
    _refused(config, tmp_path, ValueError, r"labels 0\.\.9, but model\.num_classes=5.*Set "
                                           r"model\.num_classes=10")


def test_an_unwritable_workdir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    config = toy_2d.get_config("smoke")
    with pytest.raises(PermissionError, match=r"Cannot write to --workdir .*a_file/run .*choose "
                                              r"a folder you can write to"):
        train.train_and_evaluate(config, str(blocker / "run"))
    assert blocker.read_text() == "not a folder"


def test_nan_or_negative_labels_in_in_memory_data():
    x = np.zeros((5, 2), np.float32)
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"1 of 5 examples have NaN or infinite values \(the "
                                         r"first at index 3\)"):
        data_lib.ArraySource(x, np.zeros(5, np.int64))
    with pytest.raises(ValueError, match=r"Labels must be >= 0, got -1 \(index 2\)"):
        data_lib.ArraySource(np.zeros((5, 2), np.float32), np.array([0, 1, -1, 0, 0]))


def test_cli_reports_an_unwritable_workdir_in_one_line(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = subprocess.run([sys.executable, os.path.join(root, "scripts", "run.py"),
                             f"--config={os.path.join(root, 'experiments', 'toy_2d.py')}:smoke",
                             f"--workdir={blocker / 'run'}", "--compilation_cache_dir="],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "Error (PermissionError): Cannot write to --workdir" in result.stderr


@pytest.mark.slow   # 10-15 s on 2 cores, on the worker that holds the smoke runs
def test_resuming_with_another_network_changes_nothing(smoke_run, tmp_path):
    """The checkpoint stays, and so does the config.json that its error message points to."""
    import shutil

    config, workdir = smoke_run("toy_2d")
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    before = _files(copy)
    config.model.hidden = 2 * config.model.hidden
    config.training.n_iters *= 2
    with pytest.raises(checkpointing.CheckpointMismatchError,
                       match=r"does not fit this config's model / optimizer .* use the config "
                             r"that wrote it \(its workdir's config\.json\)"):
        train.train_and_evaluate(config, copy)
    assert _files(copy) == before


# orbax's reader leaves asyncio callbacks behind when tensorstore fails (harmless).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.slow   # 11 s each on 2 cores; test_train.py reads a corrupted checkpoint by default
@pytest.mark.parametrize("mode", ["sample", "evaluate"])
def test_sampling_or_evaluating_a_corrupted_checkpoint_writes_nothing(mode, smoke_run, tmp_path):
    import shutil

    from tests.test_train import _corrupt

    config, workdir = smoke_run("toy_2d")
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    _corrupt(copy, config.training.n_iters)
    before = _files(copy)
    with pytest.raises(checkpointing.CheckpointUnreadableError,
                       match=rf"checkpoints/{config.training.n_iters} is unreadable"):
        getattr(train, mode)(config, copy)
    assert _files(copy) == before


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("mode", ["sample", "evaluate"])
def test_sampling_or_evaluating_without_a_checkpoint(mode, tmp_path):
    config = toy_2d.get_config("smoke")
    with pytest.raises(FileNotFoundError, match=r"No checkpoint in .*run/checkpoints: train"):
        getattr(train, mode)(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
