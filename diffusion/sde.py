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

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.sde_base import (  # noqa: F401
    SDE,
    Array,
    ReverseSDE,
    ScoreFn,
    ScoreWithVelocity,
    _sum_except_batch,
    batch_broadcast,
    data_prediction,
    denoised,
)


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


def _gaussian_logp(z: Array, std: float) -> Array:
    """log N(z; 0, std^2 I) per example, z (B, ...) -> (B,)."""
    d = math.prod(z.shape[1:])
    return -0.5 * d * math.log(2 * math.pi * std**2) - 0.5 * _sum_except_batch(z**2) / std**2


class _UnitGaussianPrior:
    """Prior N(0, I), shared by the variance-preserving family."""

    def prior_sampling(self, key: Array, shape: tuple[int, ...]) -> Array:
        return jax.random.normal(key, shape)

    def prior_logp(self, z: Array) -> Array:
        return _gaussian_logp(z, 1.0)


class _EulerMaruyamaChain:
    """The discrete chain of an SDE without a named one: its Euler-Maruyama steps of dt = T / N,
    f dt and g sqrt(dt)."""

    def discretize(self, x: Array, t: Array) -> tuple[Array, Array]:
        dt = self.T / self.N
        f, g = self.sde(x, t)
        return f * dt, g * math.sqrt(dt)


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
class SubVPSDE(_LinearBeta, _UnitGaussianPrior, _EulerMaruyamaChain, SDE):
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
        return _gaussian_logp(z, self.sigma_max)

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


class Interpolant(_EulerMaruyamaChain, SDE):
    """A process given by its marginal coefficients alone: x_t = alpha(t) x_0 + sigma(t) z.

    The SDE with these marginals is linear (Kingma et al. 2021, "Variational Diffusion Models",
    eqs. 32-33; Song et al. 2021 eq. 29 in general form): dx = f(t) x dt + g(t) dw with
    f = alpha'/alpha and g^2 = d sigma^2/dt - 2 f sigma^2 = -2 sigma^2 lambda'(t), lambda the
    log-SNR. A subclass defines `marginal_coeffs` (and T); drift, diffusion and the Euler-Maruyama
    chain follow here, and the prior is N(0, sigma(T)^2 I), the marginal of x_0 = 0 at T.
    """

    def sde(self, x, t):
        alpha, sigma, d_alpha, d_sigma = self.marginal_rates(t)
        f = d_alpha / alpha
        return batch_broadcast(f, x) * x, jnp.sqrt(2.0 * sigma * (d_sigma - f * sigma))

    def prior_sampling(self, key, shape):
        return self._prior_std() * jax.random.normal(key, shape)

    def prior_logp(self, z):
        return _gaussian_logp(z, self._prior_std())

    def _prior_std(self) -> float:
        return float(self.marginal_coeffs(np.asarray([self.T], np.float64))[1][0])


@dataclasses.dataclass(frozen=True)
class RectifiedFlow(Interpolant):
    """The rectified-flow / flow-matching interpolant x_t = (1 - t) x_0 + t z (Liu et al. 2023,
    "Flow Straight and Fast"; Lipman et al. 2023, "Flow Matching"; Esser et al. 2024, SD3).

    Its velocity is z - x_0 and its SDE (`Interpolant`) is dx = -x / (1 - t) dt +
    sqrt(2 t / (1 - t)) dw. Drift, diffusion and the log-SNR log((1 - t) / t) diverge at t = 1,
    where alpha = 0, so the process runs on [0, T] with T = 0.99 (field `T`, config.sde.T): the
    SDE's samplers and every sampler written on the log-SNR or sigma / alpha start there, from
    the prior N(0, T^2 I), whereas the marginal at T is N(0.01 x_0, 0.99^2 I), a mismatch as
    large as the VP SDE's (alpha(1) = 0.0066). (Closer to 1 the first Euler-Maruyama steps, of
    size 1/N, become large against 1 - T, and the score-to-velocity conversion divides by 1 - T.)
    The velocity itself is finite at t = 1: given it (a "v" model, `sde_base.ScoreWithVelocity`),
    the probability-flow ODE and the likelihood run on [0, 1] from the exact prior N(0, I)
    (`ode_process`). N is the default step count of the PC sampler; the discrete chain is
    Euler-Maruyama.
    """

    N: int = 1000
    T: float = 0.99

    def __post_init__(self):
        if not 0.0 < self.T < 1.0:
            raise ValueError(f"RectifiedFlow needs 0 < T < 1 (alpha(1) = 0 makes the SDE singular "
                             f"at t = 1), got sde.T={self.T}. The default is 0.99.")

    def marginal_coeffs(self, t):
        return 1.0 - t, t

    def ode_process(self) -> SDE:
        """The rectified flow on [0, 1]: its velocity z - x_0 is finite at t = 1, so the
        probability-flow ODE, given the model's velocity, starts there from the exact prior
        N(0, I) (no prior mismatch), while the SDE's samplers keep T < 1."""
        return _RectifiedFlowToOne(N=self.N)


@dataclasses.dataclass(frozen=True)
class _RectifiedFlowToOne(RectifiedFlow):
    """The rectified flow with T = 1, for the probability-flow ODE only (`ode_process`): its
    SDE's drift and diffusion are infinite at t = 1, so no stochastic sampler may use it."""

    T: float = 1.0

    def __post_init__(self):
        pass

    def ode_process(self) -> SDE:
        return self


SDES: dict[str, type[SDE]] = {
    "vpsde": VPSDE,
    "subvpsde": SubVPSDE,
    "vesde": VESDE,
    "cosine_vpsde": CosineVPSDE,
    "rectified_flow": RectifiedFlow,
}


def sde_fields(name: str) -> set[str]:
    """The constructor fields of the SDE called `name` (what config.sde may set for it)."""
    return {f.name for f in dataclasses.fields(SDES[name])}


def get_sde(name: str, **kwargs) -> SDE:
    """Builds the SDE called `name` (a key of SDES: "vpsde" | "subvpsde" | "vesde" |
    "cosine_vpsde" | "rectified_flow").

    Keyword arguments that belong to another SDE class (a config's `sde` block holds beta_* and
    sigma_* keys for all of them) are ignored; one that no SDE takes is a ValueError.
    (`config_checks.check_config` also refuses a value changed for a key the chosen SDE ignores.)
    """
    if name not in SDES:
        raise ValueError(f"Unknown SDE {name!r}: config.sde.name must be one of {sorted(SDES)}.")
    every = set().union(*(sde_fields(n) for n in SDES))
    unknown = sorted(set(kwargs) - every)
    if unknown:
        raise ValueError(f"Unknown SDE arguments {unknown}: the SDEs take {sorted(every)}.")
    fields = sde_fields(name)
    return SDES[name](**{k: v for k, v in kwargs.items() if k in fields})
