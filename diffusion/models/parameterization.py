"""Turning a network into a score: noise conditioning, network input and output parameterization.

For x_t = alpha(t) x_0 + sigma(t) z, the network F sees the input x_t (see "input" below) and a
noise conditioning c_noise, and its output is mapped to the score grad log p_t(x_t) by what it is
trained to predict (Karras et al. 2022, "EDM", Table 1, written as a score; Song et al. 2021,
score_sde's `models/utils.py::get_score_fn`):

  "score"    F = grad log p_t(x_t)                       score = F
             with scale_by_sigma (score_sde's VE models): score = F / sigma
  "epsilon"  F = E[z | x_t]    (DDPM; score_sde's VP and sub-VP models)  score = -F / sigma
  "x0"       F = E[x_0 | x_t]  (denoiser)                score = (alpha F - x_t) / sigma^2
  "v"        F = E[v | x_t] / c_v, v = alpha' x_0 + sigma' z the velocity of the interpolant
             (flow matching), c_v = sqrt(alpha'^2 + sigma'^2) its std for unit-variance data:
             score = (alpha c_v F - alpha' x_t) / (sigma (alpha' sigma - alpha sigma'))
             For VP SDEs (alpha^2 + sigma^2 = 1, alpha = cos phi, sigma = sin phi), c_v = dphi/dt
             and F is Salimans & Ho's (2022) v = alpha z - sigma x_0 exactly; for the rectified
             flow F = (z - x_0) / sqrt(2); for VE it is z (epsilon). The velocity itself is
             c_v F: the flow-matching loss regresses it.
  "edm"      EDM's preconditioning (Karras et al. 2022, Table 1 and eq. 7) in the scaled
             variables x~ = x_t / alpha, sigma~ = sigma / alpha, where every process reads
             x~ = x_0 + sigma~ z: D = c_skip x~ + c_out F(c_in x~; c_noise) with
             c_skip = s_d^2 / (sigma~^2 + s_d^2), c_out = sigma~ s_d / sqrt(sigma~^2 + s_d^2),
             c_in = 1 / sqrt(sigma~^2 + s_d^2), c_noise = ln(sigma~) / 4 and s_d = sigma_data.
             As a score (alpha D - x_t) / sigma^2 this is
             score = -x_t / (sigma^2 + alpha^2 s_d^2) + alpha s_d F / (sigma sqrt(sigma^2 +
             alpha^2 s_d^2)): the score of N(0, s_d^2) data plus the network's correction. It
             sets the network's input and noise conditioning itself (noise_input is not used,
             scale_input must be off).
  "consistency"  a consistency function f(x_t, t) (Song et al. 2023, eq. 5 / app. C; iCT), on
             sigma~ as "edm": f = c_skip (alpha_b / alpha) x_t + c_out F(c_in x~; c_noise) with
             c_skip = s_d^2 / ((sigma~ - sigma~_b)^2 + s_d^2), c_out = (sigma~ - sigma~_b) s_d /
             sqrt(sigma~^2 + s_d^2), c_in and c_noise as EDM's, and b = `boundary_time` (the
             smallest training time, training.eps), so that f(x, b) = x exactly. As a score it
             is the data prediction f: score = (alpha f - x_t) / sigma^2, so every sampler and
             the likelihood run on it; `consistency_function` gives f directly.

Noise conditioning of continuous-time models (`continuous=True`):
  noise_input "time":      c_noise = 999 t        (score_sde's continuous VP / sub-VP models:
                                                   the positional embedding sees DDPM-like steps;
                                                   `time_conditioning`, also the classifier's)
  noise_input "log_sigma": c_noise = log sigma(t) (score_sde's VE / NCSN++ Fourier embedding)

Discrete-time models (`continuous=False`, trained by the DDPM or SMLD loss on the N levels of the
SDE's chain, the `discrete_coeffs` of VPSDE, CosineVPSDE and VESDE) are conditioned as score_sde
conditions them: at level i, c_noise = i for VP-type chains (DDPM's step index) and N - 1 - i for
VE (SMLD counts its levels from the largest sigma), and (alpha, sigma) are the level's. Called
at a continuous time t (by a sampler), VP-type models see c_noise = t (N - 1) / T and the level
floor(t (N - 1) / T), VE models the level round(t (N - 1) / T), as score_sde's `get_score_fn`
does.

Network input:
  center_input: the network sees 2 x - 1, for data in [0, 1] (score_sde's networks do this
                themselves when config.data.centered is False: its VE CIFAR-10 models).
  scale_input:  the network sees x / sqrt(alpha^2 + sigma^2), the inverse std of x_t for
                unit-variance data (EDM's c_in; 1 for VP SDEs). Our option, not score_sde's:
                off in the paper configs. It assumes data centred at 0, so it cannot be combined
                with center_input.

Learned variances (`learn_variance=True`, Nichol & Dhariwal 2021, eq. 15): the network outputs
twice the data's channels; the first half is the output F above, the second half r in [-1, 1]
gives v = (r + 1) / 2, with which a discrete chain's reverse kernel interpolates its log
variance between log beta_t and log beta~_t (`diffusion.chain`). The score (every sampler, the
likelihood) uses the first half; `score_and_variance` / `at_level_with_variance` give both.

Mixed precision (`compute_dtype="bfloat16"`): the float32 parameters and the network input are cast
to bfloat16 for the network's forward pass, whose output is cast back to float32 before it becomes
a score; the noise conditioning c_noise stays float32 (999 t in bfloat16 would be rounded to
multiples of 4), and so do the random Fourier frequencies (`layers.UNTRAINED_MODULES`), from which
the networks form their noise embedding in float32. Gradients flow back through the casts to the
float32 parameters, so the optimizer, EMA and checkpoints stay float32 (Micikevicius et al. 2018,
without loss scaling, which bfloat16's float32 exponent range makes unnecessary).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion.models.layers import is_untrained
from diffusion.sde import SDE, ScoreWithVelocity, _discrete_index, batch_broadcast
from diffusion.sde_base import ScoreWithVariance

Array = jax.Array


def _v_to_score(out, x, alpha, sigma, d_alpha, d_sigma, sigma_data):
    scale = jnp.sqrt(d_alpha**2 + d_sigma**2)
    return (alpha * scale * out - d_alpha * x) / (sigma * (d_alpha * sigma - alpha * d_sigma))


def _edm_to_score(out, x, alpha, sigma, d_alpha, d_sigma, sigma_data):
    variance = sigma**2 + (alpha * sigma_data) ** 2     # of x_t, for data of std sigma_data
    return -x / variance + alpha * sigma_data * out / (sigma * jnp.sqrt(variance))


# What the network predicts -> score, given its output F, x_t and (alpha, sigma, alpha', sigma')
# broadcast to x (the rates are None for discrete-time models, which the "v" and "edm"
# parameterizations refuse), and the data std of the "edm" parameterization.
_OUTPUT_TO_SCORE = {
    "score": lambda out, x, alpha, sigma, *_: out,
    "epsilon": lambda out, x, alpha, sigma, *_: -out / sigma,
    "x0": lambda out, x, alpha, sigma, *_: (alpha * out - x) / sigma**2,
    "v": _v_to_score,
    "edm": _edm_to_score,
    "consistency": None,      # written by ScoreModel._to_score (it needs the boundary time)
}
_NEEDS_RATES = ("v",)

def time_conditioning(t: Array) -> Array:
    """c_noise = 999 t: a time t in [0, 1] (any shape) as the DDPM step index 0..999 it
    stands for, score_sde's conditioning of its continuous VP / sub-VP networks (noise_input
    "time") and of the noise-conditional classifier (`losses.make_classifier_loss`)."""
    return 999.0 * t


# Noise conditioning c_noise (B,) of continuous-time models from t (B,) and sigma(t) (B,).
_NOISE_CONDITIONING = {
    "time": lambda t, sigma: time_conditioning(t),
    "log_sigma": lambda t, sigma: jnp.log(sigma),
}
PARAMETERIZATIONS = tuple(_OUTPUT_TO_SCORE)
NOISE_INPUTS = tuple(_NOISE_CONDITIONING)
COMPUTE_DTYPES = ("float32", "bfloat16")


def cast_floating(tree, dtype):
    """Every floating-point leaf of `tree` cast to `dtype`, except the untrained constants
    (`layers.UNTRAINED_MODULES`: 2 pi t W needs the Fourier frequencies W in float32)."""

    def cast(path, a):
        floating = jnp.issubdtype(a.dtype, jnp.floating)
        return a.astype(dtype) if floating and not is_untrained(path) else a

    return jax.tree_util.tree_map_with_path(cast, tree)


@dataclasses.dataclass(frozen=True)
class ScoreModel:
    """A network with the SDE, parameterisation, noise conditioning and input of a config.

    Call it as `score_model(params, x, t, *, y=None, train=False, rng=None) -> score` shaped like
    x, with x (B, ...), t (B,), y (B,) int labels or None, and rng the dropout key (needed when
    train=True and the network has dropout). Discrete-time losses call `at_level` instead.
    Fields are described in the module docstring; build it with `make_score_model` or
    `diffusion.models.get_score_model(config)`.
    """

    net: nn.Module
    sde: SDE
    parameterization: str = "epsilon"
    noise_input: str = "time"
    scale_input: bool = False
    compute_dtype: str = "float32"
    scale_by_sigma: bool = False
    center_input: bool = False
    continuous: bool = True
    sigma_data: float = 0.5
    learn_variance: bool = False
    boundary_time: float = 1e-5

    def __post_init__(self):
        if self.parameterization not in _OUTPUT_TO_SCORE:
            raise ValueError(f"Unknown parameterization {self.parameterization!r}: config.model."
                             f"parameterization must be one of {list(PARAMETERIZATIONS)}.")
        if self.noise_input not in _NOISE_CONDITIONING:
            raise ValueError(f"Unknown noise input {self.noise_input!r}: "
                             f"config.model.noise_input must be one of {list(NOISE_INPUTS)}.")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"Unknown compute dtype {self.compute_dtype!r}: must be one of "
                             f"{list(COMPUTE_DTYPES)} (float16 would need loss scaling).")
        if self.scale_by_sigma and self.parameterization != "score":
            raise ValueError(f"model.scale_by_sigma divides a score output by sigma (score_sde's "
                             f"VE models); it needs model.parameterization='score', got "
                             f"{self.parameterization!r}.")
        if self.scale_input and self.center_input:
            raise ValueError("model.scale_input assumes data centred at 0; it cannot be combined "
                             "with data in [0, 1] (data.centered=False). Set one of them off.")
        if not self.continuous and self.parameterization in ("v", "edm", "consistency"):
            raise ValueError(f"model.parameterization={self.parameterization!r} is written on "
                             f"continuous time (the rates alpha', sigma' or sigma~ = sigma / "
                             f"alpha); use training.continuous=True.")
        if self._edm_like and (self.scale_input or self.center_input):
            raise ValueError(f"model.parameterization={self.parameterization!r} scales the "
                             f"network input itself (c_in) and assumes data centred at 0: set "
                             f"model.scale_input=False and data.centered=True.")
        if self.parameterization == "consistency" and not (
                0 <= self.boundary_time < self.sde.T and float(np.asarray(
                    self.sde.marginal_coeffs(np.asarray([self.boundary_time]))[1])[0]) > 0):
            raise ValueError(f"A consistency model's boundary time (training.eps) must lie in "
                             f"[0, T) with sigma > 0 there, got {self.boundary_time}.")
        if self.sigma_data <= 0:
            raise ValueError(f"data.sigma_data (the data's std, EDM: 0.5) must be positive, got "
                             f"{self.sigma_data}.")
        if not self.continuous and not hasattr(self.sde, "discrete_coeffs"):
            raise ValueError(f"A discrete-time model (training.continuous=False) is conditioned "
                             f"on the levels of the SDE's discrete chain; "
                             f"{type(self.sde).__name__} has none (DDPM: vpsde / cosine_vpsde; "
                             f"SMLD: vesde). Use training.continuous=True.")

        if self.learn_variance and (self.continuous or self.parameterization in ("v", "edm")):
            raise ValueError("model.learn_variance learns the variance of a discrete chain's "
                             "reverse kernel: it needs training.continuous=False (and the "
                             "score / epsilon / x0 parameterization).")

    @property
    def _edm_like(self) -> bool:
        """EDM's input scaling and noise conditioning ("edm" and "consistency")."""
        return self.parameterization in ("edm", "consistency")

    @property
    def _ve_chain(self) -> bool:
        return not hasattr(self.sde, "alphas_cumprod")

    def conditioning(self, t: Array) -> tuple[Array, Array, Array]:
        """(alpha, sigma, c_noise), each (B,), that the network is used with at times t (B,)."""
        if self.continuous:
            alpha, sigma = self.sde.marginal_coeffs(t)
            if self._edm_like:
                return alpha, sigma, 0.25 * (jnp.log(sigma) - jnp.log(alpha))
            return alpha, sigma, _NOISE_CONDITIONING[self.noise_input](t, sigma)
        steps = t * ((self.sde.N - 1) / self.sde.T)
        if self._ve_chain:   # score_sde: label round((T - t)(N - 1)), counted from sigma_max
            label = jnp.round((self.sde.T - t) * ((self.sde.N - 1) / self.sde.T))
            label = label.astype(jnp.int32)
            alpha, sigma = self.sde.discrete_coeffs(self.sde.N - 1 - label)
            return alpha, sigma, label.astype(t.dtype)
        alpha, sigma = self.sde.discrete_coeffs(_discrete_index(t, self.sde.T, self.sde.N))
        return alpha, sigma, steps

    def level_conditioning(self, i: Array) -> tuple[Array, Array, Array]:
        """(alpha_i, sigma_i, c_noise_i) of discrete levels i (B,) int, for discrete training."""
        alpha, sigma = self.sde.discrete_coeffs(i)
        label = (self.sde.N - 1 - i) if self._ve_chain else i
        return alpha, sigma, label.astype(jnp.float32)

    def __call__(self, params, x: Array, t: Array, *, y: Array | None = None,
                 train: bool = False, rng: Array | None = None) -> Array:
        rates = (self.sde.marginal_rates(t)[2:] if self.parameterization in _NEEDS_RATES
                 else None)
        return self.score(params, x, *self.conditioning(t), y=y, train=train, rng=rng,
                          rates=rates)

    def at_level(self, params, x: Array, i: Array, *, y: Array | None = None,
                 train: bool = False, rng: Array | None = None) -> Array:
        """The score at discrete level i (B,) int of the SDE's chain (discrete training)."""
        return self.score(params, x, *self.level_conditioning(i), y=y, train=train, rng=rng)

    def with_variance(self, params, x: Array, t: Array, *, y: Array | None = None
                      ) -> tuple[Array, Array]:
        """(score, v) at times t (B,) in evaluation mode: v in [0, 1] like x, the learned
        variance fraction (`learn_variance` models only)."""
        return self.score_and_variance(params, x, *self.conditioning(t), y=y)

    def at_level_with_variance(self, params, x: Array, i: Array, *, y: Array | None = None,
                               train: bool = False, rng: Array | None = None
                               ) -> tuple[Array, Array]:
        """(score, v) at discrete levels i (B,) int (the hybrid / vlb losses)."""
        return self.score_and_variance(params, x, *self.level_conditioning(i), y=y, train=train,
                                       rng=rng)

    def score_and_variance(self, params, x: Array, alpha: Array, sigma: Array, c_noise: Array, *,
                           y: Array | None = None, train: bool = False,
                           rng: Array | None = None) -> tuple[Array, Array]:
        """The score and the learned variance fraction v = (r + 1) / 2, both like x."""
        if not self.learn_variance:
            raise ValueError("This model has a fixed variance (model.learn_variance=False).")
        out, r = self._raw_output(params, x, alpha, sigma, c_noise, y=y, train=train, rng=rng)
        return self._to_score(out, x, alpha, sigma, None), 0.5 * (r + 1.0)

    @property
    def has_velocity(self) -> bool:
        """Whether `velocity` is available: a continuous-time "v" model, whose output is the
        velocity itself. (Every other parameterization reaches it through the score or divides
        by alpha; EDM's noise conditioning ln(sigma / alpha) / 4 is infinite where alpha = 0.)"""
        return self.continuous and self.parameterization == "v"

    def velocity(self, params, x: Array, t: Array, *, y: Array | None = None) -> Array:
        """The probability-flow velocity alpha' E[x_0 | x_t] + sigma' E[z | x_t] at times t (B,),
        c_v F, in evaluation mode (`sde.ScoreWithVelocity`): finite where alpha = 0."""
        if not self.has_velocity:
            raise ValueError(f"A {self.parameterization!r} model gives its velocity only through "
                             f"the score; `velocity` is for continuous-time 'v' models.")
        alpha, sigma, c_noise = self.conditioning(t)
        _, _, d_alpha, d_sigma = self.sde.marginal_rates(t)
        out = self.output(params, x, alpha, sigma, c_noise, y=y)
        return batch_broadcast(jnp.sqrt(d_alpha**2 + d_sigma**2).astype(x.dtype), x) * out

    def score(self, params, x: Array, alpha: Array, sigma: Array, c_noise: Array, *,
              y: Array | None = None, train: bool = False, rng: Array | None = None,
              rates: tuple[Array, Array] | None = None) -> Array:
        """The score of x (B, ...) given the (B,) coefficients and noise conditioning (and the
        rates alpha'(t), sigma'(t) (B,) for the "v" parameterization)."""
        out = self.output(params, x, alpha, sigma, c_noise, y=y, train=train, rng=rng)
        return self._to_score(out, x, alpha, sigma, rates)

    def consistency_function(self, params, x: Array, t: Array, *, y: Array | None = None,
                             train: bool = False, rng: Array | None = None) -> Array:
        """f(x, t) of a "consistency" model, like x; f(x, boundary_time) = x exactly."""
        alpha, sigma, c_noise = self.conditioning(t)
        out = self.output(params, x, alpha, sigma, c_noise, y=y, train=train, rng=rng)
        return self._consistency(out, x, alpha.astype(x.dtype), sigma.astype(x.dtype))

    def _consistency(self, out, x, alpha, sigma):
        """c_skip (alpha_b / alpha) x + c_out F (the module docstring), alpha and sigma (B,). The
        boundary's coefficients are computed as the time's are, so at t = b the skip factor is 1
        and c_out 0 exactly."""
        alpha_b, sigma_b = self.sde.marginal_coeffs(
            jnp.full(alpha.shape, self.boundary_time, alpha.dtype))
        gap = sigma / alpha - sigma_b / alpha_b
        s_d = self.sigma_data
        c_skip = s_d**2 / (gap**2 + s_d**2)
        c_out = gap * s_d / jnp.sqrt((sigma / alpha) ** 2 + s_d**2)
        return (batch_broadcast(c_skip * (alpha_b / alpha), x) * x
                + batch_broadcast(c_out, x) * out)

    def _to_score(self, out, x, alpha, sigma, rates):
        if self.parameterization == "consistency":
            alpha, sigma = alpha.astype(x.dtype), sigma.astype(x.dtype)
            f = self._consistency(out, x, alpha, sigma)
            return (batch_broadcast(alpha, x) * f - x) / batch_broadcast(sigma, x) ** 2
        sigma_x = batch_broadcast(sigma.astype(x.dtype), x)
        d_alpha, d_sigma = (None, None) if rates is None else (
            batch_broadcast(r.astype(x.dtype), x) for r in rates)
        return _OUTPUT_TO_SCORE[self.parameterization](
            out, x, batch_broadcast(alpha.astype(x.dtype), x), sigma_x, d_alpha, d_sigma,
            self.sigma_data)

    def output(self, params, x: Array, alpha: Array, sigma: Array, c_noise: Array, *,
               y: Array | None = None, train: bool = False, rng: Array | None = None) -> Array:
        """The network's output F for x (B, ...) (in x's dtype, divided by sigma with
        scale_by_sigma), from its input as the module docstring gives it; with learn_variance
        its first half."""
        return self._raw_output(params, x, alpha, sigma, c_noise, y=y, train=train, rng=rng)[0]

    def _raw_output(self, params, x, alpha, sigma, c_noise, *, y=None, train=False, rng=None
                    ) -> tuple[Array, Array | None]:
        """(F, r): F as `output`, r the variance half of a learn_variance network (else None)."""
        net_x = x
        if self.center_input:
            net_x = 2.0 * x - 1.0
        if self.scale_input:
            net_x = batch_broadcast(jax.lax.rsqrt(alpha**2 + sigma**2), x) * net_x
        if self._edm_like:     # c_in x~ = x / sqrt(sigma^2 + alpha^2 s_d^2)
            net_x = batch_broadcast(jax.lax.rsqrt(sigma**2 + (alpha * self.sigma_data) ** 2),
                                    x) * net_x
        dtype = jnp.dtype(self.compute_dtype)
        if dtype != jnp.float32:      # mixed precision
            params = cast_floating(params, dtype)
            net_x = net_x.astype(dtype)
        out = self.net.apply({"params": params}, net_x, c_noise, y=y,
                             train=train, rngs={} if rng is None else {"dropout": rng})
        out = out.astype(x.dtype)
        r = None
        if self.learn_variance:
            out, r = jnp.split(out, 2, axis=-1)
        if self.scale_by_sigma:
            out = out / batch_broadcast(sigma.astype(x.dtype), x)
        return out, r


def make_score_model(net: nn.Module, sde: SDE, parameterization: str = "epsilon",
                     noise_input: str = "time", scale_input: bool = False,
                     compute_dtype: str = "float32", **options: Any) -> ScoreModel:
    """Wraps `net` (called as net(x, c_noise, y=..., train=...)) into a `ScoreModel`.

    Args:
      net: a flax module mapping x (B, ...) and c_noise (B,) to an output shaped like x.
      sde: the forward process (its marginal coefficients, or its discrete chain).
      parameterization: what the network predicts, one of PARAMETERIZATIONS.
      noise_input: what a continuous-time network is conditioned on, one of NOISE_INPUTS.
      scale_input: feed c_in x with c_in = 1 / sqrt(alpha^2 + sigma^2) (else x itself).
      compute_dtype: the network's dtype, one of COMPUTE_DTYPES; "bfloat16" is mixed precision
        (see the module docstring). Parameters are float32 either way.
      options: the other `ScoreModel` fields: scale_by_sigma, center_input, continuous,
        sigma_data (the data std of the "edm" / "consistency" parameterizations), learn_variance,
        boundary_time (the "consistency" parameterization's).
    """
    return ScoreModel(net, sde, parameterization, noise_input, scale_input, compute_dtype,
                      **options)


def score_fn_from_model(score_model: Callable, params, y: Array | None = None
                        ) -> Callable[[Array, Array], Array]:
    """The plain score_fn(x, t) -> score of `score_model` in evaluation mode (no dropout).

    y, if given, are the (B,) labels every call is conditioned on. For a model with a learned
    variance it is a `sde_base.ScoreWithVariance` (the DDPM sampler uses the variance). For a
    model that gives its velocity ("v", `ScoreModel.has_velocity`) it is a
    `sde.ScoreWithVelocity`, whose `velocity(x, t)` the probability-flow ODE follows.
    """

    def score_fn(x: Array, t: Array) -> Array:
        return score_model(params, x, t, y=y, train=False)

    if getattr(score_model, "learn_variance", False):
        return ScoreWithVariance(score_fn, lambda x, t: score_model.with_variance(params, x, t,
                                                                                   y=y))
    if getattr(score_model, "has_velocity", False):
        return ScoreWithVelocity(score_fn, lambda x, t: score_model.velocity(params, x, t, y=y))
    return score_fn
