"""Bad input stops `train_and_evaluate` with one clear message, before anything is written.

(Config keys: tests/test_config_checks.py; names of SDEs / models / samplers: test_train.py;
datasets: test_datasets.py; checkpoints of another config or corrupted: test_train.py.)
"""

import os

import numpy as np
import pytest

from diffusion import datasets, train
from experiments import digits, toy_2d


def _refused(config, tmp_path, error, match):
    workdir = tmp_path / "run"
    with pytest.raises(error, match=match):
        train.train_and_evaluate(config, str(workdir))
    assert not workdir.exists() or not any(workdir.iterdir()), "a refused run wrote files"


@pytest.mark.parametrize("key, value, match", [
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
])
def test_non_positive_or_indivisible_sizes(key, value, match, tmp_path):
    config = toy_2d.get_config("smoke")
    section, field = key.split(".")
    config[section][field] = value
    _refused(config, tmp_path, ValueError, match)


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
        datasets.ArraySource(x, np.zeros(5, np.int64))
    with pytest.raises(ValueError, match=r"Labels must be >= 0, got -1 \(index 2\)"):
        datasets.ArraySource(np.zeros((5, 2), np.float32), np.array([0, 1, -1, 0, 0]))


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
