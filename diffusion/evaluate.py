"""Evaluating a trained model: eval loss, likelihood (bits/dim) and sample quality.

    record = evaluate(config, workdir)     # --mode eval: one JSON line in <workdir>/eval.jsonl

Each measure is also a function of an `experiment.Experiment`, parameters and the device mesh
(`eval_loss`, `eval_likelihood`, `eval_sample_quality`, `sample_distances`), with its settings
from `exp.eval` (`experiment.EvalSettings`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion import chain as chain_lib
from diffusion import data as data_lib
from diffusion import likelihood, metrics, rng
from diffusion.experiment import EvalSettings, Experiment, build, decoder_of
from diffusion.generate import draw_samples, sample_batches
from diffusion.models import parameterization
from diffusion.parallel import (
    DATA_AXIS,
    batch_sharding,
    data_mesh,
    global_batch,
    map_over_batch,
    to_host,
)
from diffusion.progress import progress
from diffusion.sde import batch_broadcast
from diffusion.train_state import restore_latest


def eval_loss(exp: Experiment, params, num_batches: int, key: jax.Array,
              loss_state=None) -> float:
    """Mean loss of `params` (typically the EMA) on the eval split, over fixed noise.

    loss_state: the train state's, for a loss that reads it (consistency distillation's target
    network and teacher).

    Each batch of eval.batch_size is split over the devices of the mesh, as in training; the
    example at position n of the eval stream draws its noise from fold_in(key, n), so the loss
    does not depend on the devices."""
    mesh = data_mesh()
    cache_key = ("eval_loss", mesh)
    if cache_key not in exp.cache:
        def device_losses(inputs, key, batch):
            params, loss_state = inputs
            batch = dict(batch)
            options = {"state": loss_state} if getattr(exp.loss_fn, "uses_state", False) else {}
            return exp.loss_fn(params, batch, rng.indexed(key, batch.pop("index")), **options)

        exp.cache[cache_key] = map_over_batch(device_losses, mesh, out_specs=P(DATA_AXIS))
    losses = exp.cache[cache_key]
    bs = exp.eval.batch_size
    num_batches = min(num_batches, max(1, len(exp.dataset.eval) // bs))
    total = 0.0
    for i in range(num_batches):
        batch = data_lib.batch_at(exp.dataset, "eval", i, bs, seed=exp.seed, train=False,
                                  centered=exp.data.centered,
                                  uniform_dequantization=exp.data.uniform_dequantization)
        keep = ("x", "label") if exp.conditional else ("x",)
        batch = {k: batch[k] for k in keep} | {"index": np.arange(i * bs, (i + 1) * bs,
                                                                  dtype=np.int32)}
        per_example = losses((params, loss_state), key,
                             jax.tree.map(lambda a: global_batch(a, mesh), batch))
        total += float(np.mean(to_host(per_example)))
    return total / num_batches


CLASSIFIER_TIMES = (0.0, 0.1, 0.25, 0.5)


def classifier_accuracy(exp: Experiment, params) -> dict:
    """Accuracy of a classifier experiment on the whole eval split: at t = 0 (clean data), and
    for a noise-conditional one also on x_t = alpha(t) x_0 + sigma(t) z at CLASSIFIER_TIMES
    (fixed noise)."""
    n, bs = len(exp.dataset.eval), exp.eval.batch_size
    data = data_lib.examples_at(exp.dataset, "eval", np.arange(n), seed=exp.seed,
                                centered=exp.data.centered)
    if "classifier" not in exp.cache:
        def predict(params, x, t, key):
            alpha, sigma = exp.sde.marginal_coeffs(t)
            z = jax.random.normal(key, x.shape, x.dtype)
            xt = batch_broadcast(alpha, x) * x + batch_broadcast(sigma, x) * z
            c_noise = parameterization.time_conditioning(t)
            return jnp.argmax(exp.net.apply({"params": params}, xt, c_noise), axis=-1)

        exp.cache["classifier"] = jax.jit(predict)
    predict = exp.cache["classifier"]
    times = CLASSIFIER_TIMES if getattr(exp.net, "noise_conditional", True) else (0.0,)
    out = {}
    for t in times:
        correct = 0
        for start in range(0, n, bs):
            x = data["x"][start:start + bs]
            pad = np.pad(x, [(0, bs - len(x))] + [(0, 0)] * (x.ndim - 1))
            key = jax.random.fold_in(exp.key("classifier_eval"), start)
            pred = np.asarray(predict(params, pad, np.full((bs,), t, np.float32), key))[:len(x)]
            correct += int(np.sum(pred == data["label"][start:start + bs]))
        out[f"accuracy_t{t:g}"] = correct / n
    return out


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Evaluates the latest checkpoint; appends one JSON line to `<workdir>/eval.jsonl`.

    Reports the eval-split loss of the EMA parameters (the score-matching objective), for a
    discrete-time model with `eval.enable_vlb` DDPM's variational bound (`vlb_bpd`,
    `eval_variational_bound`), with `eval.enable_bpd` the likelihood of eval data through the
    probability-flow ODE (bits/dim for images, nats per example for points; `eval_likelihood`);
    for images with `eval.enable_fid` FID / KID / Inception Score of `eval.fid_num_samples`
    samples (`eval_sample_quality`); for low-dimensional data the sliced Wasserstein distance
    and MMD between `sampling.num_samples` samples (configured sampler) and the eval split.
    Returns the record written.
    """
    exp = build(config)
    mesh = data_mesh()
    state = restore_latest(exp, workdir, mesh)
    step = int(state.step)
    extractor = None
    if exp.dataset.is_image and exp.eval.enable_fid:
        # The Inception weights load (converted on first use, or failing with what to do)
        # before any long work.
        extractor = make_inception_extractor(exp.eval, mesh)
    t0 = time.time()
    record = {"step": step,
              "eval_loss": eval_loss(exp, state.ema_params, exp.eval.num_batches,
                                     exp.key("eval"), state.loss_state),
              "eval_split_examples": len(exp.dataset.eval)}
    if exp.is_classifier:
        record.update(classifier_accuracy(exp, state.ema_params))
    else:
        if exp.eval.enable_vlb and has_variational_bound(exp):
            record.update(eval_variational_bound(exp, state.ema_params, mesh))
        if exp.eval.enable_bpd:
            record.update(eval_likelihood(exp, state.ema_params, mesh))
    if not exp.dataset.is_image and not exp.is_classifier:
        record.update(sample_distances(exp, state.ema_params, mesh))
    if extractor is not None and not exp.is_classifier:
        record.update(eval_sample_quality(exp, state.ema_params, mesh, workdir, extractor))
    record["seconds"] = round(time.time() - t0, 2)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "eval.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
    print(f"eval at step {step}: " + ", ".join(f"{k} {v}" for k, v in record.items()), flush=True)
    return record


# --------------------------------------------------------------------------- likelihood


def make_log_likelihood(exp: Experiment, settings: EvalSettings, mesh: Mesh) -> Callable:
    """A jitted `(params, key, batch) -> (logp (B,), nfe (n_devices,))`, batch = {"x": (B, ...),
    "index": (B,)} sharded over the mesh. Example `index` draws its probe from fold_in(key,
    index) (`diffusion.rng`), and the solver takes its own steps for it, so its logp does not
    depend on the batch size or the devices."""
    e = settings

    def device_logp(params, key, batch):
        score_fn = parameterization.score_fn_from_model(exp.score_model, params)
        logp, nfe = likelihood.log_likelihood(
            rng.indexed(key, batch["index"]), exp.sde, score_fn, batch["x"],
            divergence=e.bpd_divergence, rtol=e.likelihood_rtol, atol=e.likelihood_atol,
            eps=e.likelihood_eps)
        return logp, jnp.reshape(nfe, (1,))

    return map_over_batch(device_logp, mesh)


def eval_likelihood(exp: Experiment, params, mesh: Mesh) -> dict:
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
    e = exp.eval
    if e.bpd_divergence not in likelihood.DIVERGENCES:
        raise ValueError(f"Unknown config.eval.bpd_divergence {e.bpd_divergence!r}: use one of "
                         f"{likelihood.DIVERGENCES}.")
    cache_key = ("log_likelihood", e, mesh)
    if cache_key not in exp.cache:
        exp.cache[cache_key] = make_log_likelihood(exp, e, mesh)
    log_likelihood_fn = exp.cache[cache_key]
    bs, n = e.batch_size, len(exp.dataset.eval)
    per_pass = n if e.bpd_num_batches <= 0 else min(n, e.bpd_num_batches * bs)
    positions = np.concatenate([p * n + np.arange(per_pass) for p in range(e.bpd_num_repeats)])
    print(f"likelihood of {per_pass} eval examples x {e.bpd_num_repeats} dequantizations through "
          f"the probability-flow ODE ({e.bpd_divergence} divergence, rtol {e.likelihood_rtol}); "
          f"set eval.enable_bpd=False to skip", flush=True)
    key = exp.key("likelihood")
    logps, nfe = [], 0
    batches = [positions[i:i + bs] for i in range(0, len(positions), bs)]
    for batch_positions in progress(iter(batches), len(positions), bs, "likelihood examples"):
        # The last batch is padded to the compiled size by repeating its last example.
        padded = np.pad(batch_positions, (0, bs - len(batch_positions)), mode="edge")
        x = data_lib.examples_at(exp.dataset, "eval", padded, seed=exp.seed,
                                 centered=exp.data.centered, uniform_dequantization=True)["x"]
        batch = {"x": x, "index": padded.astype(np.int32)}
        logp, batch_nfe = log_likelihood_fn(params, key, jax.tree.map(
            lambda a: global_batch(a, mesh), batch))
        logps.append(to_host(logp)[:len(batch_positions)])
        nfe = max(nfe, int(np.max(to_host(batch_nfe))))
    logp = np.concatenate(logps).astype(np.float64)
    if not np.all(np.isfinite(logp)):
        raise FloatingPointError("The likelihood ODE solve produced non-finite values (solver "
                                 "failure or a diverging model); try larger eval.likelihood_rtol.")
    if exp.dataset.is_image:
        data_range = 2.0 if exp.data.centered else 1.0
        values = np.asarray(likelihood.bits_per_dim(
            logp, exp.dataset.data_shape, offset=math.log2(exp.dataset.num_levels / data_range)))
        name = "bpd"
    else:
        values, name = -logp, "nll"
    return {name: float(values.mean()),
            f"{name}_std_err": float(values.std() / math.sqrt(len(values))),
            "likelihood_nfe": nfe, "likelihood_examples": len(values)}


# --------------------------------------------------------------------------- variational bound


def has_variational_bound(exp: Experiment) -> bool:
    """Whether `exp` is a discrete-time score model on a Gaussian chain (DDPM / SMLD), whose
    reverse process has a variational bound (`diffusion.chain`)."""
    model = exp.score_model
    return (model is not None and not model.continuous and chain_lib.has_chain(exp.sde)
            and not exp.conditional)


def make_variational_bound(exp: Experiment, mesh: Mesh, variances: tuple[str, ...]) -> Callable:
    """A jitted `(params, key, batch) -> {name: (B,) nats}` of `chain.variational_bound` over
    all N levels, batch = {"x", "index"} sharded over the mesh; example `index` draws level j's
    noise from fold_in(fold_in(key, index), j), whatever the batch size or devices."""
    chain = chain_lib.make_chain(exp.sde)
    decoder = decoder_of(exp.dataset, exp.data.centered)
    model, levels = exp.score_model, jnp.asarray(chain.levels)

    def device_bound(params, key, batch):
        def model_fn(x, j):
            if model.learn_variance:
                return model.at_level_with_variance(params, x, levels[j])
            return model.at_level(params, x, levels[j]), None

        return chain_lib.variational_bound(rng.indexed(key, batch["index"]), chain, decoder,
                                           model_fn, batch["x"], variances)

    return map_over_batch(device_bound, mesh, out_specs=P(DATA_AXIS))


def eval_variational_bound(exp: Experiment, params, mesh: Mesh) -> dict:
    """DDPM's variational bound of eval data (Ho et al. 2020, eq. 5 and Table 2's protocol):
    the prior term, the KL terms of all N levels (one noise draw each) and the decoder, on the
    data's own pixel levels with no dequantization (for points: the Gaussian decoder's density),
    in bits/dim (points: nats per example, `vlb_nll`).

    The first eval.bpd_num_batches batches of eval.batch_size of the eval split (0: all of it).
    `vlb_bpd` is the bound with the model's learned variance, or for a fixed-variance model
    with sampling.variance's Sigma; fixed-variance models also report both
    (`vlb_bpd_beta`, `vlb_bpd_beta_tilde`), from the same network evaluations.
    """
    learned = exp.score_model.learn_variance
    variances = ("learned",) if learned else chain_lib.FIXED_VARIANCES
    cache_key = ("variational_bound", mesh)
    if cache_key not in exp.cache:
        exp.cache[cache_key] = make_variational_bound(exp, mesh, variances)
    bound_fn = exp.cache[cache_key]
    e = exp.eval
    bs, n = e.batch_size, len(exp.dataset.eval)
    count = n if e.bpd_num_batches <= 0 else min(n, e.bpd_num_batches * bs)
    print(f"variational bound of {count} eval examples over the {exp.sde.N} levels of the "
          f"chain; set eval.enable_vlb=False to skip", flush=True)
    key = exp.key("variational_bound")
    totals: dict[str, list] = {}
    batches = [np.arange(i, min(i + bs, count)) for i in range(0, count, bs)]
    for positions in progress(iter(batches), count, bs, "bound examples"):
        padded = np.pad(positions, (0, bs - len(positions)), mode="edge")
        x = data_lib.examples_at(exp.dataset, "eval", padded, seed=exp.seed,
                                 centered=exp.data.centered)["x"]
        batch = {"x": x, "index": padded.astype(np.int32)}
        out = bound_fn(params, key, jax.tree.map(lambda a: global_batch(a, mesh), batch))
        for name, value in out.items():
            totals.setdefault(name, []).append(to_host(value)[:len(positions)])
    nats = {name: np.concatenate(v).astype(np.float64) for name, v in totals.items()}
    if not all(np.all(np.isfinite(v)) for v in nats.values()):
        raise FloatingPointError("The variational bound is not finite (a diverging model?).")
    image = exp.dataset.is_image
    scale = 1.0 / (math.prod(exp.dataset.data_shape) * math.log(2.0)) if image else 1.0
    unit = "bpd" if image else "nll"
    chosen = "learned" if learned else exp.eval.vlb_variance
    record = {f"vlb_{unit}": float(nats[chosen].mean() * scale),
              f"vlb_{unit}_std_err": float(nats[chosen].std() * scale / math.sqrt(count)),
              f"vlb_prior_{unit}": float(nats["prior"].mean() * scale),
              f"vlb_decoder_{unit}": float(nats["decoder_" + chosen].mean() * scale),
              "vlb_examples": count}
    if not learned:
        record.update({f"vlb_{unit}_{v}": float(nats[v].mean() * scale)
                       for v in chain_lib.FIXED_VARIANCES})
    return record


# --------------------------------------------------------------------------- sample quality


def sample_distances(exp: Experiment, params, mesh: Mesh) -> dict:
    """Sliced W2 and MMD between model samples and (up to 10k) eval-split points.

    The same distances between as many training points and the eval split are reported as
    `*_data_floor`: what a perfect model would score with this many samples.
    """
    samples, nfe = draw_samples(exp, params, mesh, exp.sampling.num_samples,
                                exp.key("eval_samples"))
    n = min(len(exp.dataset.eval), 10_000)
    ref = data_lib.take(exp.dataset.eval, np.arange(n))[0].astype(np.float32)
    key = exp.key("projections")
    m = min(2000, n, len(samples))
    train_points = data_lib.batch_at(exp.dataset, "train", 0, len(samples), seed=exp.seed,
                                     train=False)["x"]
    return {"sliced_wasserstein": float(metrics.sliced_wasserstein(key, samples, ref)),
            "sliced_wasserstein_data_floor": float(
                metrics.sliced_wasserstein(key, train_points, ref)),
            "mmd": float(metrics.mmd_rbf(samples[:m], ref[:m])),
            "mmd_data_floor": float(metrics.mmd_rbf(train_points[:m], ref[:m])),
            "sampler_nfe": nfe, "num_samples": len(samples)}


def make_inception_extractor(settings: EvalSettings, mesh: Mesh) -> metrics.InceptionExtractor:
    """The FID Inception network with each batch split over the devices of every process (or,
    if `eval.fid_batch_size` does not divide over them, this process's devices)."""
    sharding = None
    if settings.fid_batch_size % mesh.size == 0:
        sharding = batch_sharding(mesh)
    elif len(jax.local_devices()) > 1 and settings.fid_batch_size % len(jax.local_devices()) == 0:
        sharding = NamedSharding(Mesh(np.array(jax.local_devices()), (DATA_AXIS,)), P(DATA_AXIS))
    # Absent weights are converted on first use (or fail, saying what to do).
    weights = metrics.inception_weights.ensure_weights(settings.inception_weights or None)
    return metrics.InceptionExtractor(weights, settings.fid_batch_size, sharding)


def reference_statistics(exp: Experiment, workdir: str, extractor: metrics.InceptionExtractor
                         ) -> tuple[metrics.FeatureStats, str]:
    """Inception statistics of the data split `eval.fid_ref_split`, computed once and cached.

    The cache file (in `eval.fid_stats_dir`, default `<workdir>/fid_stats`) is named after the
    dataset, the stored split (e.g. tfds "train"), crop, image size, number of examples and the
    Inception weights' hash, so a change of any of them computes new statistics. Images are the
    split's 8-bit pixels as stored (no dequantization or flips). Returns the statistics and a
    description for the record.
    """
    e = exp.eval
    split = e.fid_ref_split
    source = exp.dataset.split(split)
    n = len(source) if e.fid_ref_max_examples <= 0 else min(len(source), e.fid_ref_max_examples)
    h, w, _ = exp.dataset.data_shape
    fingerprint = metrics.fid.weights_fingerprint(extractor.weights_path)
    name = f"{e.fid_ref_tag}_{h}x{w}_{n}_{fingerprint}.npz"
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
            levels, _ = data_lib.take(source, np.arange(start, min(start + bs, n)))
            yield metrics.fid.to_pixels(levels / np.float32(exp.dataset.num_levels - 1))

    stats = extractor.stats(progress(batches(), n, bs, "reference images"),
                            max_keep=max(e.kid_subset_size, 10_000))
    if jax.process_index() == 0:
        stats.save(path, dataset=exp.dataset.name, split=split, num_examples=n,
                   weights=fingerprint)
    return stats, description


def eval_sample_quality(exp: Experiment, params, mesh: Mesh, workdir: str,
                        extractor: metrics.InceptionExtractor) -> dict:
    """FID, KID and (if the weights have the classifier) Inception Score of
    `eval.fid_num_samples` samples of the configured sampler against `reference_statistics`.

    Samples stream through the Inception network batch by batch, so 50k samples need memory for
    one batch and the running statistics only. The record says which sampler and NFE.
    """
    e = exp.eval
    ref, ref_description = reference_statistics(exp, workdir, extractor)
    num = e.fid_num_samples
    method = exp.sampling.method
    print(f"FID / KID: {num} samples ({method} sampler) against {ref_description}", flush=True)
    inverse = data_lib.inverse_scaler(exp.data.centered)
    nfe = 0

    def pixels():
        nonlocal nfe
        batches = sample_batches(exp, params, mesh, num, exp.key("fid"))
        for x, batch_nfe in progress(batches, num, exp.sampling.batch_size, "samples"):
            nfe = max(nfe, batch_nfe)
            if not np.all(np.isfinite(x)):
                raise FloatingPointError(f"Sampling produced non-finite values (sampler "
                                         f"{method}); no FID was recorded.")
            yield metrics.fid.to_pixels(inverse(x))

    gen = extractor.stats(pixels(), max_keep=max(e.kid_subset_size, 10_000))
    out = metrics.sample_quality(gen, ref, e.kid_subsets, e.kid_subset_size, e.is_splits)
    if not extractor.has_logits:
        print("Inception Score: not available (the converted Inception weights have no "
              "classifier layer; see docs/likelihood_and_fid.md)", flush=True)
    out.update(fid_num_samples=num, fid_reference=ref_description, sampler=method,
               sampler_nfe=nfe)
    return out
