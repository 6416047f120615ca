"""Stochastic differential equations of score-based generative modelling.

Song et al., "Score-Based Generative Modeling through Stochastic Differential Equations"
(ICLR 2021), eqs. (5)-(11) and appendix B. Every process here is a forward SDE

    dx = f(x, t) dt + g(t) dw,        t in [0, T], T = 1,

whose transition kernel from x(0) is Gaussian, x_t | x_0 ~ N(alpha(t) x_0, sigma(t)^2 I). The
samplers only use the two coefficients alpha(t) and sigma(t) (`marginal_coeffs`), the drift and
diffusion (`sde`) and the prior, so a new process with Gaussian marginals plugs in as one class.

Shapes: x is (B, ...) and t is (B,); per-example scalars (diffusion, std, alpha, log-probs) are
(B,). SDEs are frozen dataclasses, hence hashable, so they may be passed as static arguments to
`jax.jit`.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]


def batch_broadcast(v: Array, x: Array) -> Array:
    """Reshapes a per-example vector v (B,) so that it broadcasts against x (B, ...)."""
    return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def _sum_except_batch(x: Array) -> Array:
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def _chain_coeffs(alphas_cumprod: np.ndarray, i: Array) -> tuple[Array, Array]:
    """(sqrt(bar-alpha_i), sqrt(1 - bar-alpha_i)) of a VP-type chain at levels i, in float32.

    Computed in float64 on the host first: 1 - bar-alpha_0 = beta_0 = 1e-4 keeps its digits.
    """
    alpha = jnp.asarray(np.sqrt(alphas_cumprod), jnp.float32)
    sigma = jnp.asarray(np.sqrt(1.0 - alphas_cumprod), jnp.float32)
    return alpha[i], sigma[i]


def _discrete_index(t: Array, T: float, N: int) -> Array:
    """Index i in {0, ..., N-1} of the discrete step that continuous time t maps to (score_sde)."""
    return jnp.clip(jnp.floor(t * (N - 1) / T), 0, N - 1).astype(jnp.int32)


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


class _UnitGaussianPrior:
    """Prior N(0, I), shared by the variance-preserving family."""

    def prior_sampling(self, key: Array, shape: tuple[int, ...]) -> Array:
        return jax.random.normal(key, shape)

    def prior_logp(self, z: Array) -> Array:
        d = math.prod(z.shape[1:])
        return -0.5 * d * math.log(2 * math.pi) - 0.5 * _sum_except_batch(z**2)


class _LinearBeta:
    """The linear schedule of the VP and sub-VP SDEs, from the dataclass fields beta_min and
    beta_max: beta(t) = beta_min + t (beta_max - beta_min) and its log alpha(t)."""

    beta_min: float
    beta_max: float

    def beta(self, t: Array) -> Array:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t: Array) -> Array:
        """log alpha(t) = -1/2 int_0^t beta(s) ds."""
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min


class _VariancePreserving(_UnitGaussianPrior):
    """dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw, so alpha(t) = exp(-1/2 int_0^t beta) and
    sigma(t)^2 = 1 - alpha(t)^2, from the subclass's `beta(t)` and `log_alpha(t)`; prior N(0, I)."""

    def sde(self, x: Array, t: Array) -> tuple[Array, Array]:
        beta = self.beta(t)
        return -0.5 * batch_broadcast(beta, x) * x, jnp.sqrt(beta)

    def marginal_coeffs(self, t: Array) -> tuple[Array, Array]:
        log_alpha = self.log_alpha(t)
        return jnp.exp(log_alpha), jnp.sqrt(-jnp.expm1(2.0 * log_alpha))


class _DDPMChain:
    """The discrete chain x_{i+1} = sqrt(1 - beta_i) x_i + sqrt(beta_i) z (DDPM, Ho et al. 2020)
    of the subclass's `discrete_betas` (N,), which the VP SDE and the cosine VP SDE define."""

    discrete_betas: np.ndarray

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """bar-alpha_i = prod_{j<=i} (1 - beta_j) of the discrete chain, (N,)."""
        return np.cumprod(1.0 - self.discrete_betas)

    def discrete_coeffs(self, i: Array) -> tuple[Array, Array]:
        """sqrt(bar-alpha_i), sqrt(1 - bar-alpha_i) of level i in {0, ..., N-1}; like i."""
        return _chain_coeffs(self.alphas_cumprod, i)

    def discretize(self, x: Array, t: Array) -> tuple[Array, Array]:
        """DDPM step: x_{i+1} = sqrt(1 - beta_i) x_i + sqrt(beta_i) z."""
        beta = jnp.asarray(self.discrete_betas, x.dtype)[_discrete_index(t, self.T, self.N)]
        f = (jnp.sqrt(1.0 - batch_broadcast(beta, x)) - 1.0) * x
        return f, jnp.sqrt(beta)


@dataclasses.dataclass(frozen=True)
class VPSDE(_LinearBeta, _VariancePreserving, _DDPMChain, SDE):
    """Variance-preserving SDE with a linear beta schedule (Song et al. eq. 11; DDPM limit).

    dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw,  beta(t) = beta_min + t (beta_max - beta_min).
    alpha(t) = exp(-1/4 t^2 (beta_max - beta_min) - 1/2 t beta_min), sigma(t)^2 = 1 - alpha(t)^2.
    The discrete chain is DDPM (Ho et al. 2020) with betas linspace(beta_min/N, beta_max/N, N):
    1e-4 ... 0.02 for the defaults.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    N: int = 1000

    @property
    def discrete_betas(self) -> np.ndarray:
        """DDPM's linear betas beta_min / N .. beta_max / N, (N,); each must be below 1."""
        if self.beta_max >= self.N:
            raise ValueError(
                f"The discrete DDPM chain of VPSDE(beta_max={self.beta_max}, N={self.N}) would "
                f"have a last beta of beta_max / N = {self.beta_max / self.N:g} >= 1. Use "
                f"sde.N > beta_max (DDPM: N 1000) for the discrete loss and the ancestral / "
                f"reverse-diffusion samplers.")
        return np.linspace(self.beta_min / self.N, self.beta_max / self.N, self.N)


@dataclasses.dataclass(frozen=True)
class CosineVPSDE(_VariancePreserving, _DDPMChain, SDE):
    """Variance-preserving SDE with the cosine schedule of Nichol & Dhariwal (2021), eq. (17).

    bar-alpha(t) = h(t) / h(0), h(t) = cos(pi/2 (t + s) / (1 + s))^2, so alpha(t) = sqrt(bar-alpha)
    and beta(t) = -d/dt log bar-alpha(t) = pi/(1+s) tan(pi/2 (t+s)/(1+s)), which diverges at t = 1.
    As the paper clips the discrete betas at 0.999 to avoid the singularity at the end, the
    continuous beta(t) is clipped at `beta_clip` (999, the value used for this schedule by
    DPM-Solver, Lu et al. 2022); past the time t_clip where beta(t) reaches it, log bar-alpha falls
    linearly, so the SDE, its marginals and the ODE stay finite and mutually consistent on [0, 1].
    The discrete chain is the paper's: beta_i = min(1 - bar-alpha(i/N) / bar-alpha((i-1)/N), 0.999).
    """

    N: int = 1000
    s: float = 0.008
    beta_clip: float = 999.0

    @property
    def t_clip(self) -> float:
        """Time at which beta(t) reaches beta_clip."""
        a = 1.0 + self.s
        return 2.0 * a / math.pi * math.atan(self.beta_clip * a / math.pi) - self.s

    def _log_h(self, t: Array) -> Array:
        return 2.0 * jnp.log(jnp.cos(0.5 * math.pi * (t + self.s) / (1.0 + self.s)))

    def log_alpha_bar(self, t: Array) -> Array:
        """log bar-alpha(t) = -int_0^t beta(s) ds with the clipped beta."""
        t_clip = self.t_clip
        log_h0 = 2.0 * math.log(math.cos(0.5 * math.pi * self.s / (1.0 + self.s)))
        inside = self._log_h(jnp.minimum(t, t_clip)) - log_h0
        return inside - self.beta_clip * jnp.maximum(t - t_clip, 0.0)

    def log_alpha(self, t: Array) -> Array:
        """log alpha(t) = 1/2 log bar-alpha(t)."""
        return 0.5 * self.log_alpha_bar(t)

    def beta(self, t: Array) -> Array:
        a = 1.0 + self.s
        raw = math.pi / a * jnp.tan(0.5 * math.pi * (jnp.minimum(t, self.t_clip) + self.s) / a)
        return jnp.minimum(raw, self.beta_clip)

    @property
    def discrete_betas(self) -> np.ndarray:
        i = np.arange(self.N + 1, dtype=np.float64) / self.N
        h = np.cos(0.5 * np.pi * (i + self.s) / (1.0 + self.s)) ** 2
        alpha_bar = h / h[0]
        return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.999)


@dataclasses.dataclass(frozen=True)
class SubVPSDE(_LinearBeta, _UnitGaussianPrior, SDE):
    """The sub-VP SDE (Song et al. eq. 29), whose variance is bounded by the VP SDE's.

    dx = -1/2 beta(t) x dt + sqrt(beta(t) (1 - exp(-2 int_0^t beta(s) ds))) dw,
    alpha(t) as for VPSDE and sigma(t) = 1 - alpha(t)^2. Its discrete chain is the Euler-Maruyama
    discretisation with N steps (it has no classical discrete counterpart).
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    N: int = 1000

    def sde(self, x, t):
        beta = self.beta(t)
        discount = -jnp.expm1(4.0 * self.log_alpha(t))
        return -0.5 * batch_broadcast(beta, x) * x, jnp.sqrt(beta * discount)

    def marginal_coeffs(self, t):
        log_alpha = self.log_alpha(t)
        return jnp.exp(log_alpha), -jnp.expm1(2.0 * log_alpha)

    def discretize(self, x, t):
        dt = self.T / self.N
        f, g = self.sde(x, t)
        return f * dt, g * math.sqrt(dt)


@dataclasses.dataclass(frozen=True)
class VESDE(SDE):
    """Variance-exploding SDE (Song et al. eq. 9; the SMLD / NCSN limit).

    dx = sqrt(d[sigma(t)^2]/dt) dw with sigma(t) = sigma_min (sigma_max / sigma_min)^t, so
    g(t) = sigma(t) sqrt(2 log(sigma_max / sigma_min)), and alpha(t) = 1. The marginal std is
    score_sde's (Song et al. eq. 31): sigma(t) itself, i.e. x_t = x_0 + sigma(t) z, the
    convention the paper's VE models are trained and sampled with. It treats the data as already
    carrying noise of scale sigma_min at t = 0 (the SDE started at clean data has variance
    sigma(t)^2 - sigma_min^2: std 0.0013 instead of 0.0101 at t = 1e-3, 10% below sigma(t) at
    t = 0.1, 1e-4 relative below it from t = 0.5 on). `exact_std=True` selects that exact std
    instead (our option, off in the paper configs; config.sde.exact_std).
    The prior is N(0, sigma_max^2 I). The discrete chain is SMLD's: sigma_i geometric from
    sigma_min to sigma_max over N levels, x_{i+1} = x_i + sqrt(sigma_{i+1}^2 - sigma_i^2) z.
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    N: int = 1000
    exact_std: bool = False

    def sigma(self, t: Array) -> Array:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def sde(self, x, t):
        g = self.sigma(t) * math.sqrt(2.0 * math.log(self.sigma_max / self.sigma_min))
        return jnp.zeros_like(x), g

    def marginal_coeffs(self, t):
        if self.exact_std:
            # sigma(t)^2 - sigma_min^2 = sigma_min^2 expm1(2 t log(sigma_max / sigma_min)).
            log_ratio = math.log(self.sigma_max / self.sigma_min)
            std = self.sigma_min * jnp.sqrt(jnp.expm1(2.0 * t * log_ratio))
        else:
            std = self.sigma(t)
        return jnp.ones_like(t), std

    def prior_sampling(self, key, shape):
        return self.sigma_max * jax.random.normal(key, shape)

    def prior_logp(self, z):
        d = math.prod(z.shape[1:])
        return (-0.5 * d * math.log(2 * math.pi * self.sigma_max**2)
                - 0.5 * _sum_except_batch(z**2) / self.sigma_max**2)

    @property
    def discrete_sigmas(self) -> np.ndarray:
        return np.exp(np.linspace(np.log(self.sigma_min), np.log(self.sigma_max), self.N))

    def discrete_coeffs(self, i: Array) -> tuple[Array, Array]:
        """alpha_i = 1 and sigma_i of SMLD level i in {0, ..., N-1}; each shaped like i."""
        sigma = jnp.asarray(self.discrete_sigmas, jnp.float32)[i]
        return jnp.ones_like(sigma), sigma

    def discretize(self, x, t):
        """SMLD step from level i - 1 to level i (level -1 is the clean data, sigma = 0)."""
        i = _discrete_index(t, self.T, self.N)
        sigmas = jnp.asarray(self.discrete_sigmas, x.dtype)
        sigma = sigmas[i]
        previous = jnp.where(i == 0, 0.0, sigmas[jnp.maximum(i - 1, 0)])
        return jnp.zeros_like(x), jnp.sqrt(sigma**2 - previous**2)


SDES: dict[str, type[SDE]] = {
    "vpsde": VPSDE,
    "subvpsde": SubVPSDE,
    "vesde": VESDE,
    "cosine_vpsde": CosineVPSDE,
}


def denoised(sde: SDE, score_fn: ScoreFn, x: Array, t: float) -> Array:
    """Tweedie's estimate E[x_0 | x_t] = (x + sigma(t)^2 score(x, t)) / alpha(t) at one time t."""
    t_batch = jnp.full((x.shape[0],), t, x.dtype)
    alpha, sigma = sde.marginal_coeffs(t_batch)
    return (x + batch_broadcast(sigma, x) ** 2 * score_fn(x, t_batch)) / batch_broadcast(alpha, x)


def sde_fields(name: str) -> set[str]:
    """The constructor fields of the SDE called `name` (what config.sde may set for it)."""
    return {f.name for f in dataclasses.fields(SDES[name])}


def get_sde(name: str, **kwargs) -> SDE:
    """Builds the SDE called `name` ("vpsde" | "subvpsde" | "vesde" | "cosine_vpsde").

    Keyword arguments that belong to another SDE class (a config's `sde` block holds beta_* and
    sigma_* keys for all of them) are ignored; one that no SDE takes is a ValueError.
    (`experiment.check_config` also refuses a value changed for a key the chosen SDE ignores.)
    """
    if name not in SDES:
        raise ValueError(f"Unknown SDE {name!r}: config.sde.name must be one of {sorted(SDES)}.")
    every = set().union(*(sde_fields(n) for n in SDES))
    unknown = sorted(set(kwargs) - every)
    if unknown:
        raise ValueError(f"Unknown SDE arguments {unknown}: the SDEs take {sorted(every)}.")
    fields = sde_fields(name)
    return SDES[name](**{k: v for k, v in kwargs.items() if k in fields})
