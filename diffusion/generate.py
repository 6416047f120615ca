"""Sampling a trained model: the configured sampler over the device mesh, and sample files.

    samples, nfe = draw_samples(exp, params, mesh, num, key)   # (num, *data_shape), data space
    path = sample(config, workdir)     # --mode sample: <workdir>/samples/step_<N>.npz and .png

The sampler and its arguments come from `exp.sampling` (`experiment.SamplingSettings`); a task's
inputs from `task_inputs.py`, the pictures from `plotting.py`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from diffusion import data as data_lib
from diffusion import files, guidance, losses, plotting, rng
from diffusion.experiment import Experiment, SamplingSettings, build, classifier_experiment
from diffusion.guide_settings import GuideSettings, parse_labels
from diffusion.models import parameterization
from diffusion.parallel import DATA_AXIS, data_mesh, global_batch, map_over_batch, to_host
from diffusion.sampling import get_sampler
from diffusion.task_inputs import task_inputs
from diffusion.train_state import restore_latest


def make_sampler(exp: Experiment, settings: SamplingSettings, batch_size: int,
                 mesh: Mesh, classifier=None) -> Callable:
    """A jitted `(params, key, batch) -> (samples (batch_size, *data_shape), nfe (n_devices,))`.

    params = (score params, classifier params or None); batch = {"index": the samples' global
    indices (B,), "y": labels (B,), "cond": the task's conditioning (B, ...), "mask": (B, ...)},
    split over the mesh's devices. Sample n draws all its noise from fold_in(key, n)
    (`diffusion.rng`), so it is the same whatever the devices, processes and batch size (with
    the pc sampler's "batch" corrector norm, the Langevin step size is one for the batch,
    averaged over all devices). Labels and guidance (`settings.guide`) select the score
    (`diffusion.guidance`); a task (inpaint / colorize / super_resolve) the conditional sampler.
    For the pc sampler, `settings.pc_levels` > 0 sets the number of steps: the sampler then runs
    on the SDE's discrete chain with that many levels (N), which the reverse-diffusion /
    ancestral predictors and the ALD corrector step through one level at a time.
    """
    sampler, kwargs = get_sampler(settings.method), settings.kwargs
    sde = dataclasses.replace(exp.sde, N=settings.pc_levels) if settings.pc_levels else exp.sde
    local_shape = (batch_size // mesh.devices.size, *exp.dataset.data_shape)
    g = settings.guide

    if settings.method == "pc":   # score_sde's batch norm of the corrector spans all devices
        kwargs["axis_name"] = DATA_AXIS

    def device_sample(params, key, batch):
        keys = rng.indexed(key, batch["index"])
        score_fn = _score_fn(exp, g, *params, batch["y"], classifier)
        if g.task == "none":
            x, nfe = sampler(keys, sde, score_fn, local_shape, **kwargs)
        else:
            x, nfe = _task_sample(keys, sde, score_fn, batch, g, settings.method, kwargs)
        # The adaptive ODE solver may take a different number of steps on each device: NFE
        # comes back per device, and the caller reports the largest.
        return x, jnp.reshape(nfe, (1,))

    return map_over_batch(device_sample, mesh)


def _score_fn(exp: Experiment, g: GuideSettings, params, classifier_params, y, classifier):
    """The score the sampler follows: the model's (conditioned on y if it is conditional),
    classifier-free guided, or classifier guided."""
    model = exp.score_model
    if g.guidance == "cfg":
        return guidance.cfg_score_fn(lambda x, t, labels: model(params, x, t, y=labels),
                                     y, g.weight, exp.num_classes)
    if g.guidance == "classifier":
        null = jnp.full_like(y, exp.num_classes) if exp.conditional else None
        base = parameterization.score_fn_from_model(model, params, y=null)
        log_prob = losses.classifier_log_prob_fn(classifier, classifier_params)
        return guidance.classifier_score_fn(base, log_prob, y, g.weight)
    return parameterization.score_fn_from_model(model, params,
                                                y=y if exp.conditional else None)


def _task_sample(key, sde, score_fn, batch, g: GuideSettings, method: str, kwargs: dict):
    kwargs = dict(kwargs)
    steps = sde.N if method == "pc" else kwargs.pop("steps", None)
    if g.task == "inpaint":
        return guidance.inpaint_sample(key, sde, score_fn, batch["cond"], batch["mask"], steps,
                                       sampler=method, **kwargs)
    if g.task == "colorize":
        return guidance.colorize_sample(key, sde, score_fn, batch["cond"], steps,
                                        sampler=method, **kwargs)
    return guidance.super_resolve_sample(key, sde, score_fn, batch["cond"], g.sr_factor, steps,
                                         sampler=method, **kwargs)


def load_classifier(workdir: str, mesh: Mesh, classifier: Experiment | None = None):
    """(network, EMA params) of the classifier trained in `workdir`, restored from its latest
    checkpoint; `classifier` is its experiment (`exp.classifier`), built from its config.json
    by `experiment.classifier_experiment` when not given."""
    classifier = classifier or classifier_experiment(workdir)
    return classifier.net, restore_latest(classifier, workdir, mesh).ema_params


def sample_batches(exp: Experiment, params, mesh: Mesh, num: int, key: jax.Array,
                   cond: dict[str, np.ndarray] | None = None
                   ) -> Iterator[tuple[np.ndarray, int]]:
    """Yields (samples (b, *data_shape) in data space, NFE) in batches of sampling.batch_size,
    `num` samples in all (the last batch cut to size); sample n uses fold_in(key, n), so the
    samples do not depend on the batch size or the devices (`make_sampler`).

    Labels: `sampling.labels` cycled over the samples, else (a class-conditional model) uniformly
    random, sample n's from its key (`sample_labels`). `cond`: the task's conditioning
    arrays, `num` rows each (`task_inputs`); without it any task is ignored (FID, snapshots).
    With several processes every process must call this alike (the sampler is one program over
    all devices); each gets all samples.
    """
    s = exp.sampling
    if cond is None and s.guide.task != "none":
        s = dataclasses.replace(s, guide=dataclasses.replace(s.guide, task="none"))
    bs = s.batch_size
    classifier, classifier_params = None, None
    if s.guide.guidance == "classifier":
        if "guiding_classifier" not in exp.cache:
            exp.cache["guiding_classifier"] = load_classifier(s.guide.classifier_workdir, mesh,
                                                              exp.classifier)
        classifier, classifier_params = exp.cache["guiding_classifier"]
    cache_key = ("sampler", s, mesh)
    if cache_key not in exp.cache:
        exp.cache[cache_key] = make_sampler(exp, s, bs, mesh, classifier)
    sampler = exp.cache[cache_key]
    labels = sample_labels(exp, num, key)
    for i in range(math.ceil(num / bs)):
        rows = np.minimum(np.arange(i * bs, (i + 1) * bs), num - 1)   # the last batch padded
        batch = {"index": rows.astype(np.int32), "y": labels[rows],
                 "cond": np.zeros((bs, 1), np.float32), "mask": np.zeros((bs, 1), np.float32)}
        if cond is not None:
            batch.update({name: array[rows] for name, array in cond.items()})
        x, nfe = sampler((params, classifier_params), key,
                         jax.tree.map(lambda a: global_batch(a, mesh), batch))
        yield to_host(x)[:num - i * bs], int(np.max(to_host(nfe)))


def sample_labels(exp: Experiment, num: int, key: jax.Array) -> np.ndarray:
    """The (num,) labels of `sample_batches`: sampling.labels cycled, or uniformly random for a
    class-conditional model, sample n's from fold_in(fold_in(key, n), rng.LABEL) (zeros,
    unused, for an unconditional one)."""
    classes = exp.num_classes or (exp.dataset.num_classes or 0)
    listed = parse_labels(exp.sampling.guide.labels, classes)
    if listed is not None:
        return np.resize(np.asarray(listed, np.int32), num)
    if exp.conditional:
        keys = rng.fold_in(rng.indexed(key, np.arange(num)), rng.LABEL)
        draw = jax.vmap(lambda k: jax.random.randint(k, (), 0, exp.num_classes))
        return np.asarray(draw(keys), np.int32)
    return np.zeros((num,), np.int32)


def draw_samples(exp: Experiment, params, mesh: Mesh, num: int, key: jax.Array,
                 cond: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, int]:
    """`num` samples (num, *data_shape) in data space, in batches of sampling.batch_size.

    Each batch is copied into the result as it arrives: the host holds the `num` samples asked
    for and one batch, never a list of batches and their concatenation."""
    out, nfe, filled = None, 0, 0
    for x, batch_nfe in sample_batches(exp, params, mesh, num, key, cond):
        if out is None:
            out = np.empty((num, *x.shape[1:]), x.dtype)
        out[filled:filled + len(x)] = x
        filled += len(x)
        nfe = max(nfe, batch_nfe)
    return out, nfe


def sample(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Samples `sampling.num_samples` from the latest EMA checkpoint.

    Writes `<workdir>/samples/<tag>step_<N>.npz` (array `samples` in data space, shaped like
    the data, `nfe`, `labels`; for a task also `cond`, the conditioning, and `originals` when
    taken from the eval split) and a .png next to it: an image grid (one column per class when
    sampling.labels="all"; for a task, rows of conditioning, samples and originals), or a
    scatter plot for 2-D data. <tag> is empty for plain samples, else e.g. "cfg_w3_" or
    "inpaint_" (`GuideSettings.tag`). Existing files are replaced only once the new samples are
    complete. Returns the .npz path.
    """
    exp = build(config, for_sampling=True)
    if exp.is_classifier:
        raise ValueError("This is a classifier experiment: it has nothing to sample. Use its "
                         "workdir as sampling.classifier_workdir of a score model's run.")
    mesh = data_mesh()
    state = restore_latest(exp, workdir, mesh)
    step = int(state.step)
    g, num = exp.sampling.guide, exp.sampling.num_samples
    cond, originals = task_inputs(exp, num) if g.task != "none" else (None, None)
    t0 = time.time()
    samples, nfe = draw_samples(exp, state.ema_params, mesh, num, exp.key("sample"), cond)
    elapsed = time.time() - t0
    if not np.all(np.isfinite(samples)):
        raise FloatingPointError(f"Sampling produced non-finite values (step {step}, sampler "
                                 f"{exp.sampling.method}); nothing was written.")
    path = os.path.join(workdir, "samples", f"{g.tag}step_{step}.npz")
    if jax.process_index() == 0:
        arrays = dict(samples=samples, nfe=nfe, labels=sample_labels(exp, num, exp.key("sample")))
        if cond is not None:
            arrays["cond"] = cond["cond"]
            if originals is not None:
                arrays["originals"] = originals
        files.atomic_savez(path, **arrays)
        title = f"step {step}, {exp.sampling.method}, NFE {nfe}"
        if g.task != "none":
            save_task_png(path[:-4] + ".png", exp, samples, cond, originals)
        else:
            ncol = exp.num_classes if g.labels == "all" and exp.num_classes else None
            save_samples_png(path[:-4] + ".png", samples, exp, title, ncol)
        print(f"wrote {len(samples)} samples (NFE {nfe}, {elapsed:.1f} s) to {path} and "
              f"{path[:-4]}.png", flush=True)
    return path


def save_samples_png(path: str, samples: np.ndarray, exp: Experiment, title: str,
                     ncol: int | None = None) -> None:
    """An image grid of image samples, or a scatter plot of 2-D samples over eval data."""
    reference = None
    if not exp.dataset.is_image:
        reference = data_lib.take(exp.dataset.eval, np.arange(min(len(exp.dataset.eval), 5000)))[0]
    plotting.save_samples(path, samples, is_image=exp.dataset.is_image,
                          transform=data_lib.inverse_scaler(exp.data.centered),
                          reference=reference, title=title, ncol=ncol)


def save_task_png(path: str, exp: Experiment, samples, cond, originals, columns: int = 8):
    """`columns` examples of a task: the conditioning, the samples, the originals when known
    (`plotting.task_rows`)."""
    g = exp.sampling.guide
    rows = plotting.task_rows(g.task, samples, cond["cond"], cond.get("mask"), originals,
                              low=-1.0 if exp.data.centered else 0.0, sr_factor=g.sr_factor,
                              columns=columns)
    plotting.save_image_grid(path, data_lib.inverse_scaler(exp.data.centered)(rows),
                             ncol=min(columns, len(samples)))
