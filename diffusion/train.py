"""Training: the train step mapped over the device mesh, and the training loop.

Read top to bottom, in the order of flax's examples: the EMA, one per-device train step, the
step mapped over the mesh with `jax.shard_map`, then `train_and_evaluate`. The config is read
only by `experiment.build`; everything here takes an `experiment.Experiment` or plain arguments.

Randomness: every example's noise in step s comes from fold_in(fold_in(key, s), example_index),
so a run's result does not depend on the number of devices, on `n_jitted_steps`, or on whether it
was interrupted and resumed.

The train state (`TrainState`, `create_train_state`, `init_train_state`, `restore_or_init`) lives
in `train_state.py`, evaluation in `evaluate.py` and sampling in `generate.py`; their entry
points are re-exported here (`from diffusion import train; train.evaluate(config, workdir)`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from diffusion import checkpointing, importance, losses
from diffusion import data as data_lib
from diffusion.evaluate import eval_loss
from diffusion.evaluate import evaluate as evaluate
from diffusion.experiment import Experiment as Experiment
from diffusion.experiment import build as build
from diffusion.files import atomic_write_text
from diffusion.generate import draw_samples, save_samples_png
from diffusion.generate import sample as sample
from diffusion.parallel import DATA_AXIS as DATA_AXIS
from diffusion.parallel import data_mesh as data_mesh
from diffusion.parallel import put_batch as put_batch
from diffusion.parallel import to_host
from diffusion.progress import hms
from diffusion.train_state import TrainState as TrainState
from diffusion.train_state import abstract_train_state, load_teacher, start_from_workdir
from diffusion.train_state import count_params as count_params
from diffusion.train_state import create_optimizer as create_optimizer
from diffusion.train_state import create_train_state as create_train_state
from diffusion.train_state import init_train_state as init_train_state
from diffusion.train_state import restore_or_init as restore_or_init

# --------------------------------------------------------------------------- the train step


def ema_decay(ema_rate: float, num_updates: jax.Array, warmup: bool = False) -> jax.Array:
    """EMA decay after `num_updates` updates: ema_rate (score_sde), or with `warmup`
    min(ema_rate, (1 + n) / (10 + n)).

    The warm-up (as in tf.train.ExponentialMovingAverage; our option, off in the paper configs)
    keeps the initial weights from dominating short runs: with a constant 0.999, 37% of the EMA
    is still the initialisation after 1,000 steps. For n >> 1 / (1 - ema_rate) both are ema_rate.
    """
    if not warmup:
        return jnp.asarray(ema_rate, jnp.float32)
    n = num_updates.astype(jnp.float32)
    return jnp.minimum(ema_rate, (1.0 + n) / (10.0 + n))


def _global_norm(tree) -> jax.Array:
    """The L2 norm of all leaves together (optax.global_norm, which optax now deprecates)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree)))


def make_device_step(loss_fn: losses.LossFn, tx: optax.GradientTransformation, ema_rate: float,
                     axis_name: str = DATA_AXIS, ema_warmup: bool = False,
                     unroll: bool = True) -> Callable:
    """The train step one device runs: `(state, batch, key) -> (state, metrics)`.

    batch: {"x": (n_jitted_steps, b, ...), ...}, this device's b examples of each of
    n_jitted_steps consecutive global batches, run one after another: by a Python loop unrolled
    when the step is traced (`unroll`; compile time grows with n_jitted_steps), else by
    `lax.scan` (one traced step; see below for why not on XLA:CPU). Both give the same state.
    Gradients and metrics are averaged over `axis_name` with `lax.pmean`. The noise of example j
    of this device in step s comes from fold_in(fold_in(key, s), axis_index * b + j).
    Returns metrics {"loss", "grad_norm"}, each (n_jitted_steps,).

    Losses with state (the attributes they carry): an importance-sampled loss
    (`losses.make_vlb_loss`) draws its levels from the history in `state.loss_state`, which
    every device then updates with the global batch's losses (`diffusion.importance`);
    consistency training is told the step (its curriculum); consistency distillation reads its
    target network and teacher from `state.loss_state` and updates the target after the
    optimizer step (`consistency_losses`).
    """

    importance_sampled = getattr(loss_fn, "importance_sampled", False)
    needs_step = getattr(loss_fn, "needs_step", False)     # consistency training's curriculum
    uses_state = getattr(loss_fn, "uses_state", False)     # consistency distillation's target

    def device_step(state: TrainState, batch, key):
        def one_step(state: TrainState, batch):
            b = batch["x"].shape[0]
            example_ids = jax.lax.axis_index(axis_name) * b + jnp.arange(b)
            step_key = jax.random.fold_in(key, state.step)
            keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(example_ids)

            probs = None
            if importance_sampled:
                probs = importance.level_probs(state.loss_state)

            def mean_loss(params):
                options = dict(level_probs=probs) if importance_sampled else {}
                if needs_step:
                    options["step"] = state.step
                if uses_state:
                    options["state"] = state.loss_state
                per_example = loss_fn(params, batch, keys, **options)
                return jnp.mean(per_example), per_example

            (loss, per_example), grads = jax.value_and_grad(mean_loss, has_aux=True)(
                state.params)
            loss, grads = jax.lax.pmean((loss, grads), axis_name)
            loss_state = state.loss_state
            if importance_sampled:
                # The unweighted losses N L_i of the whole global batch, in global order.
                levels = losses.draw_levels(keys, b, loss_fn.num_levels, probs)
                seen = per_example * loss_fn.num_levels * probs[levels]
                levels, seen = jax.lax.all_gather((levels, seen), axis_name, tiled=True)
                loss_state = importance.update_history(loss_state, levels, seen)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            if uses_state:
                loss_state = loss_fn.update_state(loss_state, params)
            decay = ema_decay(ema_rate, state.step + 1, ema_warmup)
            ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                                      state.ema_params, params)
            new_state = TrainState(step=state.step + 1, params=params, ema_params=ema_params,
                                   opt_state=opt_state, loss_state=loss_state)
            return new_state, {"loss": loss, "grad_norm": _global_norm(grads)}

        # XLA:CPU runs the weight-gradient convolutions of a U-Net inside a while loop ~40x
        # slower than at top level (measured 17 s vs 0.43 s per digits step): unrolled there.
        if not unroll:
            return jax.lax.scan(one_step, state, batch)
        metrics = []
        for j in range(batch["x"].shape[0]):
            state, m = one_step(state, jax.tree.map(lambda v, j=j: v[j], batch))
            metrics.append(m)
        return state, jax.tree.map(lambda *v: jnp.stack(v), *metrics)

    return device_step


def make_train_step(loss_fn: losses.LossFn, tx: optax.GradientTransformation, ema_rate: float,
                    mesh: Mesh, ema_warmup: bool = False, unroll: str = "auto") -> Callable:
    """The device step mapped over `mesh` with `jax.shard_map` and jitted, donating the state.

    `(state, batch, key) -> (state, metrics)`: state replicated, batch arrays
    (n_jitted_steps, global_batch, ...) sharded over the mesh's data axis on dimension 1.
    `unroll` (training.unroll): "unroll" the n_jitted_steps loop, "scan" it, or "auto": unroll on
    CPU devices, scan on GPU / TPU (compile time independent of n_jitted_steps).
    """
    if unroll not in ("auto", "unroll", "scan"):
        raise ValueError(f"unroll must be 'auto', 'unroll' or 'scan', got {unroll!r}")
    if unroll == "auto":
        unroll = "unroll" if mesh.devices.flat[0].platform == "cpu" else "scan"
    device_step = make_device_step(loss_fn, tx, ema_rate, DATA_AXIS, ema_warmup,
                                   unroll=unroll == "unroll")
    # check_vma=False gives pmap's semantics, which the device step is written for: the gradient
    # of the replicated params is this device's, and `lax.pmean` averages it. (With the default
    # check_vma=True, differentiating w.r.t. a replicated input already psums the cotangent, and
    # the pmean would then leave the gradient n_devices times too large.)
    mapped = jax.shard_map(device_step, mesh=mesh, in_specs=(P(), P(None, DATA_AXIS), P()),
                           out_specs=(P(), P()), check_vma=False)
    return jax.jit(mapped, donate_argnums=(0,))


# --------------------------------------------------------------------------- the training loop


def _itstime(step: int, every: int, last: int) -> bool:
    """Whether a periodic action is due after `step` optimizer updates (always at the end)."""
    return every > 0 and (step % every == 0 or step == last)


class _Logger:
    """Progress lines on stdout, scalars for TensorBoard and `<workdir>/train.jsonl`."""

    def __init__(self, workdir: str, n_iters: int, batch_size: int, start_step: int):
        self.active = jax.process_index() == 0
        self.n_iters, self.batch_size = n_iters, batch_size
        self.t0, self.step0 = time.time(), start_step
        self.writer = None
        if self.active:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))
            self.jsonl = open(os.path.join(workdir, "train.jsonl"), "a")

    def scalars(self, step: int, values: dict, echo: bool = True) -> None:
        if not self.active:
            return
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        record = {"step": step, "time": round(time.time(), 3), **values}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if echo:
            rate = (step - self.step0) / max(time.time() - self.t0, 1e-9)
            eta = (self.n_iters - step) / rate if rate > 0 else float("nan")
            extra = "  ".join(f"{k} {v:.4g}" for k, v in values.items())
            print(f"step {step}/{self.n_iters}  {extra}  {rate:.2f} steps/s  "
                  f"{rate * self.batch_size:.0f} ex/s  ETA {hms(eta)}", flush=True)

    def close(self) -> None:
        if self.active:
            self.writer.close()
            self.jsonl.close()


def _from_every_process(x: np.ndarray) -> np.ndarray:
    """This process's array (n,) -> (process_count, n): every process's, on every process."""
    if jax.process_count() == 1:
        return x[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x))


def _check_writable(workdir: str) -> None:
    """PermissionError naming the workdir if it cannot be created or written to."""
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise PermissionError(f"Cannot write to --workdir {workdir} ({e.strerror or e}): choose "
                              f"a folder you can write to.") from None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains from the latest checkpoint in `workdir` (or from scratch) up to training.n_iters.

    Prints a progress line every `log_freq` steps; every `snapshot_freq` steps (and at the end)
    saves a checkpoint and, if `training.snapshot_sampling`, a sample grid
    `<workdir>/samples/train_step_<N>.png`; every `eval_freq` steps logs the EMA eval loss.
    SIGTERM or SIGINT on any process saves a checkpoint at a step all processes agree on and
    returns (`checkpointing.PreemptionWatcher`). The losses are fetched from the device (one
    sync) at each log and snapshot; a non-finite one on any process raises FloatingPointError
    naming the step range on every process, and that state is never saved. Returns the final
    train state.
    """
    exp = build(config)
    t = exp.train
    mesh = data_mesh()
    abstract_train_state(exp, mesh)   # the network fits the data, before anything is written
    _check_writable(workdir)
    manager = checkpointing.make_manager(workdir, max_to_keep=t.keep_checkpoints)
    state = restore_or_init(exp, manager, mesh)
    start = int(state.step)
    origin = f"resuming from step {start}" if start else "starting from scratch"
    if start == 0 and t.init_workdir:
        state = start_from_workdir(exp, state, t.init_workdir, mesh)
        origin = f"starting from the weights of {t.init_workdir}"
    if start == 0 and exp.teacher is not None:
        state, from_teacher = load_teacher(exp, state, t.teacher_workdir, mesh)
        origin = (f"starting from the teacher's weights ({t.teacher_workdir})" if from_teacher
                  else origin) + ", distilling its ODE"
    print(f"{jax.process_count()} process(es), {jax.device_count()} device(s) "
          f"({jax.devices()[0].platform}); {exp.description}, "
          f"{count_params(state.params):,} parameters; {origin}", flush=True)
    if start >= t.n_iters:
        print(f"Nothing to do: checkpoint step {start} >= training.n_iters {t.n_iters}.")
        manager.close()
        return state
    n_jit = t.n_jitted_steps
    if (t.n_iters - start) % n_jit:
        manager.close()
        raise ValueError(f"The checkpoint at step {start} cannot reach training.n_iters="
                         f"{t.n_iters} in calls of training.n_jitted_steps={n_jit} steps: "
                         f"resume with an n_jitted_steps that divides {t.n_iters - start}.")
    if jax.process_index() == 0:   # only now: a refused resume keeps the config that wrote it
        atomic_write_text(os.path.join(workdir, "config.json"), exp.config_json)

    train_step = make_train_step(exp.loss_fn, exp.tx, t.ema_rate, mesh, t.ema_warmup, t.unroll)
    train_key = exp.key("train")
    data_kwargs = dict(seed=exp.seed, process_index=jax.process_index(),
                       process_count=jax.process_count(), train=True,
                       centered=exp.data.centered,
                       uniform_dequantization=exp.data.uniform_dequantization,
                       random_flip=exp.data.random_flip)
    keep = ("x", "label") if exp.conditional else ("x",)
    logger = _Logger(workdir, t.n_iters, t.batch_size, start)
    watcher = checkpointing.PreemptionWatcher(mesh)
    # Worker processes for tfds records (decoding holds the GIL); a thread for in-memory data.
    workers = 0 if isinstance(exp.dataset.train, data_lib.ArraySource) else exp.data.num_workers
    iterator = data_lib.BatchIterator(exp.dataset, "train", start, t.batch_size,
                                      prefetch=max(4, 2 * n_jit), num_workers=workers,
                                      **data_kwargs)

    def next_batches():
        group = [next(iterator) for _ in range(n_jit)]
        return put_batch({k: np.stack([g[k] for g in group]) for k in keep}, mesh)

    def check(window: list, first: int, last: int) -> dict:
        """Fetches the metrics of steps first+1..last (one device sync) and checks the loss;
        every process sees every process's losses, so all stop alike, with the same message."""
        metrics = jax.tree.map(lambda *v: np.concatenate(v), *jax.tree.map(to_host, window))
        losses = _from_every_process(metrics["loss"])      # (process_count, last - first)
        bad = [i for i, row in enumerate(losses) if not np.all(np.isfinite(row))]
        if bad:
            where = f" on process(es) {bad}" if len(losses) > 1 else ""
            raise FloatingPointError(
                f"Non-finite loss in steps {first + 1}-{last}{where} (losses {losses[bad[0]]}); "
                f"the state was not saved (last checkpoint: step {manager.latest_step()}). Lower "
                f"optim.lr, check optim.grad_clip and the data, then rerun to resume from that "
                f"checkpoint.")
        return {k: float(np.mean(v)) for k, v in metrics.items()}

    def snapshot(state, step):
        checkpointing.save(manager, step, state)
        if t.snapshot_sampling:   # every process runs the sampler; process 0 writes the grid
            samples, nfe = draw_samples(exp, state.ema_params, mesh, exp.sampling.batch_size,
                                        exp.key("snapshot"))
        if t.snapshot_sampling and jax.process_index() == 0:
            save_samples_png(os.path.join(workdir, "samples", f"train_step_{step}.png"),
                             samples, exp, f"step {step}, NFE {nfe}")

    # Metrics stay on the device until the next log or snapshot, so the host never waits for a
    # step to finish in between: it prepares the next batch while the device computes.
    step, window, window_start = start, [], start
    try:
        batch = next_batches()
        while step < t.n_iters:
            state, metrics = train_step(state, batch, train_key)
            step += n_jit
            window.append(metrics)
            if step < t.n_iters:
                batch = next_batches()  # overlaps with the step running on the device
            preempted = watcher.stop_agreed()   # a signal on any process stops them all here
            snapshot_due = _itstime(step, t.snapshot_freq, t.n_iters) or preempted
            if _itstime(step, t.log_freq, t.n_iters) or snapshot_due:
                values = check(window, window_start, step)  # never save a non-finite state
                window, window_start = [], step
                if _itstime(step, t.log_freq, t.n_iters):
                    logger.scalars(step, values)
            if snapshot_due:
                snapshot(state, step)
            if _itstime(step, t.eval_freq, t.n_iters):
                logger.scalars(step, {"eval_loss": eval_loss(
                    exp, state.ema_params, exp.eval.num_batches, exp.key("eval"),
                    state.loss_state)}, echo=False)
            if preempted:
                print(f"Saved step {step} after a preemption signal; rerun the same command to "
                      f"resume.", flush=True)
                break
    finally:
        iterator.close()
        watcher.close()
        try:
            checkpointing.finish(manager)   # a failed background save is raised here
        finally:
            logger.close()
    return state
