"""The forward process of score-based models and its reversal, for every SDE in `diffusion.sde`.

`SDE` is the interface the samplers, losses and the likelihood use (Song et al. 2021, eqs. 5-6 and
13): a forward SDE dx = f(x, t) dt + g(t) dw on [0, T] with Gaussian transition kernels
x_t | x_0 ~ N(alpha(t) x_0, sigma(t)^2 I). `ReverseSDE` is its reverse-time SDE or probability-flow
ODE given a score, and `data_prediction` (`denoised` at one time) is Tweedie's estimate of x_0,
the one place the data prediction D = (x + sigma^2 score) / alpha is written. Shapes: x is
(B, ...), t is (B,) and per-example scalars are (B,). The processes themselves are in
`diffusion.sde`.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffusion.workarounds import after

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]


def batch_broadcast(v: Array, x: Array) -> Array:
    """Reshapes a per-example vector v (B,) so that it broadcasts against x (B, ...)."""
    return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def _sum_except_batch(x: Array) -> Array:
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


class SDE(abc.ABC):
    """A forward SDE with Gaussian transition kernels x_t | x_0 ~ N(alpha(t) x_0, sigma(t)^2 I).

    Subclasses define `beta`-like coefficients through `sde`, `marginal_coeffs`, the prior and the
    discrete chain (`discretize`); everything else (marginals, reversal) is derived here.
    """

    N: int
    T: float = 1.0

    @abc.abstractmethod
    def sde(self, x: Array, t: Array) -> tuple[Array, Array]:
        """Drift f(x, t) (shaped like x) and diffusion g(t) (B,)."""

    @abc.abstractmethod
    def marginal_coeffs(self, t: Array) -> tuple[Array, Array]:
        """alpha(t), sigma(t), each (B,): x_t = alpha(t) x_0 + sigma(t) z, z ~ N(0, I)."""

    @abc.abstractmethod
    def prior_sampling(self, key: Array, shape: tuple[int, ...]) -> Array:
        """Samples of the prior p_T; shape includes the batch."""

    @abc.abstractmethod
    def prior_logp(self, z: Array) -> Array:
        """Log-density of the prior at z (B, ...), in nats, (B,)."""

    @abc.abstractmethod
    def discretize(self, x: Array, t: Array) -> tuple[Array, Array]:
        """One step of the discrete chain this SDE is the limit of: x_{i+1} = x_i + f + G z.

        Returns f shaped like x and G (B,), for the step that starts at time t.
        """

    def marginal_prob(self, x0: Array, t: Array) -> tuple[Array, Array]:
        """Mean alpha(t) x_0 (shaped like x0) and std sigma(t) (B,) of p_{0t}(x_t | x_0)."""
        alpha, sigma = self.marginal_coeffs(t)
        return batch_broadcast(alpha, x0) * x0, sigma

    def marginal_rates(self, t: Array) -> tuple[Array, Array, Array, Array]:
        """alpha(t), sigma(t) and their time derivatives alpha'(t), sigma'(t), each (B,).

        The velocity of x_t = alpha x_0 + sigma z is alpha' x_0 + sigma' z (forward-mode AD of
        `marginal_coeffs`, exact for every process here).
        """
        (alpha, sigma), (d_alpha, d_sigma) = jax.jvp(self.marginal_coeffs, (t,),
                                                     (jnp.ones_like(t),))
        return alpha, sigma, d_alpha, d_sigma

    def log_snr(self, t: Array) -> Array:
        """lambda(t) = log(alpha(t) / sigma(t)), strictly decreasing in t; (B,)."""
        alpha, sigma = self.marginal_coeffs(t)
        return jnp.log(alpha) - jnp.log(sigma)

    def t_of_log_snr(self, log_snr: Array, t_min: float = 0.0) -> Array:
        """The time t in [t_min, T] with log_snr(t) = log_snr, by bisection (any shape).

        Generic for every process whose log-SNR falls monotonically; 60 halvings take the bracket
        below float64 resolution. Values outside [log_snr(T), log_snr(t_min)] clip to the ends.
        """
        log_snr = jnp.asarray(log_snr)
        lo = jnp.full(log_snr.shape, t_min, log_snr.dtype)
        hi = jnp.full(log_snr.shape, self.T, log_snr.dtype)

        def halve(_, bracket):
            lo, hi = bracket
            mid = 0.5 * (lo + hi)
            above = self.log_snr(mid.reshape(-1)).reshape(mid.shape) > log_snr
            return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

        lo, hi = jax.lax.fori_loop(0, 60, halve, (lo, hi))
        return 0.5 * (lo + hi)

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> ReverseSDE:
        """The reverse-time SDE (eq. 6) or the probability-flow ODE (eq. 13) given a score."""
        return ReverseSDE(self, score_fn, probability_flow)

    def ode_process(self) -> SDE:
        """The process whose end time T the probability-flow ODE may start from, given the
        model's velocity (`ScoreWithVelocity`): this SDE itself, except for a process whose
        velocity stays finite where its SDE's coefficients diverge (the rectified flow, which
        then starts at t = 1 from the exact prior N(0, I))."""
        return self


@dataclasses.dataclass(frozen=True)
class ReverseSDE:
    """Reverse-time process dx = [f - c g^2 score] dt + g' dw_bar, run from T down to 0.

    c = 1 and g' = g for the reverse SDE (Anderson 1982; Song et al. eq. 6), c = 1/2 and g' = 0 for
    the probability-flow ODE (eq. 13). `sde` and `discretize` return drift and diffusion in the
    forward-time convention of `SDE`, i.e. a step from t to t - dt is x - drift dt + diffusion dw.
    """

    forward: SDE
    score_fn: ScoreFn
    probability_flow: bool = False

    @property
    def T(self) -> float:
        return self.forward.T

    @property
    def N(self) -> int:
        return self.forward.N

    def _reverse(self, f: Array, g: Array, x: Array, t: Array) -> tuple[Array, Array]:
        c = 0.5 if self.probability_flow else 1.0
        drift = f - c * batch_broadcast(g, x) ** 2 * self.score_fn(x, t)
        return drift, jnp.zeros_like(g) if self.probability_flow else g

    def sde(self, x: Array, t: Array) -> tuple[Array, Array]:
        f, g = self.forward.sde(x, t)
        return self._reverse(f, g, x, t)

    def discretize(self, x: Array, t: Array) -> tuple[Array, Array]:
        f, g = self.forward.discretize(x, t)
        return self._reverse(f, g, x, t)

    def marginal_coeffs(self, t: Array) -> tuple[Array, Array]:
        return self.forward.marginal_coeffs(t)

    def marginal_prob(self, x0: Array, t: Array) -> tuple[Array, Array]:
        return self.forward.marginal_prob(x0, t)

    def prior_sampling(self, key: Array, shape: tuple[int, ...]) -> Array:
        return self.forward.prior_sampling(key, shape)

    def prior_logp(self, z: Array) -> Array:
        return self.forward.prior_logp(z)


@dataclasses.dataclass(frozen=True)
class ScoreWithVelocity:
    """A score function that also gives the probability-flow velocity directly.

    Called as `score_fn(x, t)`, it is the score; `velocity(x, t)` (x (B, ...), t (B,)) is
    dx/dt = alpha'(t) E[x_0 | x_t] + sigma'(t) E[z | x_t] of the probability-flow ODE (equal to
    f - g^2 score / 2 for every process with x_t = alpha x_0 + sigma z), computed from what the
    model predicts without passing through the score. It stays finite where alpha(t) = 0 (the
    rectified flow at t = 1), where the score -x / sigma^2 holds nothing of the data and
    f - g^2 score / 2 is infinity minus infinity. "v" models give it
    (`models.parameterization.score_fn_from_model`), and the Gaussian mixtures for their exact
    score (`GaussianMixture.score_fn`).
    """

    score: ScoreFn
    velocity: ScoreFn

    def __call__(self, x: Array, t: Array) -> Array:
        return self.score(x, t)


@dataclasses.dataclass(frozen=True)
class ScoreWithVariance:
    """A score function of a model with a learned variance (`ScoreModel.learn_variance`).

    Called as `score_fn(x, t)`, it is the score; `with_variance(x, t)` gives (score, v) from one
    network evaluation, v in [0, 1] like x the fraction with which the reverse kernel of a
    discrete chain interpolates log beta and log beta~ (`diffusion.chain`; the DDPM sampler).
    """

    score: ScoreFn
    with_variance: Callable[[Array, Array], tuple[Array, Array]]

    def __call__(self, x: Array, t: Array) -> Array:
        return self.score(x, t)


def data_prediction(x: Array, score: Array, alpha: Array, sigma: Array) -> Array:
    """The denoiser of a score: D = (x + sigma^2 score) / alpha, shaped like x (B, ...).

    For x_t = alpha x_0 + sigma z this is Tweedie's formula: at the exact score of p_t, D is the
    posterior mean E[x_0 | x_t]. alpha and sigma are the per-example coefficients, (B,) or
    already broadcast against x.
    """
    sigma, alpha = batch_broadcast(sigma, x), batch_broadcast(alpha, x)
    return (x + sigma**2 * score) / alpha


def denoised(sde: SDE, score_fn: ScoreFn, x: Array, t: float) -> Array:
    """Tweedie's estimate E[x_0 | x_t] (`data_prediction`) of `score_fn` at one time t."""
    t_batch = jnp.full((x.shape[0],), t, x.dtype)
    alpha, sigma = sde.marginal_coeffs(t_batch)
    score = score_fn(x, after(x, t_batch))   # evaluated once x is known (`workarounds`)
    return data_prediction(x, score, alpha, sigma)
