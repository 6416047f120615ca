"""The optimizer and the train state: create one, describe its shapes, restore it.

    tx = create_optimizer(lr=2e-4, warmup=5000, grad_clip=1.0)
    state = init_train_state(exp, mesh)                   # fresh, replicated over the mesh
    state = restore_or_init(exp, manager, mesh)           # the latest checkpoint, else fresh
    state = restore_latest(exp, workdir, mesh)            # the latest checkpoint, else an error

`exp` is an `experiment.Experiment` (its network, optimizer, data shape and seed).
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion import checkpointing, importance
from diffusion.models import layers

OPTIMIZERS = ("adam", "radam")


def create_optimizer(lr: float, warmup: int = 0, grad_clip: float = -1.0, beta1: float = 0.9,
                     beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                     optimizer: str = "adam") -> optax.GradientTransformation:
    """Adam (or AdamW if weight_decay > 0; or RAdam, Liu et al. 2020, with optimizer="radam",
    as the consistency models' CIFAR-10 configs) with linear warmup and global-norm gradient
    clipping.

    score_sde's defaults: lr 2e-4, warmup 5000 steps, clip 1.0. grad_clip <= 0 disables clipping.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optim.optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}.")
    if optimizer == "radam" and weight_decay > 0:
        raise ValueError("optim.weight_decay is for Adam (AdamW); RAdam here has none.")
    schedule = optax.linear_schedule(0.0, lr, warmup) if warmup > 0 else lr
    if optimizer == "radam":
        radam = optax.radam(schedule, beta1, beta2, eps)
        return optax.chain(optax.clip_by_global_norm(grad_clip), radam) if grad_clip > 0 else radam
    # Weight decay skips the untrained constants (the Fourier frequencies).
    decayed = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: not layers.is_untrained(path), params)
    adam = (optax.adamw(schedule, beta1, beta2, eps, weight_decay=weight_decay, mask=decayed)
            if weight_decay > 0 else optax.adam(schedule, beta1, beta2, eps))
    return optax.chain(optax.clip_by_global_norm(grad_clip), adam) if grad_clip > 0 else adam


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint holds. step counts optimizer updates done. loss_state is the
    loss's own state (the level history of an importance-sampled "vlb" loss,
    `diffusion.importance`), None for every other loss."""

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    loss_state: Any = None


def create_train_state(key: jax.Array, net, tx: optax.GradientTransformation,
                       example_x: jax.Array, example_y: jax.Array | None = None,
                       loss_state: Any = None) -> TrainState:
    """Initialises the network on an example batch; EMA params start equal to params.
    loss_state may be a function of the fresh params."""
    t = jnp.ones((example_x.shape[0],), example_x.dtype)
    params = net.init(key, example_x, t, y=example_y, train=False)["params"]
    if callable(loss_state):
        loss_state = loss_state(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                      opt_state=tx.init(params), loss_state=loss_state)


def initial_loss_state(exp) -> Any:
    """The fresh loss state of `exp.loss_fn`: an empty level history if it is importance
    sampled; for consistency distillation a function of the params (the target network starts
    as the student, the teacher's slot is zeros until `load_teacher` fills it)."""
    loss_fn = exp.loss_fn
    if getattr(loss_fn, "importance_sampled", False):
        return importance.init_history(loss_fn.num_levels)
    if getattr(loss_fn, "uses_state", False):
        teacher = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                               _teacher_shapes(exp.teacher, exp.dataset.data_shape))
        return lambda params: loss_fn.init_state(params, teacher)
    return None


def _teacher_shapes(teacher, data_shape):
    x = jnp.zeros((1, *data_shape), jnp.float32)
    y = jnp.zeros((1,), jnp.int32) if teacher.conditional else None
    return jax.eval_shape(lambda: teacher.net.init(jax.random.key(0), x, jnp.ones((1,)), y=y,
                                                    train=False)["params"])


def load_teacher(exp, state: TrainState, workdir: str, mesh: Mesh) -> tuple[TrainState, bool]:
    """A fresh consistency-distillation state with the teacher's EMA weights (training.
    teacher_workdir) in its loss state; the student and its target start from them too when
    the networks have the same parameters (as the paper's CD). Returns (state, whether the
    student starts from the teacher)."""
    teacher = restore_latest(exp.teacher, workdir, mesh).ema_params
    same = _same_parameters(teacher, state.params)
    if same:
        copy = lambda tree: jax.tree.map(jnp.copy, tree)   # noqa: E731  (donated buffers)
        state = state.replace(params=copy(teacher), ema_params=copy(teacher),
                              opt_state=exp.tx.init(teacher))
    loss_state = {"target": jax.tree.map(jnp.copy, state.params), "teacher": teacher}
    return state.replace(loss_state=loss_state), same


def _create(exp) -> functools.partial:
    x = jnp.zeros((1, *exp.dataset.data_shape), jnp.float32)
    y = jnp.zeros((1,), jnp.int32) if exp.conditional else None
    return functools.partial(create_train_state, net=exp.net, tx=exp.tx, example_x=x, example_y=y,
                             loss_state=initial_loss_state(exp))


def abstract_train_state(exp, mesh: Mesh) -> TrainState:
    """The train state's shapes and (replicated) shardings, without computing it.

    Traced once per experiment and mesh (kept in `exp.cache`): the training loop asks for it
    before creating the workdir (a network that cannot take the data fails there) and again to
    restore."""
    cache_key = ("abstract_train_state", mesh)
    if cache_key not in exp.cache:
        shapes = jax.eval_shape(_create(exp), jax.random.key(0))
        replicated = NamedSharding(mesh, P())
        exp.cache[cache_key] = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)
    return exp.cache[cache_key]


def init_train_state(exp, mesh: Mesh) -> TrainState:
    """A freshly initialised state (from the experiment's "init" key), replicated over `mesh`."""
    init = jax.jit(_create(exp), out_shardings=NamedSharding(mesh, P()))
    return init(exp.key("init"))


def restore_or_init(exp, manager, mesh: Mesh) -> TrainState:
    """The newest readable checkpoint of `manager` (unreadable newer ones are moved aside,
    `checkpointing.restore_newest_readable`), else a freshly initialised state."""
    state = checkpointing.restore_newest_readable(manager, abstract_train_state(exp, mesh))
    return state if state is not None else init_train_state(exp, mesh)


def restore_latest(exp, workdir: str, mesh: Mesh) -> TrainState:
    """The latest checkpoint in `workdir`; FileNotFoundError (saying to train first) if none."""
    manager = checkpointing.make_manager(workdir, read_only=True)
    try:
        state = checkpointing.restore(manager, abstract_train_state(exp, mesh))
    finally:
        manager.close()
    if state is None:
        raise FileNotFoundError(f"No checkpoint in {checkpointing.checkpoint_dir(workdir)}: train "
                                f"first with --mode train --workdir {workdir}.")
    return state


def start_from_workdir(exp, state: TrainState, workdir: str, mesh: Mesh) -> TrainState:
    """`state` (fresh) with the params and EMA params replaced by the EMA weights of the run in
    `workdir` (training.init_workdir; e.g. consistency training started from a diffusion model,
    as ECT, Geng et al. 2024). The networks must have the same parameters (names and shapes);
    the parameterisation, SDE and loss may differ."""
    from diffusion import experiment  # the config reader, which imports this module

    source = experiment.workdir_experiment(workdir, "training.init_workdir", "a model")
    params = restore_latest(source, workdir, mesh).ema_params
    if not _same_parameters(params, state.params):
        raise ValueError(f"training.init_workdir={workdir} holds a {source.description} run, "
                         f"whose network's parameters differ from this config's: use the same "
                         f"model settings, or no init_workdir.")
    # Two buffers: the train step donates the state, and one buffer cannot be donated twice.
    return state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params),
                         opt_state=exp.tx.init(params))


def _same_parameters(a, b) -> bool:
    """Whether two parameter trees have the same names and shapes."""
    return (jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
            and jax.tree.map(jnp.shape, a) == jax.tree.map(jnp.shape, b))


def count_params(params) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
