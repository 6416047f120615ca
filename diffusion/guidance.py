"""Controllable generation: guided scores and conditional samplers built on any score model.

Guided scores are score functions, so they compose with every sampler of `diffusion.sampling`:

- `cfg_score_fn`: classifier-free guidance (Ho & Salimans 2022),
  s_w(x, t, y) = (1 + w) s(x, t, y) - w s(x, t, null), from one network trained with labels
  dropped to the null label (`model.label_dropout`). w = 0 is the conditional model itself; w > 0
  sharpens towards the class. The conditional and null calls run as one batch of 2B.
- `classifier_score_fn`: classifier guidance (Song et al. 2021, sec. 5 / app. I.1; Dhariwal &
  Nichol 2021), s(x, t) + scale * grad_x log p_t(y | x) with a noise-conditional classifier
  p_t(y | x) (`models.classifier`). At scale 1 with the exact p_t(y | x) this is the exact score
  of p_t(x | y), by Bayes' rule.

Conditional samplers for a known linear part of the data: an orthogonal projection P (P = P^T =
P^2) and the known value P x_0. The unconditional model is used as it is (no retraining):

- `inpaint_sample`: P x = mask * x (mask 1 = known pixel);
- `colorize_sample`: P x = the channel mean of x in every channel, the grey component. score_sde
  writes this with an orthonormal colour basis whose first vector is (1, 1, 1) / sqrt(3); the
  projection onto that vector is the channel mean, and its complement holds the colour;
- `super_resolve_sample`: P x = each factor x factor block replaced by its mean (the average-
  pooling measurement low_res = avgpool(x_0), upsampled); its complement is the detail within
  blocks. Any image whose blocks average to low_res is consistent with the measurement.

`sampler="pc"` (default) is the paper's method (Song et al. 2021, app. I.2): the PC sampler, and
after every predictor and corrector update the known part of the state is replaced by a sample
of the forward SDE at the state's time, alpha(t) P x_0 + sigma(t) P z with fresh z. This only
approximates the conditional p(x_0 | P x_0): the unknown part never sees how the known part's
noise was drawn (measured in tests/test_guidance.py). With `resample=r > 1` each step is
repeated r times, re-noising the state by one forward step in between (RePaint, Lugmayr et al.
2022), which lets the unknown part harmonise with the known and reduces that error.

The few-step deterministic samplers ("ddim", "dpm_solver", "edm", "ode") cannot take a fresh
noise draw at every step without losing their determinism. Their variant replaces the known part
of the model's data prediction instead: D(x, t) -> D - P D + P x_0, i.e. the score
s + alpha / sigma^2 P (x_0 - D). Every sampler here is written on D (or on this score), so the
known part of the state then follows alpha(t) P x_0 + sigma(t) P z with the noise z fixed by the
prior sample (the ODE trajectory of the known part), and the unknown part is driven by a data
prediction that is exact where the data is known. All samplers end with the known part set to
P x_0 exactly. This variant is fast but further from the exact conditional than the PC method:
the known part keeps the prior's noise z for the whole trajectory, and that noise biases the
unknown part (on a Gaussian with correlation 0.9, inpainting one coordinate, the spread of the
filled-in one is 1.8x the exact conditional's at any number of steps; the paper's PC method with
its Langevin corrector 1.02x, RePaint 1.0x; `benchmarks/guidance_accuracy.py`). Prefer it for
image tasks, where the measured gap is small (super-resolution, colorization), or for speed.

Shapes: images (B, H, W, C) in the model's data space ([-1, 1] for the paper configs); points
(B, D) for inpainting 2-D data. Every function is pure and jit-compatible with its sizes static.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffusion import rng, sampling
from diffusion.models.layers import naive_downsample
from diffusion.models.layers import naive_upsample as upsample
from diffusion.sde import SDE, ScoreFn, batch_broadcast, data_prediction

Array = jax.Array
CondScoreFn = Callable[[Array, Array, Array], Array]

TASKS = ("inpaint", "colorize", "super_resolve")


# --------------------------------------------------------------------------- guided scores


def _labels(y, batch: int) -> Array:
    return jnp.broadcast_to(jnp.asarray(y, jnp.int32), (batch,))


def cfg_score_fn(cond_score_fn: CondScoreFn, y, w: float, null_label: int) -> ScoreFn:
    """Classifier-free guidance: (1 + w) s(x, t, y) - w s(x, t, null).

    Args:
      cond_score_fn: cond_score_fn(x, t, y) -> score, y (B,) int labels; label `null_label`
        (= model.num_classes) is the unconditional model.
      y: the labels to sample, an int or (B,).
      w: guidance weight >= 0 (0: the conditional model).
      null_label: the null label.
    """

    def score_fn(x, t):
        batch = x.shape[0]
        if isinstance(w, int | float) and w == 0:   # a traced w takes the general path
            return cond_score_fn(x, t, _labels(y, batch))
        both = cond_score_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                             jnp.concatenate([_labels(y, batch), _labels(null_label, batch)]))
        cond, uncond = both[:batch], both[batch:]
        return (1.0 + w) * cond - w * uncond

    return score_fn


def classifier_score_fn(score_fn: ScoreFn, log_prob_fn: Callable[[Array, Array], Array], y,
                        scale: float) -> ScoreFn:
    """Classifier guidance: s(x, t) + scale * grad_x log p_t(y | x).

    Args:
      score_fn: the unconditional score.
      log_prob_fn: log_prob_fn(x, t) -> (B, num_classes) log-probabilities (or logits: they are
        normalised with log_softmax here) of the noise-conditional classifier.
      y: the labels, an int or (B,).
      scale: the guidance scale (1: Bayes' rule; larger sharpens).
    """

    def log_p_y(x, t):
        logp = jax.nn.log_softmax(log_prob_fn(x, t), axis=-1)
        labels = _labels(y, x.shape[0])
        return jnp.sum(jnp.take_along_axis(logp, labels[:, None], axis=-1))

    def guided(x, t):
        return score_fn(x, t) + scale * jax.grad(log_p_y)(x, t)

    return guided


# --------------------------------------------------------------------------- projections


def channel_mean(x: Array) -> Array:
    """The grey component of colour images: the channel mean in every channel (orthogonal
    projection onto the span of (1, ..., 1) / sqrt(C) at each pixel)."""
    return jnp.broadcast_to(jnp.mean(x, axis=-1, keepdims=True), x.shape)


def block_mean(x: Array, factor: int) -> Array:
    """Each factor x factor block of (B, H, W, C) images replaced by its mean (the orthogonal
    projection onto images that are constant on blocks)."""
    return upsample(downsample(x, factor), factor)


def downsample(x: Array, factor: int) -> Array:
    """Average pooling by `factor` (the super-resolution measurement): (B, H, W, C) ->
    (B, H / factor, W / factor, C): `layers.naive_downsample`, with the sizes checked.
    `upsample(x, factor)`, nearest-neighbour upsampling, is `layers.naive_upsample`."""
    _, h, w, _ = x.shape
    if h % factor or w % factor:
        raise ValueError(f"Image size {h}x{w} is not divisible by the factor {factor}.")
    return naive_downsample(x, factor)


# --------------------------------------------------------------------------- samplers


def replaced_denoiser_score_fn(sde: SDE, score_fn: ScoreFn, project: Callable[[Array], Array],
                               known: Array) -> ScoreFn:
    """The score whose data prediction is D - P D + P x_0: s + alpha / sigma^2 P (x_0 - D).

    `known` is P x_0 (B, ...). With it every sampler written on D (DDIM, DPM-Solver++, EDM, the
    probability-flow ODE) sees a data prediction that is exact on the known part.
    """

    def score(x, t):
        s = score_fn(x, t)
        alpha, sigma = sde.marginal_coeffs(t)
        alpha, sigma = batch_broadcast(alpha, x), batch_broadcast(sigma, x)
        return s + alpha / sigma**2 * (known - project(data_prediction(x, s, alpha, sigma)))

    return score


def replacement_sample(key: Array, sde: SDE, score_fn: ScoreFn, project: Callable[[Array], Array],
                       known: Array, steps: int = 1000, sampler: str = "pc", resample: int = 1,
                       **kwargs) -> tuple[Array, int]:
    """Samples x with P x = `known` (= P x_0) given an orthogonal projection `project`.

    Args:
      key: one PRNG key or (B,) keys, one per sample: sample b's noise (the prior, every step's,
        the re-noised known part) comes from its key alone (`diffusion.rng`).
      sampler: "pc" (the paper's replacement method; kwargs go to `pc_sample`: predictor,
        corrector, snr, n_corrector_steps, eps, denoise, corrector_norm, axis_name) or a
        deterministic sampler of `diffusion.sampling` ("ddim", "dpm_solver", "edm", "ode"), run
        with the replaced data prediction (kwargs go to it).
      steps: grid size of the PC sampler (its n_steps; a VP chain's reverse_diffusion predictor
        needs steps == sde.N), or the deterministic sampler's steps (ignored by "ode"); None:
        the sampler's default (sde.N for "pc").
      resample: RePaint's resampling count r >= 1 for the PC sampler (1: the paper's method).

    Returns:
      (x, nfe) with x of known's shape and P x = known exactly.
    """
    shape = known.shape
    if sampler == "pc":
        x, nfe = _replacement_pc(key, sde, score_fn, project, known, steps, resample, **kwargs)
    else:
        if resample != 1:
            raise ValueError(f"resample={resample} applies to sampler='pc' only (RePaint "
                             f"re-noises the state; a deterministic sampler would not).")
        guided = replaced_denoiser_score_fn(sde, score_fn, project, known)
        if sampler != "ode" and steps is not None:
            kwargs["steps"] = steps
        x, nfe = sampling.get_sampler(sampler)(key, sde, guided, shape, **kwargs)
    return x - project(x) + known, nfe


def _replacement_pc(key, sde, score_fn, project, known, steps, resample,
                    predictor="reverse_diffusion", corrector="langevin", snr=0.16,
                    n_corrector_steps=1, eps=1e-3, denoise=True, corrector_norm="batch",
                    axis_name=None):
    """The paper's replacement method; with resample > 1, RePaint's resampling on top."""
    if resample < 1 or int(resample) != resample:
        raise ValueError(f"resample must be an integer >= 1, got {resample!r}.")
    resample = int(resample)

    def condition(k, x, x_mean, t):
        alpha, sigma = sde.marginal_coeffs(t)
        alpha, sigma = batch_broadcast(alpha, x), batch_broadcast(sigma, x)
        mean_known = alpha * known
        noisy_known = mean_known + sigma * project(rng.normal(k, x.shape, x.dtype))
        return x - project(x) + noisy_known, x_mean - project(x_mean) + mean_known

    pc_kwargs = dict(predictor=predictor, corrector=corrector, snr=snr,
                     n_corrector_steps=n_corrector_steps, n_steps=steps, eps=eps, denoise=denoise,
                     corrector_norm=corrector_norm, axis_name=axis_name)
    if resample == 1:
        return sampling.pc_sample(key, sde, score_fn, known.shape, condition=condition,
                                  **pc_kwargs)
    return _repaint(key, sde, score_fn, known.shape, condition, resample, **pc_kwargs)


def _repaint(key, sde, score_fn, shape, condition, resample, predictor, corrector, snr,
             n_corrector_steps, n_steps, eps, denoise, corrector_norm, axis_name):
    """RePaint (Lugmayr et al. 2022, Alg. 1) on the PC grid: each step from t_j to t_{j+1} runs
    `resample` times; between runs the state goes back from t_{j+1} to t_j by the forward
    transition x <- a x + s z (a = alpha_j / alpha_{j+1}, s^2 = sigma_j^2 - a^2 sigma_{j+1}^2)."""
    keys = rng.per_example(key, shape[0])
    x = rng.prior(sde, keys, shape)
    loop_keys = rng.fold_in(keys, rng.STEPS)
    one = sampling.pc_step_fn(sde, score_fn, shape, predictor, corrector, snr,
                              n_corrector_steps, n_steps, eps, condition, x.dtype,
                              corrector_norm, axis_name)

    def grid_step(carry, inputs):
        x, x_mean = carry
        j, t, dt = inputs
        t_next = t - dt

        def run(u, carry):
            x, x_mean = carry
            k = rng.fold_in(rng.fold_in(loop_keys, j), u)
            x, x_mean = one.step(k, x, x_mean, t, dt)

            def back(x):   # forward transition from t_next to t (not after the last run)
                a_t, s_t = sde.marginal_coeffs(jnp.full(shape[:1], t, x.dtype))
                a_n, s_n = sde.marginal_coeffs(jnp.full(shape[:1], t_next, x.dtype))
                a = batch_broadcast(a_t / a_n, x)
                s = batch_broadcast(jnp.sqrt(jnp.maximum(s_t**2 - (a_t / a_n * s_n) ** 2, 0.0)),
                                    x)
                z = rng.normal(rng.fold_in(k, rng.RENOISE), x.shape, x.dtype)
                return a * x + s * z

            x = jax.lax.cond(u < resample - 1, back, lambda x: x, x)
            return x, x_mean

        return jax.lax.fori_loop(0, resample, run, (x, x_mean)), None

    (x, x_mean), _ = jax.lax.scan(grid_step, (x, x), (jnp.arange(one.n_steps), one.ts, one.dts))
    out = x_mean if denoise and predictor is not None else x
    return out, one.n_steps * one.evals_per_step * resample


def inpaint_sample(key: Array, sde: SDE, score_fn: ScoreFn, x_known: Array, mask: Array,
                   steps: int = 1000, **kwargs) -> tuple[Array, int]:
    """Fills in the unknown entries of `x_known` (mask 1 = known, 0 = to fill); (x, nfe).

    mask broadcasts against x_known (e.g. (B, H, W, 1) for images, (1, D) for points).
    kwargs: see `replacement_sample` (sampler, resample, and the sampler's own options).
    """
    mask = jnp.broadcast_to(jnp.asarray(mask, x_known.dtype), x_known.shape)
    return replacement_sample(key, sde, score_fn, lambda x: mask * x, mask * x_known, steps,
                              **kwargs)


def colorize_sample(key: Array, sde: SDE, score_fn: ScoreFn, gray: Array, steps: int = 1000,
                    channels: int = 3, **kwargs) -> tuple[Array, int]:
    """Colour images whose channel mean is `gray`; (x, nfe).

    gray: (B, H, W, 1) grey levels, or (B, H, W, C) images of which only the channel mean is
    used (score_sde passes RGB images with equal channels).
    """
    gray = jnp.mean(gray, axis=-1, keepdims=True)
    known = jnp.broadcast_to(gray, (*gray.shape[:-1], channels))
    return replacement_sample(key, sde, score_fn, channel_mean, known, steps, **kwargs)


def super_resolve_sample(key: Array, sde: SDE, score_fn: ScoreFn, low_res: Array, factor: int,
                         steps: int = 1000, **kwargs) -> tuple[Array, int]:
    """Images at `factor` times the resolution of `low_res` whose factor x factor block means are
    `low_res` (B, h, w, C); (x, nfe) with x (B, h factor, w factor, C)."""
    if int(factor) != factor or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}.")
    factor = int(factor)
    return replacement_sample(key, sde, score_fn, lambda x: block_mean(x, factor),
                              upsample(low_res, factor), steps, **kwargs)
