"""The data-parallel train step, the training loop, checkpoint resume and preemption."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from diffusion import checkpointing, evaluate, losses, models, train, train_state
from diffusion import sde as sde_lib
from diffusion.models import parameterization
from experiments import toy_2d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_setup(n_jit=2, batch=16):
    config = toy_2d.get_config("smoke")
    net = models.get_model(config)
    sde = sde_lib.VPSDE()
    score_model = parameterization.make_score_model(net, sde)
    loss_fn = losses.make_dsm_loss(sde, score_model, reduce_mean=True)
    # Plain SGD: Adam's first steps are sign(grad) * lr, which turns float rounding in the
    # gradients of near-zero entries into lr-sized differences; SGD compares gradients as they are.
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))
    x = jax.random.normal(jax.random.key(0), (n_jit, batch, 2))
    state = train.create_train_state(jax.random.key(1), net, tx, x[0])
    return loss_fn, tx, state, {"x": x}


def _run(step_fn, state, batch, calls=2):
    key = jax.random.key(3)
    for _ in range(calls):
        state, metrics = step_fn(state, batch, key)
    return state, metrics


# 30 s on 2 cores (three programs compiled); the default suite checks 1 device against 4 on the
# whole loop (test_seeds.py), this the step against jax.pmap.
@pytest.mark.slow
def test_shard_map_step_equals_pmap_and_single_device():
    assert jax.device_count() == 4, "conftest sets 4 fake CPU devices"
    loss_fn, tx, state, batch = _tiny_setup()
    n_jit, b = batch["x"].shape[:2]

    single = train.make_train_step(loss_fn, tx, 0.9, Mesh(np.asarray(jax.devices()[:1]), ("data",)))
    mapped = train.make_train_step(loss_fn, tx, 0.9, train.data_mesh())
    copy = lambda s: jax.tree.map(jnp.array, s)
    s_single, m_single = _run(single, copy(state), batch)
    s_mapped, m_mapped = _run(mapped, copy(state), train.put_batch(
        {"x": np.asarray(batch["x"])}, train.data_mesh()))

    device_step = train.make_device_step(loss_fn, tx, 0.9, "data")
    pmapped = jax.pmap(device_step, axis_name="data", in_axes=(None, 0, None))
    per_device = {"x": batch["x"].reshape(n_jit, 4, b // 4, 2).transpose(1, 0, 2, 3)}
    key = jax.random.key(3)
    s_pmap = copy(state)
    for _ in range(2):
        s_pmap, m_pmap = pmapped(s_pmap, per_device, key)
        s_pmap = jax.tree.map(lambda a: a[0], s_pmap)

    assert int(s_mapped.step) == int(s_single.step) == int(s_pmap.step) == 4
    for other in (s_mapped, s_pmap):
        for a, c in zip(jax.tree.leaves(s_single.params), jax.tree.leaves(other.params),
                        strict=True):
            np.testing.assert_allclose(a, c, rtol=2e-5, atol=2e-6)
        for a, c in zip(jax.tree.leaves(s_single.ema_params), jax.tree.leaves(other.ema_params),
                        strict=True):
            np.testing.assert_allclose(a, c, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(m_single["loss"], m_mapped["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_single["loss"], m_pmap["loss"][0], rtol=1e-5)
    # The step changed the parameters (so the comparison above is not vacuous).
    diff = jax.tree.map(lambda a, c: float(jnp.max(jnp.abs(a - c))), state.params, s_single.params)
    assert max(jax.tree.leaves(diff)) > 1e-4


def test_n_jitted_steps_do_not_change_the_result():
    loss_fn, tx, state, batch = _tiny_setup(n_jit=2)
    mesh = train.data_mesh()
    step = train.make_train_step(loss_fn, tx, 0.9, mesh)
    copy = lambda s: jax.tree.map(jnp.array, s)
    s_two, _ = _run(step, copy(state), train.put_batch({"x": np.asarray(batch["x"])}, mesh), 1)
    s_one = copy(state)
    for j in range(2):
        s_one, _ = step(s_one, train.put_batch({"x": np.asarray(batch["x"][j:j + 1])}, mesh),
                        jax.random.key(3))
    for a, c in zip(jax.tree.leaves(s_two.params), jax.tree.leaves(s_one.params), strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)


# Compiles the step twice (about 10 s on 2 cores): with the slow set.
@pytest.mark.slow
def test_unrolled_and_scanned_n_jitted_steps_give_the_same_state():
    """training.unroll: the Python loop and lax.scan over 3 steps a call, twice, on 4 devices;
    "auto" is the loop on these CPU devices. The same state (step, params, EMA, optimizer
    state) and metrics: bit for bit at conftest's XLA optimisation level 0, within 9e-8 at
    XLA:CPU's default level (fusion may reassociate sums). A bad value is refused by name."""
    loss_fn, tx, state, batch = _tiny_setup(n_jit=3)
    mesh = train.data_mesh()
    batch = train.put_batch({"x": np.asarray(batch["x"])}, mesh)
    copy = lambda s: jax.tree.map(jnp.array, s)
    runs = {u: _run(train.make_train_step(loss_fn, tx, 0.9, mesh, unroll=u), copy(state), batch)
            for u in ("unroll", "scan", "auto")}
    (s_unroll, m_unroll), (s_scan, m_scan) = runs["unroll"], runs["scan"]
    assert int(s_unroll.step) == int(s_scan.step) == 6 and m_scan["loss"].shape == (3,)
    for a, c in zip(jax.tree.leaves(s_unroll), jax.tree.leaves(s_scan), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-6, atol=1e-7)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(runs["auto"]),
                 jax.device_get(runs["unroll"]))
    np.testing.assert_allclose(m_unroll["loss"], m_scan["loss"], rtol=1e-6)
    diff = jax.tree.map(lambda a, c: float(jnp.max(jnp.abs(a - c))), state.params, s_scan.params)
    assert max(jax.tree.leaves(diff)) > 1e-4                  # the steps did change the params
    lowered = {u: train.make_train_step(loss_fn, tx, 0.9, mesh, unroll=u).lower(
        state, batch, jax.random.key(3)).as_text() for u in ("unroll", "scan")}
    dots = {u: text.count("stablehlo.dot_general") for u, text in lowered.items()}
    assert dots["scan"] > 0 and dots["unroll"] == 3 * dots["scan"]   # traced 3 times vs once
    with pytest.raises(ValueError, match="unroll must be 'auto', 'unroll' or 'scan'"):
        train.make_train_step(loss_fn, tx, 0.9, mesh, unroll="yes")
    config = toy_2d.get_config("smoke")
    config.training.unroll = "yes"
    with pytest.raises(ValueError, match=r"training.unroll must be one of \['auto', 'unroll', "):
        train.build(config)


def _params(workdir, config):
    return train_state.restore_latest(train.build(config), workdir, train.data_mesh())


def _assert_same_state(a, b):
    assert int(a.step) == int(b.step)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_train_resume_equals_uninterrupted(tmp_path):
    config = toy_2d.get_config("smoke")
    config.training.snapshot_sampling = False
    config.training.n_iters = 8
    full = train.train_and_evaluate(config, str(tmp_path / "full"))
    assert int(full.step) == 8

    config.training.n_iters = 4
    part = train.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert int(part.step) == 4
    config.training.n_iters = 8
    resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
    _assert_same_state(jax.device_get(full), jax.device_get(resumed))
    _assert_same_state(_params(str(tmp_path / "full"), config),
                       _params(str(tmp_path / "resumed"), config))
    lines = (tmp_path / "resumed" / "train.jsonl").read_text().splitlines()
    assert lines and '"loss"' in lines[0]


def test_two_runs_with_the_same_seed_are_bit_identical(smoke_run, tmp_path):
    """Same config, seed and device count on CPU: the same params to the last bit, and the
    same data order (the batch of each step is a function of the seed and the step)."""
    config, workdir = smoke_run("toy_2d")
    again = train.train_and_evaluate(config, str(tmp_path / "again"))
    first = train_state.restore_latest(train.build(config), workdir, train.data_mesh())
    assert int(first.step) == int(again.step) == config.training.n_iters
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(first), jax.device_get(again))
    def logged(path):   # every logged loss and gradient norm, without the wall time
        return [{k: v for k, v in json.loads(line).items() if k != "time"}
                for line in open(path).read().splitlines()]

    assert logged(tmp_path / "again" / "train.jsonl") == logged(os.path.join(workdir,
                                                                              "train.jsonl"))


@pytest.mark.slow   # 16 s on 2 cores; resume = uninterrupted runs by default (below)
def test_sigterm_saves_and_resume_matches_uninterrupted(tmp_path):
    """Kills a real run with SIGTERM, resumes it, and compares with an uninterrupted run."""
    workdir = tmp_path / "killed"
    args = [sys.executable, os.path.join(ROOT, "scripts", "run.py"),
            f"--config={os.path.join(ROOT, 'experiments', 'toy_2d.py')}:smoke",
            f"--workdir={workdir}", "--config.training.n_iters=100000",
            "--config.training.snapshot_freq=100000", "--config.training.log_freq=2",
            "--config.training.eval_freq=0", "--config.training.snapshot_sampling=False"]
    # conftest's XLA_FLAGS (4 devices, optimisation level 0): the killed run then compiles the
    # same programs as the in-process runs it is compared with, bit for bit.
    env = dict(os.environ)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    log = workdir / "train.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "preemption" in out
    killed_at = _params(str(workdir), toy_2d.get_config("smoke"))
    k = int(killed_at.step)
    assert 6 <= k < 100000

    config = toy_2d.get_config("smoke")
    config.training.snapshot_sampling = False
    config.training.n_iters = k + 4
    resumed = train.train_and_evaluate(config, str(workdir))
    full = train.train_and_evaluate(config, str(tmp_path / "full"))
    _assert_same_state(jax.device_get(full), jax.device_get(resumed))


def test_non_finite_loss_stops_without_saving(tmp_path):
    config = toy_2d.get_config("smoke")
    config.training.snapshot_sampling = False
    config.training.n_iters = 2
    train.train_and_evaluate(config, str(tmp_path))
    config.training.n_iters = 4
    config.optim.lr = float("nan")
    with pytest.raises(FloatingPointError, match="last checkpoint: step 2"):
        train.train_and_evaluate(config, str(tmp_path))
    assert int(_params(str(tmp_path), config).step) == 2


def test_n_iters_not_a_multiple_of_n_jitted_steps_is_one_clear_error(tmp_path):
    config = toy_2d.get_config("smoke")
    config.training.n_jitted_steps = 3
    with pytest.raises(ValueError, match="multiple of training.n_jitted_steps"):
        train.train_and_evaluate(config, str(tmp_path))


def _cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "run.py"), *args],
                          capture_output=True, text=True, timeout=300)


def test_cli_reports_bad_input_in_one_line(tmp_path):
    result = _cli(f"--config={os.path.join(ROOT, 'experiments', 'toy_2d.py')}:smoke",
                  f"--workdir={tmp_path}", "--config.sde.name=vpp")
    assert result.returncode != 0
    assert "config.sde.name must be one of" in result.stderr
    assert "Traceback" not in result.stderr
    result = _cli(f"--config={os.path.join(ROOT, 'experiments', 'toy_2d.py')}:smoke",
                  f"--workdir={tmp_path}", "--config.model.hiden=64")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert ("a --config.* override names a key the config does not have ('hiden' Did you mean "
            "\"hidden\" instead of \"hiden\"?; overrides given: --config.model.hiden)"
            ) in result.stderr


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_decay_constant_or_warmed_up(warmup):
    """score_sde's EMA: the constant ema_rate from the first update; `model.ema_warmup` (ours):
    min(ema_rate, (1 + n) / (10 + n))."""
    loss_fn, tx, state, batch = _tiny_setup(n_jit=1)
    mesh = train.data_mesh()
    step = train.make_train_step(loss_fn, tx, 0.999, mesh, ema_warmup=warmup)
    old = jax.tree.map(np.asarray, state.ema_params)
    new, _ = step(jax.tree.map(jnp.array, state), train.put_batch(
        {"x": np.asarray(batch["x"])}, mesh), jax.random.key(3))
    decay = 2.0 / 11.0 if warmup else 0.999   # after n = 1 update
    for e, e0, p in zip(jax.tree.leaves(new.ema_params), jax.tree.leaves(old),
                        jax.tree.leaves(new.params), strict=True):
        np.testing.assert_allclose(e, decay * e0 + (1 - decay) * np.asarray(p), rtol=1e-5,
                                   atol=1e-7)
    assert float(train.ema_decay(0.999, jnp.asarray(10**6), warmup)) == np.float32(0.999)


def test_bits_per_dim_protocol_passes_over_the_whole_split(monkeypatch):
    """eval.bpd_num_batches=0, bpd_num_repeats=2: every eval example twice, with two different
    dequantization noises, in batches padded to the compiled size (score_sde's 5 passes over the
    test set). The ODE solve is replaced by a stand-in that records what it is given."""
    from experiments import digits

    config = digits.get_config("smoke")
    config.eval.bpd_num_batches, config.eval.bpd_num_repeats = 0, 2
    exp = train.build(config)
    seen, positions = [], []

    def fake_log_likelihood(params, key, batch):
        x = np.asarray(batch["x"])
        seen.append(x)
        positions.append(np.asarray(batch["index"]))
        return jnp.asarray(-np.sum(x**2, axis=(1, 2, 3))), jnp.ones((4,), jnp.int32)

    monkeypatch.setattr(evaluate, "make_log_likelihood", lambda *args: fake_log_likelihood)
    record = evaluate.eval_likelihood(exp, {}, train.data_mesh())
    n = len(exp.dataset.eval)
    assert record["likelihood_examples"] == 2 * n
    assert all(len(x) == config.eval.batch_size for x in seen)        # padded batches
    # Each example's key (its Hutchinson probe) is that of its stream position p n + i.
    np.testing.assert_array_equal(np.concatenate(positions)[:2 * n], np.arange(2 * n))
    x = np.concatenate(seen)[:2 * n]      # the last batch's padding comes after the 2n examples
    levels = np.floor((x + 1) / 2 * exp.dataset.num_levels)           # undo dequantization
    first, second = levels[:n].reshape(n, -1), levels[n:].reshape(n, -1)
    stored = np.stack([np.asarray(exp.dataset.eval[i]["x"]) for i in range(n)]).reshape(n, -1)
    for one_pass in (first, second):   # each pass holds every stored example once
        assert sorted(map(bytes, one_pass.astype(np.uint8))) == sorted(map(bytes, stored))
    assert not np.allclose(np.sort(x[:n].ravel()), np.sort(x[n:].ravel()))   # fresh noise
    bits = -np.sum(x**2, axis=(1, 2, 3)) / np.prod(exp.dataset.data_shape)
    expected = -bits / np.log(2) + np.log2(exp.dataset.num_levels / 2.0)
    assert record["bpd"] == pytest.approx(float(np.mean(expected)), rel=1e-5)


def test_restoring_a_checkpoint_of_another_config_names_the_first_differing_array(smoke_run):
    """orbax alone would read a slice of the larger stored array into the smaller one."""
    config, workdir = smoke_run("toy_2d")
    config.model.hidden = 16
    with pytest.raises(checkpointing.CheckpointError,
                       match=r"does not fit this config's model / optimizer \(\d+ arrays differ; "
                             r"first ema_params/Dense_0/bias: \(\(32,\), 'float32'\) in the "
                             r"checkpoint, \(\(16,\), 'float32'\) for this config\)"):
        train_state.restore_latest(train.build(config), workdir, train.data_mesh())
    config, _ = smoke_run("toy_2d")
    config.optim.grad_clip = -1.0        # no clipping: another optimizer state
    with pytest.raises(checkpointing.CheckpointError, match=r"first opt_state/0/count: absent in "
                                                            r"the checkpoint"):
        train_state.restore_latest(train.build(config), workdir, train.data_mesh())


# orbax's reader leaves an asyncio callback behind when tensorstore fails (harmless).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_corrupted_checkpoint_is_reported_as_unreadable(smoke_run, tmp_path):
    import shutil

    config, workdir = smoke_run("toy_2d")
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    step = str(config.training.n_iters)
    _corrupt(copy, int(step))
    with pytest.raises(checkpointing.CheckpointError,
                       match=rf"checkpoints/{step} is unreadable \(corrupted, or its files are "
                             rf"incomplete\).*Checkpoints in this workdir: steps \[2, {step}\]"):
        train_state.restore_latest(train.build(config), copy, train.data_mesh())
    # The untouched original still restores.
    assert int(train_state.restore_latest(train.build(config), workdir,
                                          train.data_mesh()).step) == int(step)


def _corrupt(workdir: str, step: int) -> None:
    """Overwrites every array-data file of checkpoint `step` (its metadata stays readable)."""
    root = os.path.join(workdir, "checkpoints", str(step))
    data_files = [os.path.join(r, f) for r, _, names in os.walk(root) for f in names
                  if os.sep + "d" + os.sep in os.path.join(r, f)]
    assert data_files
    for path in data_files:
        with open(path, "wb") as f:
            f.write(b"not a checkpoint")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_training_skips_an_unreadable_latest_checkpoint_and_redoes_its_steps(smoke_run,
                                                                            tmp_path, capsys):
    """A corrupted newest checkpoint is reported, moved aside (kept) and skipped for the one
    before it; the steps after that are redone exactly, so the result equals the original."""
    import shutil

    config, workdir = smoke_run("toy_2d")
    n = config.training.n_iters
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    _corrupt(copy, n)
    config.training.snapshot_sampling = False
    state = train.train_and_evaluate(config, copy)
    out = capsys.readouterr().out
    assert f"checkpoints/{n} is unreadable" in out and "resuming from step 2" in out
    assert os.path.isdir(os.path.join(copy, "checkpoints_unreadable", str(n)))   # kept aside
    original = train_state.restore_latest(train.build(config), workdir, train.data_mesh())
    _assert_same_state(jax.device_get(original), jax.device_get(state))
    _assert_same_state(original, _params(copy, config))


class _DiskFullAt:
    """Every file write past `limit` bytes fails (EFBIG) while active: RLIMIT_FSIZE with SIGXFSZ
    ignored, the operating system's own refusal, as a full disk refuses a write."""

    def __init__(self, limit: int):
        import resource

        self.resource, self.limit = resource, limit

    def __enter__(self):
        self.old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        self.old_limit = self.resource.getrlimit(self.resource.RLIMIT_FSIZE)
        self.resource.setrlimit(self.resource.RLIMIT_FSIZE, (self.limit, self.old_limit[1]))

    def __exit__(self, *exc):
        self.resource.setrlimit(self.resource.RLIMIT_FSIZE, self.old_limit)
        signal.signal(signal.SIGXFSZ, self.old_handler)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_full_disk_during_a_save_is_reported_and_deletes_no_checkpoint(smoke_run, tmp_path,
                                                                         capsys):
    """The disk fills up while orbax writes a checkpoint (keep_checkpoints=1, so a save that
    went on to its clean-up would delete the older ones): the run stops with one message naming
    the cause and the step to resume from, every complete checkpoint stays, and the rerun
    resumes from the newest of them."""
    import shutil

    config, workdir = smoke_run("toy_2d")
    n = config.training.n_iters
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    limit = 32 * 1024
    sizes = [os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(copy) for f in fs]
    assert max(sizes) > limit   # a checkpoint cannot be written under the limit
    for name in ("train.jsonl", "config.json"):
        assert os.path.getsize(os.path.join(copy, name)) < limit // 2   # the logs can
    config.training.update(snapshot_sampling=False, keep_checkpoints=1, snapshot_freq=2,
                           n_iters=n + 4, eval_freq=0)
    with _DiskFullAt(limit), pytest.raises(
            checkpointing.CheckpointSaveError,
            match=rf"Saving a checkpoint to .*checkpoints failed: File too large \(errno 27\)\. "
                  rf"No checkpoint was deleted: the complete ones are steps \[2, {n}\]; the "
                  rf"incomplete write \({n + 2}\.orbax-checkpoint-tmp\) is ignored when "
                  rf"resuming\. Free space on that disk .* resume from step {n}\."):
        train.train_and_evaluate(config, copy)
    assert checkpointing.complete_steps(copy) == [2, n]
    restored = train_state.restore_latest(train.build(config), copy, train.data_mesh())
    assert int(restored.step) == n
    capsys.readouterr()
    state = train.train_and_evaluate(config, copy)   # the disk has room again
    assert f"resuming from step {n}" in capsys.readouterr().out
    assert int(state.step) == n + 4 and checkpointing.complete_steps(copy) == [n + 4]


def test_resuming_with_an_n_jitted_steps_that_cannot_reach_n_iters_is_refused(smoke_run,
                                                                            tmp_path):
    import shutil

    config, workdir = smoke_run("toy_2d")
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    start = config.training.n_iters                       # the checkpoint's step (4)
    config.training.n_jitted_steps = 3
    config.training.n_iters = 9                           # 9 - 4 = 5 steps: not in calls of 3
    config.training.log_freq = config.training.snapshot_freq = config.training.eval_freq = 3
    with pytest.raises(ValueError, match=rf"checkpoint at step {start} cannot reach "
                                         rf"training.n_iters=9 in calls of "
                                         rf"training.n_jitted_steps=3 steps"):
        train.train_and_evaluate(config, copy)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_preemption_watcher_turns_a_signal_into_a_save_request(sig):
    """The loop polls `requested` (then saves and stops); a second signal stops at once."""
    previous = signal.getsignal(sig)
    watcher = checkpointing.PreemptionWatcher()
    try:
        assert signal.getsignal(sig) == watcher._handle and not watcher.requested
        os.kill(os.getpid(), sig)
        deadline = time.time() + 5
        while not watcher.requested and time.time() < deadline:
            time.sleep(0.01)
        assert watcher.requested
        with pytest.raises(KeyboardInterrupt, match="again"):
            os.kill(os.getpid(), sig)
            time.sleep(1)
    finally:
        watcher.close()
    assert signal.getsignal(sig) == previous                 # previous handler restored
