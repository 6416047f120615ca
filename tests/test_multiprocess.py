"""Multi-host runs: 2 processes x 2 CPU devices (jax.distributed with a local coordinator, gloo
collectives) train -> checkpoint -> resume -> sample -> eval through scripts/run.py, and give
the same parameters and samples as 1 process x 4 devices on the same global batch."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from diffusion import checkpointing, train, train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config_arg: str, workdir: str, mode: str, *overrides: str,
            script: list[str] | None = None) -> tuple[list[subprocess.Popen], list[list[str]]]:
    """Starts `scripts/run.py` (or `script`, a command taking the same flags) as processes 0
    and 1 of one run; returns the processes and their output lines, which threads collect as
    they come. The runs of one test share a compilation cache beside the workdir (the later
    ones reuse programs)."""
    port = _free_port()
    cache = os.path.join(os.path.dirname(workdir), "jax_cache")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    script = script or [os.path.join(ROOT, "scripts", "run.py")]
    procs = [subprocess.Popen(
        [sys.executable, *script, f"--config={config_arg}",
         f"--workdir={workdir}", f"--mode={mode}", f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={i}", f"--compilation_cache_dir={cache}",
         *overrides],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    lines = [[], []]
    for proc, out in zip(procs, lines, strict=True):
        threading.Thread(target=lambda p=proc, o=out: o.extend(p.stdout), daemon=True).start()
    return procs, lines


def _wait(procs: list[subprocess.Popen], lines: list[list[str]], timeout: float,
          returncode: int | None = 0) -> list[str]:
    """Both processes' outputs once both have exited (within `timeout` seconds, else both are
    killed and the test fails); asserts their exit status unless `returncode` is None."""
    deadline = time.time() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"the two processes did not exit within {timeout} s:\n"
                        + "\n".join("".join(out)[-3000:] for out in lines))
    time.sleep(0.2)   # the reader threads take the last lines
    outs = ["".join(out) for out in lines]
    if returncode is not None:
        for proc, out in zip(procs, outs, strict=True):
            assert proc.returncode == returncode, out[-4000:]
    return outs


def _run_two_processes(config_arg: str, workdir: str, mode: str, *overrides: str) -> list[str]:
    """Runs `scripts/run.py` as processes 0 and 1 of one run; returns their outputs."""
    return _wait(*_launch(config_arg, workdir, mode, *overrides), timeout=300)


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
        # Sample n's noise comes from its index (diffusion/rng.py): the same on 2 processes x
        # 2 devices as on 1 x 4, up to float rounding (the smoke models' samples reach ~100).
        np.testing.assert_allclose(f["samples"], g["samples"], rtol=1e-5, atol=1e-5)
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


# --------------------------------------------------------------------------- preemption

_TOY = os.path.join(ROOT, "experiments", "toy_2d.py") + ":smoke"
_LONG = 200   # steps of the preemption runs (about 15 steps/s): a signal after step 5 lands mid-way


def _long_run(n_iters: int) -> list[str]:
    """Overrides for a toy run of `n_iters` steps that logs every step (process 0's stdout
    shows that training has started) and saves only at the end, or on a preemption."""
    return [f"--config.training.n_iters={n_iters}", "--config.training.log_freq=1",
            f"--config.training.snapshot_freq={n_iters}", "--config.training.eval_freq=0",
            "--config.training.snapshot_sampling=False"]


def _restore(workdir: str):
    import importlib

    config = importlib.import_module("experiments.toy_2d").get_config("smoke")
    return jax.device_get(train_state.restore_latest(train.build(config), workdir,
                                                     train.data_mesh()))


@pytest.fixture(scope="module")
def uninterrupted_toy(tmp_path_factory):
    """(folder, final state) of an uninterrupted 2-process toy run of _LONG steps; the tests'
    runs go in the same folder and share its compilation cache."""
    root = str(tmp_path_factory.mktemp("preemption"))
    workdir = os.path.join(root, "uninterrupted")
    _run_two_processes(_TOY, workdir, "train", *_long_run(_LONG))
    return root, _restore(workdir)


# Each case: one interrupted pair of processes and (SIGTERM) its resumed pair, plus the module's
# uninterrupted pair once: 34 s (the pair), 45 s per SIGTERM case, 21 s for SIGINT on 2 cores
# with some other load (up to twice that under heavy load).
@pytest.mark.slow
@pytest.mark.parametrize("signalled, sig", [(1, signal.SIGTERM), (0, signal.SIGTERM),
                                            (1, signal.SIGINT)])
def test_a_signal_to_one_process_stops_both_at_one_step(uninterrupted_toy, signalled, sig):
    """Only process `signalled` gets the signal, mid-training. Both exit soon after with the
    same message naming one step, whose checkpoint is complete; rerunning both resumes from it
    and ends with the parameters of the uninterrupted run, bit for bit (SIGTERM cases; SIGINT
    takes the same path from the handler on)."""
    root, uninterrupted = uninterrupted_toy
    workdir = os.path.join(root, f"{signal.Signals(sig).name}_to_process_{signalled}")
    procs, lines = _launch(_TOY, workdir, "train", *_long_run(_LONG))
    deadline = time.time() + 240
    while not any(int(m.group(1)) >= 5 for m in map(re.compile(r"step (\d+)/").match,
                                                     list(lines[0])) if m):
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            pytest.fail("training did not reach step 5:\n" + "".join(lines[0])[-3000:])
        time.sleep(0.05)
    procs[signalled].send_signal(sig)
    t0 = time.time()
    outs = _wait(procs, lines, timeout=120)
    stopped_s = time.time() - t0

    saved = [re.findall(r"Saved step (\d+) after a preemption signal", out) for out in outs]
    assert len(saved[0]) == 1 and saved[0] == saved[1], outs
    step = int(saved[0][0])
    assert 5 < step < _LONG and stopped_s < 60, (step, stopped_s)
    print(f"signal at step >= 5 of process 0's log; both stopped at step {step}, "
          f"{stopped_s:.1f} s after the signal")
    assert f"Received signal {int(sig)}" in outs[signalled]
    assert "Received signal" not in outs[1 - signalled]
    assert checkpointing.complete_steps(workdir) == [step]
    assert os.listdir(checkpointing.checkpoint_dir(workdir)) == [str(step)]   # no partial write
    if sig != signal.SIGTERM:
        return
    outs = _run_two_processes(_TOY, workdir, "train", *_long_run(_LONG))
    assert all(f"resuming from step {step}" in out for out in outs), outs
    resumed = _restore(workdir)
    assert int(resumed.step) == int(uninterrupted.step) == _LONG
    jax.tree.map(np.testing.assert_array_equal, resumed, uninterrupted)


# Process 1 alone fetches non-finite losses from its third check on (steps 5-6).
_NAN_ON_PROCESS_1 = f"""
import runpy, sys
sys.argv[0] = {os.path.join(ROOT, "scripts", "run.py")!r}
if "--process_id=1" in sys.argv:
    sys.path.insert(0, {ROOT!r})
    import numpy as np
    from diffusion import train
    fetch, fetched = train.to_host, []
    def to_host(x):
        fetched.append(x)   # 2 metrics x 2 steps per check
        return fetch(x) * (np.nan if len(fetched) > 8 else 1.0)
    train.to_host = to_host
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow   # 22 s on 2 cores
def test_a_non_finite_loss_on_one_process_stops_both_without_saving(tmp_path):
    """Both processes stop at the same check with the same FloatingPointError message, and the
    bad state is not saved (the checkpoint of step 4 stays the latest)."""
    workdir = str(tmp_path / "run")
    overrides = ["--config.training.n_iters=8", "--config.training.log_freq=2",
                 "--config.training.snapshot_freq=4", "--config.training.eval_freq=0",
                 "--config.training.snapshot_sampling=False"]
    procs, lines = _launch(_TOY, workdir, "train", *overrides, script=["-c", _NAN_ON_PROCESS_1])
    outs = _wait(procs, lines, timeout=300, returncode=1)
    errors = [[line for line in out.splitlines() if line.startswith("Error (")] for out in outs]
    assert len(errors[0]) == 1 and errors[0] == errors[1], outs
    assert errors[0][0].startswith("Error (FloatingPointError): Non-finite loss in steps 5-6 on "
                                   "process(es) [1] (losses [nan nan]); the state was not saved "
                                   "(last checkpoint: step 4)")
    assert checkpointing.complete_steps(workdir) == [4]


# -------------------------------------------------------------------- a slow process
# Process 1 reaches its first training step 35 s after process 0, as when it compiles the step
# more slowly (a loaded machine, a compilation-cache hit on process 0 only).
_LATE_PROCESS_1 = f"""
import runpy, sys, time
sys.argv[0] = {os.path.join(ROOT, "scripts", "run.py")!r}
if "--process_id=1" in sys.argv:
    sys.path.insert(0, {ROOT!r})
    from diffusion import train
    make = train.make_train_step
    def make_train_step(*args, **kwargs):
        step, calls = make(*args, **kwargs), []
        def late_step(*a):
            if not calls:
                time.sleep(35)
            calls.append(1)
            return step(*a)
        return late_step
    train.make_train_step = make_train_step
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow   # 47 s on 2 cores
def test_a_process_35_s_late_at_the_first_step(tmp_path):
    """Gloo gives up on connecting a set of devices when a process arrives more than 30 s after
    another ("Gloo context initialization failed: DEADLINE_EXCEEDED"); `scripts/run.py` connects
    them right after start-up (`parallel.connect_processes`), so a late process is waited for."""
    workdir = str(tmp_path / "run")
    overrides = ["--config.training.n_iters=4", "--config.training.log_freq=2",
                 "--config.training.snapshot_freq=4", "--config.training.eval_freq=0",
                 "--config.training.snapshot_sampling=False"]
    procs, lines = _launch(_TOY, workdir, "train", *overrides, script=["-c", _LATE_PROCESS_1])
    outs = _wait(procs, lines, timeout=300)
    assert "step 4/4" in outs[0], outs
    assert checkpointing.complete_steps(workdir) == [4]
