"""Multi-host runs: 2 processes x 2 CPU devices (jax.distributed with a local coordinator, gloo
collectives) train -> checkpoint -> resume -> sample -> eval through scripts/run.py, and give
the same parameters and samples as 1 process x 4 devices on the same global batch."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from diffusion import train, train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(config_arg: str, workdir: str, mode: str, *overrides: str) -> list[str]:
    """Runs `scripts/run.py` as processes 0 and 1 of one run; returns their outputs. The runs
    of one test share a compilation cache beside the workdir (the later ones reuse programs)."""
    port = _free_port()
    cache = os.path.join(os.path.dirname(workdir), "jax_cache")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "scripts", "run.py"), f"--config={config_arg}",
         f"--workdir={workdir}", f"--mode={mode}", f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={i}", f"--compilation_cache_dir={cache}",
         *overrides],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        outs.append(out)
        assert proc.returncode == 0, out[-4000:]
    return outs


def _check_same_run(name: str, tmp_path, fid: bool = False):
    """`fid`: the eval runs FID / KID as well (the Inception network split over both processes'
    devices, the reference statistics computed by both and written by process 0)."""
    import importlib

    config = importlib.import_module(f"experiments.{name}").get_config("smoke")
    single = str(tmp_path / "one_process")     # 1 process x 4 devices, n_iters steps at once
    train.train_and_evaluate(config, single)
    n = config.training.n_iters
    config_arg = os.path.join(ROOT, "experiments", f"{name}.py") + ":smoke"
    multi = str(tmp_path / "two_processes")
    # Train half, then resume to the end (a new pair of processes restores collectively).
    outs = _run_two_processes(config_arg, multi, "train", f"--config.training.n_iters={n // 2}",
                              f"--config.training.snapshot_freq={n // 2}")
    assert "2 process(es), 4 device(s)" in outs[0] and "starting from scratch" in outs[0]
    outs = _run_two_processes(config_arg, multi, "train")
    assert f"resuming from step {n // 2}" in outs[0] and f"resuming from step {n // 2}" in outs[1]
    assert f"step {n}/{n}" in outs[0] and f"step {n}/{n}" not in outs[1]   # process 0 logs
    _run_two_processes(config_arg, multi, "sample")
    _run_two_processes(config_arg, multi, "eval", f"--config.eval.enable_fid={fid}")

    mesh = train.data_mesh()
    a = train_state.restore_latest(train.build(config), single, mesh)
    b = train_state.restore_latest(train.build(config), multi, mesh)
    assert int(a.step) == int(b.step) == n
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    moved = jax.tree.map(lambda p, e: float(np.max(np.abs(np.asarray(p) - np.asarray(e)))),
                         a.params, train_state.init_train_state(train.build(config), mesh).params)
    assert max(jax.tree.leaves(moved)) > 1e-5          # training changed the parameters

    config.eval.enable_fid = fid
    path = train.sample(config, single)
    with np.load(path) as f, np.load(os.path.join(multi, "samples", f"step_{n}.npz")) as g:
        np.testing.assert_allclose(f["samples"], g["samples"], rtol=1e-4, atol=1e-4)
        assert int(f["nfe"]) == int(g["nfe"])
    with open(os.path.join(multi, "eval.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 1                           # written once, by process 0
    expected = train.evaluate(config, single)
    assert records[0]["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-5)
    if fid:
        assert records[0]["fid"] == pytest.approx(expected["fid"], rel=1e-3)
        assert records[0]["kid"] == pytest.approx(expected["kid"], rel=1e-3, abs=1e-6)
        assert len(os.listdir(os.path.join(multi, "fid_stats"))) == 1
    with open(os.path.join(multi, "train.jsonl")) as f:
        assert sum('"loss"' in line for line in f) >= 2   # both runs logged, once each


# Four pairs of processes, each importing JAX and compiling (about 45 s on 2 cores): with the
# slow set, which CI runs after the default suite.
@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_toy(tmp_path):
    _check_same_run("toy_2d", tmp_path)


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_digits(tmp_path, inception_weights):
    _check_same_run("digits", tmp_path, fid=True)
