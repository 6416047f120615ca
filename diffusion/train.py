"""Training, evaluation and sampling loops (the edge where configs become plain objects).

Read top to bottom, in the order of flax's examples: the optimizer, the train state, one
per-device train step, the step mapped over the device mesh with `jax.shard_map`, the sampler,
then `evaluate`, `sample` and `train_and_evaluate`. Only `build` (and the three entry points that
call it) read the config; everything below it takes plain arguments.

Randomness: every example's noise in step s comes from fold_in(fold_in(key, s), example_index),
so a run's result does not depend on the number of devices, on `n_jitted_steps`, or on whether it
was interrupted and resumed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion import checkpointing, datasets, likelihood, losses, metrics, models, plotting
from diffusion import sampling as sampling_lib
from diffusion import sde as sde_lib
from diffusion.models import layers, parameterization

DATA_AXIS = "data"


# --------------------------------------------------------------------------- optimizer, state


def create_optimizer(lr: float, warmup: int = 0, grad_clip: float = -1.0, beta1: float = 0.9,
                     beta2: float = 0.999, eps: float = 1e-8,
                     weight_decay: float = 0.0) -> optax.GradientTransformation:
    """Adam (or AdamW if weight_decay > 0) with linear warmup and global-norm gradient clipping.

    score_sde's defaults: lr 2e-4, warmup 5000 steps, clip 1.0. grad_clip <= 0 disables clipping.
    """
    schedule = optax.linear_schedule(0.0, lr, warmup) if warmup > 0 else lr
    # Weight decay skips the untrained constants (the Fourier frequencies).
    decayed = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: not layers.is_untrained(path), params)
    adam = (optax.adamw(schedule, beta1, beta2, eps, weight_decay=weight_decay, mask=decayed)
            if weight_decay > 0 else optax.adam(schedule, beta1, beta2, eps))
    return optax.chain(optax.clip_by_global_norm(grad_clip), adam) if grad_clip > 0 else adam


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint holds. step counts optimizer updates done."""

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


def create_train_state(key: jax.Array, net, tx: optax.GradientTransformation,
                       example_x: jax.Array, example_y: jax.Array | None = None) -> TrainState:
    """Initialises the network on an example batch; EMA params start equal to params."""
    t = jnp.ones((example_x.shape[0],), example_x.dtype)
    params = net.init(key, example_x, t, y=example_y, train=False)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                      opt_state=tx.init(params))


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


def make_device_step(loss_fn: losses.LossFn, tx: optax.GradientTransformation, ema_rate: float,
                     axis_name: str = DATA_AXIS, ema_warmup: bool = False) -> Callable:
    """The train step one device runs: `(state, batch, key) -> (state, metrics)`.

    batch: {"x": (n_jitted_steps, b, ...), ...}, this device's b examples of each of
    n_jitted_steps consecutive global batches; the loop over those steps is a `lax.scan`.
    Gradients and metrics are averaged over `axis_name` with `lax.pmean`. The noise of example j
    of this device in step s comes from fold_in(fold_in(key, s), axis_index * b + j).
    Returns metrics {"loss", "grad_norm"}, each (n_jitted_steps,).
    """

    def device_step(state: TrainState, batch, key):
        def one_step(state: TrainState, batch):
            b = batch["x"].shape[0]
            example_ids = jax.lax.axis_index(axis_name) * b + jnp.arange(b)
            step_key = jax.random.fold_in(key, state.step)
            keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(example_ids)

            def mean_loss(params):
                return jnp.mean(loss_fn(params, batch, keys))

            loss, grads = jax.value_and_grad(mean_loss)(state.params)
            loss, grads = jax.lax.pmean((loss, grads), axis_name)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            decay = ema_decay(ema_rate, state.step + 1, ema_warmup)
            ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                                      state.ema_params, params)
            new_state = TrainState(step=state.step + 1, params=params, ema_params=ema_params,
                                   opt_state=opt_state)
            return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

        # A Python loop, unrolled at trace time, instead of lax.scan: XLA:CPU runs the weight-
        # gradient convolutions of a U-Net inside a while loop ~40x slower than at top level
        # (measured 17 s vs 0.43 s per digits step). n_jitted_steps is small, so unrolling is cheap.
        metrics = []
        for j in range(batch["x"].shape[0]):
            state, m = one_step(state, jax.tree.map(lambda v, j=j: v[j], batch))
            metrics.append(m)
        return state, jax.tree.map(lambda *v: jnp.stack(v), *metrics)

    return device_step


def make_train_step(loss_fn: losses.LossFn, tx: optax.GradientTransformation, ema_rate: float,
                    mesh: Mesh, ema_warmup: bool = False) -> Callable:
    """The device step mapped over `mesh` with `jax.shard_map` and jitted, donating the state.

    `(state, batch, key) -> (state, metrics)`: state replicated, batch arrays
    (n_jitted_steps, global_batch, ...) sharded over the mesh's data axis on dimension 1.
    """
    device_step = make_device_step(loss_fn, tx, ema_rate, DATA_AXIS, ema_warmup)
    # check_vma=False gives pmap's semantics, which the device step is written for: the gradient
    # of the replicated params is this device's, and `lax.pmean` averages it. (With the default
    # check_vma=True, differentiating w.r.t. a replicated input already psums the cotangent, and
    # the pmean would then leave the gradient n_devices times too large.)
    mapped = jax.shard_map(device_step, mesh=mesh, in_specs=(P(), P(None, DATA_AXIS), P()),
                           out_specs=(P(), P()), check_vma=False)
    return jax.jit(mapped, donate_argnums=(0,))


def data_mesh() -> Mesh:
    """A 1-D mesh over every device of every process, named DATA_AXIS."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def put_batch(batch: dict, mesh: Mesh) -> dict:
    """Process-local numpy arrays (n_jit, b_local, ...) -> global arrays sharded on dimension 1."""
    sharding = NamedSharding(mesh, P(None, DATA_AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


# --------------------------------------------------------------------------- experiment set-up


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A config unpacked into the plain objects the loops use."""

    sde: sde_lib.SDE
    net: Any
    score_model: Callable
    loss_fn: losses.LossFn
    tx: optax.GradientTransformation
    dataset: datasets.Dataset
    conditional: bool
    # Jitted functions built once per experiment, so periodic sampling / evaluation compile once.
    compiled: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)


def build(config: ml_collections.ConfigDict, *, shape_only_data: bool = False) -> Experiment:
    """Builds SDE, network, score model, loss, optimizer and dataset from `config`.

    shape_only_data: sampling needs only the data's shape, so a tfds dataset is not opened
    (`datasets.get_dataset(..., shape_only=True)`).
    """
    _check_config(config)
    score_model = models.get_score_model(config)
    sde = score_model.sde
    t = config.training
    # Mixed precision is for training: sampling and likelihoods use the float32 network.
    loss_fn = losses.get_loss_fn(
        sde, dataclasses.replace(score_model, compute_dtype=t.compute_dtype),
        continuous=t.continuous, reduce_mean=t.reduce_mean,
        likelihood_weighting=t.likelihood_weighting, eps=t.eps)
    o = config.optim
    tx = create_optimizer(o.lr, o.warmup, o.grad_clip, o.beta1, o.beta2, o.eps, o.weight_decay)
    dataset = datasets.get_dataset(config, shape_only=shape_only_data)
    conditional = config.model.get("num_classes") is not None
    return Experiment(sde, score_model.net, score_model, loss_fn, tx, dataset, conditional)


def _check_config(config: ml_collections.ConfigDict) -> None:
    """Fails early, with one message, on config values the loops cannot run with."""
    t = config.training
    n_jit = t.n_jitted_steps
    problems = []
    if n_jit < 1:
        problems.append(f"training.n_jitted_steps must be >= 1, got {n_jit}")
    for name in ("log_freq", "snapshot_freq", "eval_freq"):
        if t[name] % max(n_jit, 1):
            problems.append(f"training.{name}={t[name]} must be a multiple of "
                            f"training.n_jitted_steps={n_jit}")
    n_dev = jax.device_count()
    if t.batch_size % n_dev:
        problems.append(f"training.batch_size={t.batch_size} must be divisible by the number of "
                        f"devices ({n_dev})")
    if config.sampling.batch_size % n_dev:
        problems.append(f"sampling.batch_size={config.sampling.batch_size} must be divisible by "
                        f"the number of devices ({n_dev})")
    if t.compute_dtype not in parameterization.COMPUTE_DTYPES:
        problems.append(f"training.compute_dtype must be one of "
                        f"{list(parameterization.COMPUTE_DTYPES)}, got {t.compute_dtype!r}")
    e = config.eval
    if e.fid_ref_split not in datasets.SPLITS:
        problems.append(f"eval.fid_ref_split must be one of {datasets.SPLITS}, got "
                        f"{e.fid_ref_split!r}")
    if e.fid_num_samples < 2 or e.fid_batch_size < 1:
        problems.append(f"eval.fid_num_samples must be >= 2 and eval.fid_batch_size >= 1, got "
                        f"{e.fid_num_samples} and {e.fid_batch_size}")
    if not 0.0 <= config.model.ema_rate < 1.0:
        problems.append(f"model.ema_rate must be in [0, 1), got {config.model.ema_rate}")
    if problems:
        raise ValueError("Invalid config:\n  " + "\n  ".join(problems))


def _base_key(seed: int, purpose: str) -> jax.Array:
    """A key per purpose ("init", "train", "sample", "eval") so streams never overlap."""
    return jax.random.fold_in(jax.random.key(seed), sum(map(ord, purpose)) * 7919 + len(purpose))


def _abstract_state(exp: Experiment, config, mesh: Mesh) -> TrainState:
    """The train state's shapes and (replicated) shardings, without computing it."""
    x = jnp.zeros((1, *exp.dataset.data_shape), jnp.float32)
    y = jnp.zeros((1,), jnp.int32) if exp.conditional else None
    shapes = jax.eval_shape(functools.partial(create_train_state, net=exp.net, tx=exp.tx,
                                              example_x=x, example_y=y), _base_key(0, "init"))
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                        shapes)


def _init_state(exp: Experiment, config, mesh: Mesh) -> TrainState:
    x = jnp.zeros((1, *exp.dataset.data_shape), jnp.float32)
    y = jnp.zeros((1,), jnp.int32) if exp.conditional else None
    init = jax.jit(functools.partial(create_train_state, net=exp.net, tx=exp.tx, example_x=x,
                                     example_y=y), out_shardings=NamedSharding(mesh, P()))
    return init(_base_key(config.seed, "init"))


def restore_or_init(exp: Experiment, config, workdir: str, manager, mesh: Mesh) -> TrainState:
    """The latest checkpoint in `workdir` if there is one, else a freshly initialised state."""
    abstract = _abstract_state(exp, config, mesh)
    state = checkpointing.restore(manager, abstract)
    return state if state is not None else _init_state(exp, config, mesh)


def count_params(params) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


# --------------------------------------------------------------------------- sampling


SAMPLERS = {"pc": sampling_lib.pc_sample, "ode": sampling_lib.ode_sample,
            "ddim": sampling_lib.ddim_sample, "dpm_solver": sampling_lib.dpm_solver_sample,
            "edm": sampling_lib.edm_sample}


def sampler_kwargs(s) -> dict:
    """Keyword arguments of `SAMPLERS[s.method]` from a config's `sampling` block.

    `steps` = 0 keeps each sampler's default (pc: sde.N; ddim 50, dpm_solver 20, edm 18; the
    adaptive ODE solver takes no step count). `noise_removal` is each sampler's `denoise`.
    """
    if s.method not in SAMPLERS:
        raise ValueError(f"Unknown sampler {s.method!r}: config.sampling.method must be one of "
                         f"{sorted(SAMPLERS)}.")
    common = dict(eps=s.eps, denoise=s.noise_removal)
    steps = dict(steps=s.steps) if s.steps else {}
    if s.method == "pc":
        return dict(common, predictor=_none(s.predictor), corrector=_none(s.corrector),
                    snr=s.snr, n_corrector_steps=s.n_steps_each)
    if s.method == "ode":
        return dict(common, rtol=s.rtol, atol=s.atol, method=s.ode_solver)
    if s.method == "ddim":
        return dict(common, **steps, eta=s.eta)
    if s.method == "dpm_solver":
        return dict(common, **steps, order=s.order)
    return dict(common, **steps, rho=s.rho, s_churn=s.s_churn)


def make_sampler(exp: Experiment, sampling_config, batch_size: int, mesh: Mesh) -> Callable:
    """A jitted `(params, key, y) -> (samples (batch_size, *data_shape), nfe (n_devices,))`.

    The batch is split over the mesh's devices; device i samples with fold_in(key, i).
    For the pc sampler, `sampling.steps` > 0 sets the number of steps: the sampler then runs on
    the SDE's discrete chain with that many levels (N), which the reverse-diffusion / ancestral
    predictors and the ALD corrector step through one level at a time; 0 keeps the SDE's N.
    The other samplers take `steps` as their own argument (`sampler_kwargs`).
    """
    s = sampling_config
    kwargs = sampler_kwargs(s)
    sde = dataclasses.replace(exp.sde, N=s.steps) if s.method == "pc" and s.steps else exp.sde
    n_dev = mesh.devices.size
    local_shape = (batch_size // n_dev, *exp.dataset.data_shape)

    def device_sample(params, key, y):
        key = jax.random.fold_in(key, jax.lax.axis_index(DATA_AXIS))
        score_fn = parameterization.score_fn_from_model(exp.score_model, params, y=y)
        x, nfe = SAMPLERS[s.method](key, sde, score_fn, local_shape, **kwargs)
        return x, jnp.reshape(nfe, (1,))

    # The adaptive ODE solver may take a different number of steps on each device: NFE comes
    # back per device, and the caller reports the largest. No collectives inside, so no
    # varying-axis checks (diffrax's loops do not annotate them).
    mapped = jax.shard_map(device_sample, mesh=mesh, in_specs=(P(), P(), P(DATA_AXIS)),
                           out_specs=(P(DATA_AXIS), P(DATA_AXIS)), check_vma=False)
    return jax.jit(mapped)


def _none(name):
    """Config strings "none"/"" mean no predictor/corrector (score_sde's convention)."""
    return None if name in (None, "", "none", "None") else name


def _save_samples_png(path: str, samples: np.ndarray, exp: Experiment, centered: bool,
                      title: str) -> None:
    if exp.dataset.is_image:
        plotting.save_image_grid(path, datasets.inverse_scaler(centered)(samples))
    else:
        ref = np.stack([exp.dataset.eval[i]["x"] for i in range(min(len(exp.dataset.eval), 5000))])
        plotting.save_scatter(path, samples, ref[:, :2] if ref.shape[1] > 2 else ref, title=title)


def sample_batches(exp: Experiment, config, params, mesh: Mesh, num: int, key: jax.Array
                   ) -> Iterator[tuple[np.ndarray, int]]:
    """Yields (samples (b, *data_shape) in data space, NFE) in batches of sampling.batch_size,
    `num` samples in all (the last batch cut to size); batch i uses fold_in(key, i)."""
    bs = config.sampling.batch_size
    cache_key = ("sampler", config.sampling.to_json(), id(mesh))
    if cache_key not in exp.compiled:
        exp.compiled[cache_key] = make_sampler(exp, config.sampling, bs, mesh)
    sampler = exp.compiled[cache_key]
    label_sharding = NamedSharding(mesh, P(DATA_AXIS))
    for i in range(math.ceil(num / bs)):
        k = jax.random.fold_in(key, i)
        y = (jax.random.randint(jax.random.fold_in(k, 1), (bs,), 0, config.model.num_classes)
             if exp.conditional else jnp.zeros((bs,), jnp.int32))
        x, nfe = sampler(params, k, jax.device_put(y, label_sharding))
        yield np.asarray(jax.device_get(x))[:num - i * bs], int(np.max(nfe))


def draw_samples(exp: Experiment, config, params, mesh: Mesh, num: int, key: jax.Array
                 ) -> tuple[np.ndarray, int]:
    """`num` samples (num, *data_shape) in data space, in batches of sampling.batch_size."""
    out, nfes = [], [0]
    for x, nfe in sample_batches(exp, config, params, mesh, num, key):
        out.append(x)
        nfes.append(nfe)
    return np.concatenate(out), max(nfes)


# --------------------------------------------------------------------------- evaluation


def eval_loss(exp: Experiment, config, params, num_batches: int, key: jax.Array) -> float:
    """Mean loss of `params` (typically the EMA) on the eval split, over fixed noise."""
    if "eval_loss" not in exp.compiled:
        exp.compiled["eval_loss"] = jax.jit(lambda p, b, k: jnp.mean(exp.loss_fn(p, b, k)))
    loss_fn = exp.compiled["eval_loss"]
    bs = config.eval.batch_size
    n = len(exp.dataset.eval)
    num_batches = min(num_batches, max(1, n // bs))
    total = 0.0
    for i in range(num_batches):
        batch = datasets.batch_at(exp.dataset, "eval", i, bs, seed=config.seed, train=False,
                                  centered=config.data.centered,
                                  uniform_dequantization=config.data.uniform_dequantization)
        if not exp.conditional:
            batch = {"x": batch["x"]}
        total += float(loss_fn(params, batch, jax.random.fold_in(key, i)))
    return total / num_batches


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Evaluates the latest checkpoint; appends one JSON line to `<workdir>/eval.jsonl`.

    Reports the eval-split loss of the EMA parameters (the score-matching objective), with
    `eval.enable_bpd` the likelihood of eval data through the probability-flow ODE (bits/dim for
    images, nats per example for points; `eval_likelihood`); for images with `eval.enable_fid`
    FID / KID / Inception Score of `eval.fid_num_samples` samples (`eval_sample_quality`); for
    low-dimensional data the sliced Wasserstein distance and MMD between `sampling.num_samples`
    samples (configured sampler) and the eval split. Returns the record written.
    """
    exp = build(config)
    mesh = data_mesh()
    manager = checkpointing.make_manager(workdir, read_only=True)
    state = checkpointing.restore(manager, _abstract_state(exp, config, mesh))
    if state is None:
        raise FileNotFoundError(f"No checkpoint in {checkpointing.checkpoint_dir(workdir)}: train "
                                f"first with --mode train --workdir {workdir}.")
    step = int(state.step)
    extractor = None
    if exp.dataset.is_image and config.eval.enable_fid:
        # The Inception weights load (or fail, saying how to get them) before any long work.
        extractor = make_inception_extractor(config.eval)
    t0 = time.time()
    record = {"step": step,
              "eval_loss": eval_loss(exp, config, state.ema_params, config.eval.num_batches,
                                     _base_key(config.seed, "eval")),
              "eval_split_examples": len(exp.dataset.eval)}
    if config.eval.enable_bpd:
        record.update(eval_likelihood(exp, config, state.ema_params, mesh))
    if not exp.dataset.is_image:
        record.update(_sample_distances(exp, config, state.ema_params, mesh))
    if extractor is not None:
        record.update(eval_sample_quality(exp, config, state.ema_params, mesh, workdir,
                                          extractor))
    record["seconds"] = round(time.time() - t0, 2)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "eval.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
    print(f"eval at step {step}: " + ", ".join(f"{k} {v}" for k, v in record.items()), flush=True)
    return record


def make_log_likelihood(exp: Experiment, eval_config, mesh: Mesh) -> Callable:
    """A jitted `(params, key, x) -> (logp (B,), nfe (n_devices,))`, x sharded over the mesh."""
    e = eval_config

    def device_logp(params, key, x):
        key = jax.random.fold_in(key, jax.lax.axis_index(DATA_AXIS))
        score_fn = parameterization.score_fn_from_model(exp.score_model, params)
        logp, nfe = likelihood.log_likelihood(
            key, exp.sde, score_fn, x, divergence=e.bpd_divergence, rtol=e.likelihood_rtol,
            atol=e.likelihood_atol, eps=e.likelihood_eps)
        return logp, jnp.reshape(nfe, (1,))

    return jax.jit(jax.shard_map(device_logp, mesh=mesh, in_specs=(P(), P(), P(DATA_AXIS)),
                                 out_specs=(P(DATA_AXIS), P(DATA_AXIS)), check_vma=False))


def eval_likelihood(exp: Experiment, config, params, mesh: Mesh) -> dict:
    """Log-likelihood of eval data under the probability-flow ODE.

    The protocol is score_sde's (run_lib.evaluate): `eval.bpd_num_repeats` passes over the eval
    split (5 over the whole test set in the paper configs), each example uniformly dequantized
    with fresh noise in every pass ((level + u) / L, then scaled like the training data). Pass p
    reads the first m examples of the split's epoch-p permutation, m = the whole split when
    `eval.bpd_num_batches` is 0, else that many batches of `eval.batch_size`. Images are
    reported in bits/dim of the L-level data (offset log2(L / data range): 7 for 8-bit data in
    [-1, 1], 8 for [0, 1]); points in nats per example (`nll`). Also reports the standard error
    over examples and the solver's NFE (largest over batches and devices).
    """
    if exp.conditional:
        return {}   # the likelihood of a class-conditional model needs a label marginal
    e = config.eval
    if e.bpd_divergence not in likelihood.DIVERGENCES:
        raise ValueError(f"Unknown config.eval.bpd_divergence {e.bpd_divergence!r}: use one of "
                         f"{likelihood.DIVERGENCES}.")
    cache_key = ("log_likelihood", e.to_json(), id(mesh))
    if cache_key not in exp.compiled:
        exp.compiled[cache_key] = make_log_likelihood(exp, e, mesh)
    log_likelihood_fn = exp.compiled[cache_key]
    bs, n = e.batch_size, len(exp.dataset.eval)
    per_pass = n if e.bpd_num_batches <= 0 else min(n, e.bpd_num_batches * bs)
    positions = np.concatenate([p * n + np.arange(per_pass) for p in range(e.bpd_num_repeats)])
    print(f"likelihood of {per_pass} eval examples x {e.bpd_num_repeats} dequantizations through "
          f"the probability-flow ODE ({e.bpd_divergence} divergence, rtol {e.likelihood_rtol}); "
          f"set eval.enable_bpd=False to skip", flush=True)
    key = _base_key(config.seed, "likelihood")
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    logps, nfe = [], 0
    batches = [positions[i:i + bs] for i in range(0, len(positions), bs)]
    for i, batch_positions in enumerate(_progress(iter(batches), len(positions), bs,
                                                  "likelihood examples")):
        # The last batch is padded to the compiled size by repeating its last example.
        padded = np.pad(batch_positions, (0, bs - len(batch_positions)), mode="edge")
        x = datasets.examples_at(exp.dataset, "eval", padded, seed=config.seed,
                                 centered=config.data.centered, uniform_dequantization=True)["x"]
        logp, batch_nfe = log_likelihood_fn(params, jax.random.fold_in(key, i),
                                            jax.device_put(x, sharding))
        logps.append(np.asarray(jax.device_get(logp))[:len(batch_positions)])
        nfe = max(nfe, int(np.max(batch_nfe)))
    logp = np.concatenate(logps).astype(np.float64)
    if not np.all(np.isfinite(logp)):
        raise FloatingPointError("The likelihood ODE solve produced non-finite values (solver "
                                 "failure or a diverging model); try larger eval.likelihood_rtol.")
    if exp.dataset.is_image:
        data_range = 2.0 if config.data.centered else 1.0
        values = np.asarray(likelihood.bits_per_dim(
            logp, exp.dataset.data_shape, offset=math.log2(exp.dataset.num_levels / data_range)))
        name = "bpd"
    else:
        values, name = -logp, "nll"
    return {name: float(values.mean()),
            f"{name}_std_err": float(values.std() / math.sqrt(len(values))),
            "likelihood_nfe": nfe, "likelihood_examples": len(values)}


def _sample_distances(exp: Experiment, config, params, mesh: Mesh) -> dict:
    """Sliced W2 and MMD between model samples and (up to 10k) eval-split points.

    The same distances between as many training points and the eval split are reported as
    `*_data_floor`: what a perfect model would score with this many samples.
    """
    samples, nfe = draw_samples(exp, config, params, mesh, config.sampling.num_samples,
                                _base_key(config.seed, "eval_samples"))
    n = min(len(exp.dataset.eval), 10_000)
    ref = np.stack([exp.dataset.eval[i]["x"] for i in range(n)]).astype(np.float32)
    key = _base_key(config.seed, "projections")
    m = min(2000, n, len(samples))
    train_points = datasets.batch_at(exp.dataset, "train", 0, len(samples), seed=config.seed,
                                     train=False)["x"]
    return {"sliced_wasserstein": float(metrics.sliced_wasserstein(key, samples, ref)),
            "sliced_wasserstein_data_floor": float(
                metrics.sliced_wasserstein(key, train_points, ref)),
            "mmd": float(metrics.mmd_rbf(samples[:m], ref[:m])),
            "mmd_data_floor": float(metrics.mmd_rbf(train_points[:m], ref[:m])),
            "sampler_nfe": nfe, "num_samples": len(samples)}


def make_inception_extractor(eval_config) -> metrics.InceptionExtractor:
    """The FID Inception network on this process's devices (batch split over them if it divides)."""
    local = jax.local_devices()
    sharding = None
    if len(local) > 1 and eval_config.fid_batch_size % len(local) == 0:
        sharding = NamedSharding(Mesh(np.array(local), (DATA_AXIS,)), P(DATA_AXIS))
    return metrics.InceptionExtractor(eval_config.inception_weights or None,
                                      eval_config.fid_batch_size, sharding)


def reference_statistics(exp: Experiment, config, workdir: str,
                         extractor: metrics.InceptionExtractor) -> tuple[metrics.FeatureStats,
                                                                         str]:
    """Inception statistics of the data split `eval.fid_ref_split`, computed once and cached.

    The cache file (in `eval.fid_stats_dir`, default `<workdir>/fid_stats`) is named after the
    dataset, the stored split (e.g. tfds "train"), crop, image size, number of examples and the
    Inception weights' hash, so a change of any of them computes new statistics. Images are the
    split's 8-bit pixels as stored (no dequantization or flips). Returns the statistics and a
    description for the record.
    """
    e = config.eval
    split = e.fid_ref_split
    source = exp.dataset.split(split)
    n = len(source) if e.fid_ref_max_examples <= 0 else min(len(source), e.fid_ref_max_examples)
    h, w, _ = exp.dataset.data_shape
    fingerprint = metrics.fid.weights_fingerprint(extractor.weights_path)
    stored = config.data.train_split if split == "train" else config.data.eval_split
    crop = f"_crop{config.data.crop_size}" if config.data.crop_size else ""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-",
                  f"{exp.dataset.name}_{stored}{crop}_{h}x{w}_{n}_{fingerprint}") + ".npz"
    path = os.path.join(e.fid_stats_dir or os.path.join(workdir, "fid_stats"), name)
    description = f"{exp.dataset.name}/{split} ({n} images)"
    if os.path.exists(path):
        stats, _ = metrics.FeatureStats.load(path)
        print(f"reference statistics of {description}: {path}", flush=True)
        return stats, description
    print(f"computing reference Inception statistics of {description} once; cached in {path}",
          flush=True)
    bs = extractor.batch_size

    def batches():
        for start in range(0, n, bs):
            levels, _ = datasets.take(source, np.arange(start, min(start + bs, n)))
            yield metrics.fid.to_pixels(levels / np.float32(exp.dataset.num_levels - 1))

    stats = extractor.stats(_progress(batches(), n, bs, "reference images"),
                            max_keep=max(e.kid_subset_size, 10_000))
    if jax.process_index() == 0:
        stats.save(path, dataset=exp.dataset.name, split=split, num_examples=n,
                   weights=fingerprint)
    return stats, description


def _progress(batches: Iterator, total: int, batch_size: int, what: str,
              every_seconds: float = 30.0) -> Iterator:
    """Passes batches through, printing how many of `total` are done now and then."""
    t0 = last = time.time()
    done = 0
    for batch in batches:
        yield batch
        done = min(total, done + batch_size)
        now = time.time()
        if now - last >= every_seconds or done == total:
            rate = done / max(now - t0, 1e-9)
            print(f"  {what}: {done}/{total}  {rate:.1f}/s  ETA {_hms((total - done) / rate)}",
                  flush=True)
            last = now


def eval_sample_quality(exp: Experiment, config, params, mesh: Mesh, workdir: str,
                        extractor: metrics.InceptionExtractor) -> dict:
    """FID, KID and (if the weights have the classifier) Inception Score of
    `eval.fid_num_samples` samples of the configured sampler against `reference_statistics`.

    Samples stream through the Inception network batch by batch, so 50k samples need memory for
    one batch and the running statistics only. The record says which sampler and NFE.
    """
    e = config.eval
    ref, ref_description = reference_statistics(exp, config, workdir, extractor)
    num = e.fid_num_samples
    s = config.sampling
    print(f"FID / KID: {num} samples ({s.method} sampler) against {ref_description}", flush=True)
    inverse = datasets.inverse_scaler(config.data.centered)
    nfe = 0

    def pixels():
        nonlocal nfe
        batches = sample_batches(exp, config, params, mesh, num, _base_key(config.seed, "fid"))
        for x, batch_nfe in _progress(batches, num, s.batch_size, "samples"):
            nfe = max(nfe, batch_nfe)
            if not np.all(np.isfinite(x)):
                raise FloatingPointError(f"Sampling produced non-finite values (sampler "
                                         f"{s.method}); no FID was recorded.")
            yield metrics.fid.to_pixels(inverse(x))

    gen = extractor.stats(pixels(), max_keep=max(e.kid_subset_size, 10_000))
    out = metrics.sample_quality(gen, ref, e.kid_subsets, e.kid_subset_size, e.is_splits)
    if not extractor.has_logits:
        print("Inception Score: not available (the converted Inception weights have no "
              "classifier layer; see README, 'Sample quality')", flush=True)
    out.update(fid_num_samples=num, fid_reference=ref_description, sampler=s.method,
               sampler_nfe=nfe)
    return out


def sample(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Samples `sampling.num_samples` from the latest EMA checkpoint.

    Writes `<workdir>/samples/step_<N>.npz` (array `samples` in data space, shaped like the data,
    and `nfe`) and `step_<N>.png` next to it (an image grid, or a scatter plot for 2-D data).
    Existing files are replaced only once the new samples are complete. Returns the .npz path.
    """
    exp = build(config, shape_only_data=True)
    mesh = data_mesh()
    manager = checkpointing.make_manager(workdir, read_only=True)
    state = checkpointing.restore(manager, _abstract_state(exp, config, mesh))
    if state is None:
        raise FileNotFoundError(f"No checkpoint in {checkpointing.checkpoint_dir(workdir)}: train "
                                f"first with --mode train --workdir {workdir}.")
    step = int(state.step)
    t0 = time.time()
    samples, nfe = draw_samples(exp, config, state.ema_params, mesh, config.sampling.num_samples,
                                _base_key(config.seed, "sample"))
    elapsed = time.time() - t0
    if not np.all(np.isfinite(samples)):
        raise FloatingPointError(f"Sampling produced non-finite values (step {step}, sampler "
                                 f"{config.sampling.method}); nothing was written.")
    path = os.path.join(workdir, "samples", f"step_{step}.npz")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, samples=samples, nfe=nfe)
        os.replace(tmp, path)
        _save_samples_png(path[:-4] + ".png", samples, exp, config.data.centered,
                          f"step {step}, {config.sampling.method}, NFE {nfe}")
    print(f"wrote {len(samples)} samples (NFE {nfe}, {elapsed:.1f} s) to {path} and "
          f"{path[:-4]}.png", flush=True)
    return path


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
                  f"{rate * self.batch_size:.0f} ex/s  ETA {_hms(eta)}", flush=True)

    def close(self) -> None:
        if self.active:
            self.writer.close()
            self.jsonl.close()


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains from the latest checkpoint in `workdir` (or from scratch) up to training.n_iters.

    Prints a progress line every `log_freq` steps; every `snapshot_freq` steps (and at the end)
    saves a checkpoint and, if `training.snapshot_sampling`, a sample grid
    `<workdir>/samples/train_step_<N>.png`; every `eval_freq` steps logs the EMA eval loss.
    SIGTERM saves a checkpoint at the current step and returns. The losses are fetched from the
    device (one sync) at each log and snapshot; a non-finite one raises FloatingPointError naming
    the step range, and that state is never saved. Returns the final train state.
    """
    exp = build(config)
    t = config.training
    mesh = data_mesh()
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    manager = checkpointing.make_manager(workdir, max_to_keep=t.keep_checkpoints)
    state = restore_or_init(exp, config, workdir, manager, mesh)
    start = int(state.step)
    n_params = count_params(state.params)
    print(f"{jax.process_count()} process(es), {jax.device_count()} device(s) "
          f"({jax.devices()[0].platform}); model {config.model.name}: {n_params:,} parameters"
          f"{' (remat)' if config.model.get('remat') else ''}, {t.compute_dtype} compute; "
          f"SDE {config.sde.name}; data {config.data.dataset} {exp.dataset.data_shape}; "
          f"{'resuming from step ' + str(start) if start else 'starting from scratch'}", flush=True)
    if start >= t.n_iters:
        print(f"Nothing to do: checkpoint step {start} >= training.n_iters {t.n_iters}.")
        manager.close()
        return state

    n_jit = t.n_jitted_steps
    train_step = make_train_step(exp.loss_fn, exp.tx, config.model.ema_rate, mesh,
                                 config.model.ema_warmup)
    train_key = _base_key(config.seed, "train")
    data_kwargs = dict(seed=config.seed, process_index=jax.process_index(),
                       process_count=jax.process_count(), train=True,
                       centered=config.data.centered,
                       uniform_dequantization=config.data.uniform_dequantization,
                       random_flip=config.data.random_flip)
    keep = ("x", "label") if exp.conditional else ("x",)
    logger = _Logger(workdir, t.n_iters, t.batch_size, start)
    watcher = checkpointing.PreemptionWatcher()
    # Worker processes for tfds records (decoding holds the GIL); a thread for in-memory data.
    workers = (0 if isinstance(exp.dataset.train, datasets.ArraySource)
               else config.data.get("num_workers", 0))
    iterator = datasets.BatchIterator(exp.dataset, "train", start, t.batch_size,
                                      prefetch=max(4, 2 * n_jit), num_workers=workers,
                                      **data_kwargs)

    def next_batches():
        group = [next(iterator) for _ in range(n_jit)]
        return put_batch({k: np.stack([g[k] for g in group]) for k in keep}, mesh)

    def check(window: list, first: int, last: int) -> dict:
        """Fetches the metrics of steps first+1..last (one device sync) and checks the loss."""
        metrics = jax.tree.map(lambda *v: np.concatenate(v), *jax.device_get(window))
        if not np.all(np.isfinite(metrics["loss"])):
            raise FloatingPointError(
                f"Non-finite loss in steps {first + 1}-{last} (losses {metrics['loss']}); the "
                f"state was not saved (last checkpoint: step {manager.latest_step()}). Lower "
                f"optim.lr, check optim.grad_clip and the data, then rerun to resume from that "
                f"checkpoint.")
        return {k: float(np.mean(v)) for k, v in metrics.items()}

    def snapshot(state, step):
        checkpointing.save(manager, step, state)
        if t.snapshot_sampling and jax.process_index() == 0:
            samples, nfe = draw_samples(exp, config, state.ema_params, mesh,
                                        config.sampling.batch_size,
                                        _base_key(config.seed, "snapshot"))
            _save_samples_png(os.path.join(workdir, "samples", f"train_step_{step}.png"),
                              samples, exp, config.data.centered, f"step {step}, NFE {nfe}")

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
            preempted = watcher.requested
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
                    exp, config, state.ema_params, config.eval.num_batches,
                    _base_key(config.seed, "eval"))}, echo=False)
            if preempted:
                print(f"Saved step {step} after a preemption signal; rerun the same command to "
                      f"resume.", flush=True)
                break
    finally:
        iterator.close()
        watcher.close()
        manager.wait_until_finished()
        manager.close()
        logger.close()
    return state
