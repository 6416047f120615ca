"""The device mesh and data parallelism shared by training, sampling and evaluation.

Every collective program of this codebase runs on one 1-D mesh over all devices of all
processes, with the batch dimension split along its axis `DATA_AXIS`:

    mesh = data_mesh()
    step = jax.jit(shard_over_batch(per_device_fn, mesh, ...))
    batch = put_batch({"x": local_x}, mesh)      # process-local rows -> one global array
    x = global_batch(x_np, mesh)             # the same rows on every process -> global
    x_np = to_host(x)                            # a global array, whole, on every process

With several processes (multi-host), every process runs every collective program with the same
arguments; `to_host` gathers results that span other processes' devices.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def data_mesh() -> Mesh:
    """A 1-D mesh over every device of every process, named DATA_AXIS."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def connect_processes() -> None:
    """Connects the processes' collectives now, while they are in step (call it right after
    `jax.distributed.initialize`; a no-op with one process).

    On CPU (gloo) the first collective over a set of devices connects that set, and fails
    ("Gloo context initialization failed: DEADLINE_EXCEEDED") when another process arrives
    more than 30 s later, a limit fixed inside XLA; once connected, a set waits as long as the
    slowest process. Processes fall that far apart before the training step's first collective
    when one compiles it more slowly (a loaded machine, a compile-cache hit on the other only),
    so the two sets every program here uses are connected first: all devices (`data_mesh`) and
    one device per process (`multihost_utils.process_allgather`, orbax's barriers).
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    mesh = data_mesh()
    ones = jax.make_array_from_process_local_data(
        batch_sharding(mesh), np.ones((len(mesh.local_devices),), np.int32))
    total = jax.jit(lambda x: x.sum(keepdims=True), out_shardings=NamedSharding(mesh, P()))(ones)
    multihost_utils.process_allgather(np.int32(jax.process_index()))
    if int(to_host(total)[0]) != jax.device_count():
        raise RuntimeError("the processes' devices did not connect")


def put_batch(batch: dict, mesh: Mesh) -> dict:
    """Process-local numpy arrays (n_jit, b_local, ...) -> global arrays sharded on dimension 1."""
    sharding = NamedSharding(mesh, P(None, DATA_AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def global_batch(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array that every process holds in full (the same rows everywhere) -> a global
    array split over the mesh on its first dimension (each process places only its own devices'
    rows). `put_batch` is for arrays each process holds only its part of."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, batch_sharding(mesh), lambda index: x[index])


def to_host(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-process) global array as numpy, on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays whose leading (batch) dimension is split over the mesh's devices."""
    return NamedSharding(mesh, P(DATA_AXIS))


def map_over_batch(per_device: Callable, mesh: Mesh, out_specs=None) -> Callable:
    """jit of `per_device(params, key, batch) -> (out (b, ...), stat (1,))` over `mesh`.

    params and key are replicated; `batch` (a pytree of (B, ...) arrays) and the outputs are
    split over the devices on their first dimension (`out_specs` for other outputs). The
    varying-axis checks are off (the samplers' loops do not annotate them). Used for sampling, the
    likelihood and the eval loss, where each device works on its own rows, each row's randomness
    from the key of its global index (`diffusion.rng`).
    """
    if out_specs is None:
        out_specs = (P(DATA_AXIS), P(DATA_AXIS))
    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(DATA_AXIS)),
                                 out_specs=out_specs, check_vma=False))
