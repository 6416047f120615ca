"""Checkpoints of the training state with orbax: async saves, keep-last-N, resume, preemption.

The whole training state (step, params, EMA params, optimizer state) is one pytree saved under
`<workdir>/checkpoints/<step>/`. The data position and the random noise of every step are
functions of the step (see `diffusion.data.batch_at` and `diffusion.train`), so the step is
all a resumed run needs to continue exactly where the saved one stopped.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a run that
dies mid-save never leaves a half-written checkpoint in place of a good one.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion import parallel


class CheckpointError(RuntimeError):
    """A checkpoint in the workdir exists but cannot be restored."""


class CheckpointUnreadableError(CheckpointError):
    """The checkpoint's files are corrupted or incomplete."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was written by another model / optimizer config."""


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed (a full disk, a lost mount); the older ones are kept."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, *, max_to_keep: int | None = 3, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
    """A CheckpointManager for `<workdir>/checkpoints` that keeps the last `max_to_keep` steps."""
    if read_only:  # for evaluation and sampling: never writes, never deletes
        options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                               save_interval_steps=0, max_to_keep=None)
    else:
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                               enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                 item_handlers=ocp.StandardCheckpointHandler())


def save(manager: ocp.CheckpointManager, step: int, state) -> None:
    """Starts saving `state` at `step` (returns before the write completes if async).

    An asynchronous save that failed in the background surfaces here (orbax waits for the
    previous save first) or in `finish`, as CheckpointSaveError.
    """
    try:
        manager.save(step, args=ocp.args.StandardSave(state), force=True)
    except Exception as e:
        raise _save_failed(manager, e) from e


def finish(manager: ocp.CheckpointManager) -> None:
    """Waits for the last save to complete and closes the manager; CheckpointSaveError if a
    save failed."""
    try:
        manager.wait_until_finished()
    except Exception as e:
        raise _save_failed(manager, e) from e
    finally:
        manager.close()


def complete_steps(workdir_or_dir: str) -> list[int]:
    """Steps of the complete checkpoints on disk (orbax renames a checkpoint's temporary folder
    to its step only once every file is written)."""
    directory = str(workdir_or_dir)
    if os.path.basename(directory.rstrip("/")) != "checkpoints":
        directory = checkpoint_dir(directory)
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return sorted(int(n) for n in names if n.isdigit())


def _os_cause(e: Exception) -> str:
    """The operating system's reason inside a tensorstore / orbax error, e.g. 'No space left on
    device (errno 28)', or the error itself."""
    text = str(e)
    found = re.search(r"Failed to write[^:]*: ([^\[]+?)\s*\[os_error_code='(\d+)'\]", text)
    if found:
        return f"{found.group(1)} (errno {found.group(2)})"
    return f"{type(e).__name__}: {text[:300]}"


def _save_failed(manager: ocp.CheckpointManager, e: Exception) -> CheckpointSaveError:
    directory = str(manager.directory)
    steps = complete_steps(directory)
    partial = sorted(n for n in os.listdir(directory) if "tmp" in n) if os.path.isdir(
        directory) else []
    resume = (f"rerun the same command to resume from step {steps[-1]}" if steps else
              "rerun the same command (no checkpoint was complete: it starts from scratch)")
    return CheckpointSaveError(
        f"Saving a checkpoint to {directory} failed: {_os_cause(e)}. No "
        f"checkpoint was deleted: the complete ones are steps {steps}"
        + (f"; the incomplete write ({', '.join(partial)}) is ignored when resuming" if partial
           else "")
        + f". Free space on that disk (or fix the mount) and {resume}.")


def restore(manager: ocp.CheckpointManager, abstract_state, step: int | None = None):
    """Restores the checkpoint at `step` (default: the latest) onto `abstract_state`'s structure.

    `abstract_state` is a pytree of arrays or `jax.ShapeDtypeStruct`s (with shardings) that gives
    the tree structure, shapes, dtypes and placement. Returns None if there is no checkpoint.
    Raises CheckpointError with the path and what to do if the checkpoint cannot be read.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    path = os.path.join(str(manager.directory), str(step))
    steps = sorted(manager.all_steps())
    _check_fits(manager, step, abstract_state, path, steps)
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    try:
        return manager.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as e:  # tensorstore raises plain Exceptions for unreadable files
        raise _unreadable(path, steps, "", e) from e


def _unreadable(path: str, steps: list[int], what: str, e: Exception) -> CheckpointError:
    return CheckpointUnreadableError(
        f"The checkpoint {path} is unreadable (corrupted, or its files are incomplete): {what}"
        f"{type(e).__name__}: {str(e)[:300]}. Checkpoints in this workdir: steps {steps}. Move "
        f"{path} out of the way to resume from the previous one.")


def restore_newest_readable(manager: ocp.CheckpointManager, abstract_state):
    """The newest checkpoint that restores (None if there is none), for resuming training.

    A newer checkpoint whose files are unreadable (a run killed while the file system lost
    data, a disk that filled up) is reported, moved to `<workdir>/checkpoints_unreadable/<step>`
    (kept, not deleted) and skipped for the one before it. A checkpoint of another config is
    not skipped: that is the user's mistake, and resuming from an older step would hide it.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return restore(manager, abstract_state, step)
        except CheckpointUnreadableError as e:
            aside = os.path.join(os.path.dirname(str(manager.directory)),
                                 "checkpoints_unreadable", str(step))
            print(f"{e}\nSkipping it: moved to {aside}; resuming from an earlier checkpoint.",
                  flush=True)
            if jax.process_index() == 0:
                os.makedirs(os.path.dirname(aside), exist_ok=True)
                if os.path.exists(aside):
                    aside += f".{len(os.listdir(os.path.dirname(aside)))}"
                os.replace(os.path.join(str(manager.directory), str(step)), aside)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
            manager.reload()
    return None


def _check_fits(manager, step: int, abstract_state, path: str, steps: list[int]) -> None:
    """CheckpointError unless the checkpoint's arrays have the names, shapes and dtypes of
    `abstract_state` (orbax would otherwise read a slice of a larger array without a word)."""

    def flat(tree) -> dict:
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {"/".join(_key_name(k) for k in path): (tuple(v.shape), str(v.dtype))
                for path, v in leaves}

    try:
        stored = flat(manager.item_metadata(step))
    except Exception as e:
        raise _unreadable(path, steps, "reading its metadata: ", e) from e
    expected = flat(abstract_state)
    differing = sorted(k for k in set(stored) | set(expected) if stored.get(k) != expected.get(k))
    if differing:  # orbax would otherwise read a slice of a larger stored array
        k = differing[0]
        raise CheckpointMismatchError(
            f"The checkpoint {path} does not fit this config's model / optimizer "
            f"({len(differing)} arrays differ; first {k}: {stored.get(k, 'absent')} in the "
            f"checkpoint, {expected.get(k, 'absent')} for this config). It was written with "
            f"other model.* or optim.* settings: use the config that wrote it (its workdir's "
            f"config.json), or a fresh --workdir.")


def _key_name(entry) -> str:
    """One path entry as a string, whether a dict key, attribute or sequence index (orbax's
    metadata and the state's dataclasses spell the same path with different entry types)."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


class PreemptionWatcher:
    """Turns SIGTERM and SIGINT (Ctrl-C) on any process into a stop that every process agrees on.

    The training loop calls `stop_agreed()` once per train-step call, on every process, then
    saves a checkpoint at that step and exits cleanly when it says so; a second signal while that
    happens stops this process at once (KeyboardInterrupt), keeping the previous checkpoints.
    With several processes a host that saved alone would wait in orbax's collective save while
    the others wait in the next step's collectives (a hang), and on a pod the hosts get the
    signal at different moments, or only one of them gets it: so each call starts a max of every
    process's flag over `mesh` (a one-element collective queued behind the step just dispatched)
    and answers with the max started `lag` calls before, which all processes read at the same
    call (the host thus stays up to `lag` calls ahead of the device). One process needs no
    collective: its own flag is the answer. `collective=True` forces the collective path on one
    process (benchmarks/train_throughput.py times it).

    The previous handlers are put back by `close()`. Signals can only be caught on the main
    thread, so elsewhere this watches nothing.
    """

    def __init__(self, mesh: Mesh | None = None, signals=(signal.SIGTERM, signal.SIGINT),
                 collective: bool | None = None, lag: int = 2):
        self._event = threading.Event()
        self._previous = {}
        if collective is None:
            collective = jax.process_count() > 1
        self._reduce = _any_process_flag(mesh or parallel.data_mesh()) if collective else None
        self._pending = collections.deque(maxlen=lag + 1)   # the maxima started, newest last
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        del frame
        if self._event.is_set():
            raise KeyboardInterrupt(f"signal {signum} again: stopping without saving")
        print(f"Received signal {signum}: saving a checkpoint and stopping (send it again to "
              f"stop at once).", flush=True)
        self._event.set()

    @property
    def requested(self) -> bool:
        """Whether this process has been signalled."""
        return self._event.is_set()

    def stop_agreed(self) -> bool:
        """Whether every process stops after the step just dispatched: the same answer on all.

        Every process must call it once per train-step call. With the collective, a signal
        stops the run `lag` to `lag + 1` calls after it arrives, and the host waits for the
        device only up to the step dispatched `lag` calls before the last one.
        """
        if self._reduce is None:
            return self.requested
        self._pending.append(self._reduce(self.requested))
        if len(self._pending) < self._pending.maxlen:
            return False
        return bool(np.asarray(self._pending.popleft().addressable_data(0))[0])   # replicated

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _any_process_flag(mesh: Mesh) -> Callable[[bool], jax.Array]:
    """`flag -> (1,) int32`, 1 if any process passed True: started asynchronously (a max over
    the devices of `mesh`, each holding its process's flag), replicated on every device."""
    sharding = NamedSharding(mesh, P(mesh.axis_names))
    reduce = jax.jit(lambda f: jnp.max(f, keepdims=True),
                     out_shardings=NamedSharding(mesh, P()))
    n_local = len(mesh.local_devices)
    # Both possible inputs, placed once: a call then only dispatches the reduction.
    flags = {f: jax.make_array_from_process_local_data(sharding, np.full((n_local,), f, np.int32))
             for f in (False, True)}
    return lambda flag: reduce(flags[bool(flag)])
