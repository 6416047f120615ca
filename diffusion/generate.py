"""Sampling a trained model: the configured sampler over the device mesh, and sample files.

    samples, nfe = draw_samples(exp, params, mesh, num, key)   # (num, *data_shape), data space
    path = sample(config, workdir)     # --mode sample: <workdir>/samples/step_<N>.npz and .png

The sampler and its arguments come from `exp.sampling` (`experiment.SamplingSettings`).
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

from diffusion import datasets, files, plotting
from diffusion.experiment import Experiment, SamplingSettings, build
from diffusion.models import parameterization
from diffusion.parallel import DATA_AXIS, data_mesh, map_over_batch, replicated_batch, to_host
from diffusion.sampling import get_sampler
from diffusion.train_state import restore_latest


def make_sampler(exp: Experiment, settings: SamplingSettings, batch_size: int,
                 mesh: Mesh) -> Callable:
    """A jitted `(params, key, y) -> (samples (batch_size, *data_shape), nfe (n_devices,))`.

    The batch is split over the mesh's devices; device i samples with fold_in(key, i).
    For the pc sampler, `settings.pc_levels` > 0 sets the number of steps: the sampler then runs
    on the SDE's discrete chain with that many levels (N), which the reverse-diffusion /
    ancestral predictors and the ALD corrector step through one level at a time.
    """
    sampler, kwargs = get_sampler(settings.method), settings.kwargs
    sde = dataclasses.replace(exp.sde, N=settings.pc_levels) if settings.pc_levels else exp.sde
    local_shape = (batch_size // mesh.devices.size, *exp.dataset.data_shape)

    def device_sample(params, key, y):
        key = jax.random.fold_in(key, jax.lax.axis_index(DATA_AXIS))
        score_fn = parameterization.score_fn_from_model(exp.score_model, params, y=y)
        x, nfe = sampler(key, sde, score_fn, local_shape, **kwargs)
        # The adaptive ODE solver may take a different number of steps on each device: NFE
        # comes back per device, and the caller reports the largest.
        return x, jnp.reshape(nfe, (1,))

    return map_over_batch(device_sample, mesh)


def sample_batches(exp: Experiment, params, mesh: Mesh, num: int, key: jax.Array
                   ) -> Iterator[tuple[np.ndarray, int]]:
    """Yields (samples (b, *data_shape) in data space, NFE) in batches of sampling.batch_size,
    `num` samples in all (the last batch cut to size); batch i uses fold_in(key, i).

    A class-conditional model samples labels uniformly at random (fold_in(key_i, 1)).
    With several processes every process must call this alike (the sampler is one program over
    all devices); each gets all samples.
    """
    s = exp.sampling
    bs = s.batch_size
    cache_key = ("sampler", s, mesh)
    if cache_key not in exp.compiled:
        exp.compiled[cache_key] = make_sampler(exp, s, bs, mesh)
    sampler = exp.compiled[cache_key]
    for i in range(math.ceil(num / bs)):
        k = jax.random.fold_in(key, i)
        y = (np.asarray(jax.random.randint(jax.random.fold_in(k, 1), (bs,), 0, exp.num_classes))
             if exp.conditional else np.zeros((bs,), np.int32))
        x, nfe = sampler(params, k, replicated_batch(y, mesh))
        yield to_host(x)[:num - i * bs], int(np.max(to_host(nfe)))


def draw_samples(exp: Experiment, params, mesh: Mesh, num: int, key: jax.Array
                 ) -> tuple[np.ndarray, int]:
    """`num` samples (num, *data_shape) in data space, in batches of sampling.batch_size."""
    out, nfes = [], [0]
    for x, nfe in sample_batches(exp, params, mesh, num, key):
        out.append(x)
        nfes.append(nfe)
    return np.concatenate(out), max(nfes)


def save_samples_png(path: str, samples: np.ndarray, exp: Experiment, title: str) -> None:
    """An image grid of image samples, or a scatter plot over eval data of 2-D samples."""
    if exp.dataset.is_image:
        plotting.save_image_grid(path, datasets.inverse_scaler(exp.data.centered)(samples))
    else:
        ref = np.stack([exp.dataset.eval[i]["x"] for i in range(min(len(exp.dataset.eval), 5000))])
        plotting.save_scatter(path, samples, ref[:, :2] if ref.shape[1] > 2 else ref, title=title)


def sample(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Samples `sampling.num_samples` from the latest EMA checkpoint.

    Writes `<workdir>/samples/step_<N>.npz` (array `samples` in data space, shaped like the data,
    and `nfe`) and `step_<N>.png` next to it (an image grid, or a scatter plot for 2-D data).
    Existing files are replaced only once the new samples are complete. Returns the .npz path.
    """
    exp = build(config, shape_only_data=True)
    mesh = data_mesh()
    state = restore_latest(exp, workdir, mesh)
    step = int(state.step)
    t0 = time.time()
    samples, nfe = draw_samples(exp, state.ema_params, mesh, exp.sampling.num_samples,
                                exp.key("sample"))
    elapsed = time.time() - t0
    if not np.all(np.isfinite(samples)):
        raise FloatingPointError(f"Sampling produced non-finite values (step {step}, sampler "
                                 f"{exp.sampling.method}); nothing was written.")
    path = os.path.join(workdir, "samples", f"step_{step}.npz")
    if jax.process_index() == 0:
        files.atomic_savez(path, samples=samples, nfe=nfe)
        save_samples_png(path[:-4] + ".png", samples, exp,
                         f"step {step}, {exp.sampling.method}, NFE {nfe}")
        print(f"wrote {len(samples)} samples (NFE {nfe}, {elapsed:.1f} s) to {path} and "
              f"{path[:-4]}.png", flush=True)
    return path
