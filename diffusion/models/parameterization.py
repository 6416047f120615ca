"""Turning a network into a score: input scaling, noise conditioning and output parameterization.

For x_t = alpha(t) x_0 + sigma(t) z, the network F sees c_in * x_t and a noise conditioning
c_noise, and its output is mapped to the score grad log p_t(x_t) by what it is trained to predict
(Karras et al. 2022, "EDM", Table 1, written as a score; Song et al. 2021, score_sde):

  "score"    F = grad log p_t(x_t)                       score = F
  "epsilon"  F = E[z | x_t]           (DDPM, score_sde)   score = -F / sigma
  "x0"       F = E[x_0 | x_t]         (denoiser, EDM)     score = (alpha F - x_t) / sigma^2

  noise_input "time":      c_noise = 999 t       (score_sde's continuous VP models: sinusoidal
                                                  embeddings then see DDPM-like step indices)
  noise_input "log_sigma": c_noise = log sigma(t) (score_sde's VE / NCSN++ Fourier embedding;
                                                  EDM uses log(sigma) / 4)
  scale_input:             c_in = 1 / sqrt(alpha^2 + sigma^2), the inverse std of x_t for
                           unit-variance data (EDM's c_in); it is 1 for VP SDEs. Else c_in = 1.

"epsilon" is score_sde's scaling of the network output by the noise level: `-model / std` for
its continuous VP models and `scale_by_sigma` for VE ones.

Mixed precision (`compute_dtype="bfloat16"`): the float32 parameters and the network input are
cast to bfloat16 for the network's forward pass, whose output is cast back to float32 before it
becomes a score; the noise conditioning c_noise stays float32 (999 t in bfloat16 would be rounded
to multiples of 4) and the networks form their noise embedding from it in float32. Gradients flow
back through the casts to the float32 parameters, so the optimizer, EMA and checkpoints stay
float32 (Micikevicius et al. 2018, without loss scaling, which bfloat16's float32 exponent range
makes unnecessary).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion.sde import SDE, batch_broadcast

Array = jax.Array
ScoreModel = Callable[..., Array]

# What the network predicts -> score, given its output F, x_t and alpha, sigma broadcast to x.
_OUTPUT_TO_SCORE = {
    "score": lambda out, x, alpha, sigma: out,
    "epsilon": lambda out, x, alpha, sigma: -out / sigma,
    "x0": lambda out, x, alpha, sigma: (alpha * out - x) / sigma**2,
}
# Noise conditioning c_noise (B,) from t (B,) and sigma(t) (B,).
_NOISE_CONDITIONING = {
    "time": lambda t, sigma: 999.0 * t,
    "log_sigma": lambda t, sigma: jnp.log(sigma),
}
PARAMETERIZATIONS = tuple(_OUTPUT_TO_SCORE)
NOISE_INPUTS = tuple(_NOISE_CONDITIONING)
COMPUTE_DTYPES = ("float32", "bfloat16")


def cast_floating(tree, dtype):
    """Every floating-point leaf of `tree` cast to `dtype`; other leaves untouched."""
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def make_score_model(net: nn.Module, sde: SDE, parameterization: str = "epsilon",
                     noise_input: str = "time", scale_input: bool = True,
                     compute_dtype: str = "float32") -> ScoreModel:
    """Wraps `net` (called as net(x, c_noise, y=..., train=...)) into a score model.

    Args:
      net: a flax module mapping x (B, ...) and c_noise (B,) to an output shaped like x.
      sde: the forward process; only `sde.marginal_coeffs(t) -> (alpha, sigma)` is used.
      parameterization: what the network predicts, one of PARAMETERIZATIONS.
      noise_input: what the network is conditioned on, one of NOISE_INPUTS.
      scale_input: feed c_in x with c_in = 1 / sqrt(alpha^2 + sigma^2) (else x itself).
      compute_dtype: the network's dtype, one of COMPUTE_DTYPES; "bfloat16" is mixed precision
        (see the module docstring). Parameters are float32 either way.

    Returns:
      score_model(params, x, t, *, y=None, train=False, rng=None) -> score shaped like x, with
      x (B, ...), t (B,), y (B,) int labels or None, and rng the dropout key (needed when
      train=True and the network has dropout).
    """
    if parameterization not in _OUTPUT_TO_SCORE:
        raise ValueError(f"Unknown parameterization {parameterization!r}: "
                         f"config.model.parameterization must be one of {list(PARAMETERIZATIONS)}.")
    if noise_input not in _NOISE_CONDITIONING:
        raise ValueError(f"Unknown noise input {noise_input!r}: "
                         f"config.model.noise_input must be one of {list(NOISE_INPUTS)}.")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"Unknown compute dtype {compute_dtype!r}: must be one of "
                         f"{list(COMPUTE_DTYPES)} (float16 would need loss scaling).")
    dtype = jnp.dtype(compute_dtype)
    output_to_score = _OUTPUT_TO_SCORE[parameterization]
    noise_conditioning = _NOISE_CONDITIONING[noise_input]
    input_scale = (lambda alpha, sigma: jax.lax.rsqrt(alpha**2 + sigma**2)) if scale_input else (
        lambda alpha, sigma: jnp.ones_like(sigma))

    def score_model(params, x: Array, t: Array, *, y: Array | None = None, train: bool = False,
                    rng: Array | None = None) -> Array:
        alpha, sigma = sde.marginal_coeffs(t)
        c_in = batch_broadcast(input_scale(alpha, sigma), x)
        c_noise = noise_conditioning(t, sigma)
        net_x = c_in * x
        if dtype != jnp.float32:      # mixed precision
            params, net_x = cast_floating(params, dtype), net_x.astype(dtype)
        out = net.apply({"params": params}, net_x, c_noise, y=y, train=train,
                        rngs={} if rng is None else {"dropout": rng})
        out = out.astype(x.dtype)
        return output_to_score(out, x, batch_broadcast(alpha, x), batch_broadcast(sigma, x))

    return score_model


def score_fn_from_model(score_model: ScoreModel, params, y: Array | None = None
                        ) -> Callable[[Array, Array], Array]:
    """The plain score_fn(x, t) -> score of `score_model` in evaluation mode (no dropout).

    y, if given, are the (B,) labels every call is conditioned on.
    """

    def score_fn(x: Array, t: Array) -> Array:
        return score_model(params, x, t, y=y, train=False)

    return score_fn
