"""The discrete Gaussian chain of an SDE: respacing, reverse kernels and DDPM's variational bound.

Every SDE with a discrete chain (DDPM's for the VP and cosine SDEs, SMLD's for VE) has levels
k = 0 .. N-1 with x_k = a_k x_0 + s_k z: a_k = sqrt(bar-alpha_k), s_k = sqrt(1 - bar-alpha_k)
(DDPM) or a_k = 1, s_k = sigma_k (SMLD). A `Chain` keeps K of those levels k_0 < ... < k_{K-1}
(all N, or a respaced subset), with the clean data as level -1 (a = 1, s = 0). Between kept
levels j - 1 and j the forward step is x_j = r_j x_{j-1} + sqrt(b_j) z with r_j = a_j / a_{j-1}
and b_j = s_j^2 - r_j^2 s_{j-1}^2: DDPM's beta (1 - bar-alpha_j / bar-alpha_{j-1}, the
"recomputed betas" of a respaced chain, Nichol & Dhariwal 2021 sec. 4) or SMLD's
sigma_j^2 - sigma_{j-1}^2. Its posterior is Gaussian (Ho et al. 2020, eqs. 6-7, written for any
(a, s)):

    q(x_{j-1} | x_j, x_0) = N(c0_j x_0 + ct_j x_j, beta~_j),   beta~_j = b_j s_{j-1}^2 / s_j^2,
    c0_j = a_{j-1} b_j / s_j^2,   ct_j = r_j s_{j-1}^2 / s_j^2.

The reverse kernel p(x_{j-1} | x_j) = N(mu, Sigma) takes mu = the posterior mean at the model's
x_0 prediction D = (x_j + s_j^2 score) / a_j, and log Sigma one of (improved-diffusion's
conventions, Nichol & Dhariwal 2021, eq. 15 and their code):
  "beta"        log b_j ("fixed large"; at j = 0, log beta~_1, which only the bound sees),
  "beta_tilde"  log beta~_j, clipped at j = 0 to log beta~_1 ("fixed small"),
  learned       v log b_j + (1 - v) log beta~_j (clipped), v in [0, 1] from the network.

The variational bound of the chain (Ho et al. 2020, eq. 5) in bits per dimension is
L = L_T + sum_{j >= 1} L_{j-1} + L_0 with L_T = KL(q(x_{K-1} | x_0) || prior),
L_{j-1} = KL(q(x_{j-1} | x_j, x_0) || p(x_{j-1} | x_j)) and L_0 = -log p(x_0 | x_1-level): for
data of L pixel levels, DDPM's discretized Gaussian decoder (the probability of x_0's bin,
edges at +-infinity for the end bins), else the Gaussian density. Only SDEs with such a chain
have it: the sub-VP SDE and the rectified flow (Euler-Maruyama chains) have no closed-form
posterior of this kind.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.sde_base import SDE, batch_broadcast, data_prediction

Array = jax.Array
SPACINGS = ("evenly", "quad")
FIXED_VARIANCES = ("beta", "beta_tilde")


def has_chain(sde: SDE) -> bool:
    """Whether `sde` has a Gaussian discrete chain (DDPM: VPSDE, CosineVPSDE; SMLD: VESDE)."""
    return hasattr(sde, "alphas_cumprod") or hasattr(sde, "discrete_sigmas")


def respaced_levels(num_levels: int, steps: int, spacing: str = "evenly") -> np.ndarray:
    """`steps` increasing levels of 0 .. num_levels - 1, always including 0.

    "evenly": round(j (N - 1) / (K - 1)), j = 0 .. K - 1 (improved-diffusion's one section;
    both ends kept). "quad": int((j sqrt(0.8 N) / (K - 1))^2) (DDIM's quadratic spacing, Song et
    al. 2021a, app. D.2), dense at low noise and ending at level 0.8 N as DDIM's; it needs
    K - 1 <= sqrt(0.8 N) so that the levels differ.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"Unknown spacing {spacing!r}: sampling.spacing must be one of "
                         f"{list(SPACINGS)}.")
    if not 2 <= steps <= num_levels:
        raise ValueError(f"A respaced chain needs 2 <= steps <= N = {num_levels}, got {steps}.")
    j = np.arange(steps, dtype=np.float64)
    if spacing == "evenly":
        levels = np.round(j * (num_levels - 1) / (steps - 1))
    else:
        levels = np.floor((j * math.sqrt(0.8 * num_levels) / (steps - 1)) ** 2)
    levels = levels.astype(np.int64)
    if np.any(np.diff(levels) <= 0):
        raise ValueError(f"spacing={spacing!r} gives repeated levels for {steps} of "
                         f"{num_levels} steps: use fewer steps or spacing='evenly'.")
    return levels


def level_times(levels: np.ndarray, T: float, N: int) -> np.ndarray:
    """float32 times t_k that discrete-time models map back to level k (`ScoreModel`:
    floor(t (N - 1) / T) for DDPM chains, N - 1 - round((T - t)(N - 1) / T) for SMLD): k T / (N - 1)
    rounded up by one float32 ulp, so that float32 arithmetic never lands on k - 1."""
    t = (np.asarray(levels, np.float64) * (T / (N - 1))).astype(np.float32)
    return np.minimum(np.nextafter(t, np.float32(np.inf)), np.float32(T))


@dataclasses.dataclass(frozen=True, eq=False)
class Chain:
    """K kept levels of an SDE's discrete chain and their reverse-kernel tables (module
    docstring). Arrays are float64 numpy (K,); `table(name)` gives a float32 jnp copy."""

    levels: np.ndarray       # (K,) the SDE chain's levels kept, increasing
    times: np.ndarray        # (K,) float32 times the models are called at (`level_times`)
    alpha: np.ndarray        # a_j
    sigma: np.ndarray        # s_j
    beta: np.ndarray         # b_j, the forward step's variance from kept level j - 1
    beta_tilde: np.ndarray   # the posterior variance (0 at j = 0)
    coef_x0: np.ndarray
    coef_xt: np.ndarray
    prior_std: float         # the SDE's prior N(0, prior_std^2 I)

    def __len__(self) -> int:
        return len(self.levels)

    def table(self, name: str) -> Array:
        return jnp.asarray(getattr(self, name), jnp.float32)

    @property
    def log_beta_tilde_clipped(self) -> np.ndarray:
        return np.log(np.append(self.beta_tilde[1], self.beta_tilde[1:]))

    @property
    def log_beta_large(self) -> np.ndarray:
        return np.log(np.append(self.beta_tilde[1], self.beta[1:]))

    def posterior(self, x0: Array, xt: Array, j: Array) -> tuple[Array, Array]:
        """Mean and clipped log variance (B,) of q(x_{j-1} | x_j, x_0); j (B,) int."""
        mean = (batch_broadcast(self.table("coef_x0")[j], xt) * x0
                + batch_broadcast(self.table("coef_xt")[j], xt) * xt)
        return mean, jnp.asarray(self.log_beta_tilde_clipped, jnp.float32)[j]

    def reverse_mean(self, xt: Array, score: Array, j: Array) -> Array:
        """The model's mean: the posterior mean at D = (x_j + s_j^2 score) / a_j."""
        x0 = data_prediction(xt, score, self.table("alpha")[j], self.table("sigma")[j])
        return self.posterior(x0, xt, j)[0]

    def log_variance(self, j: Array, variance: str | Array) -> Array:
        """log Sigma_j: "beta", "beta_tilde", or the learned interpolation v (like x or (B,))."""
        if isinstance(variance, str):
            if variance not in FIXED_VARIANCES:
                raise ValueError(f"Unknown variance {variance!r}: sampling.variance must be one "
                                 f"of {list(FIXED_VARIANCES)}.")
            table = self.log_beta_large if variance == "beta" else self.log_beta_tilde_clipped
            return jnp.asarray(table, jnp.float32)[j]
        v = variance
        log_max = batch_broadcast(jnp.log(self.table("beta"))[j], v)
        log_min = batch_broadcast(jnp.asarray(self.log_beta_tilde_clipped, jnp.float32)[j], v)
        return v * log_max + (1.0 - v) * log_min


def make_chain(sde: SDE, levels: np.ndarray | None = None) -> Chain:
    """The chain of `sde` on `levels` (default all N); ValueError for SDEs without one."""
    if hasattr(sde, "alphas_cumprod"):
        abar = np.asarray(sde.alphas_cumprod, np.float64)
        full_alpha, full_var, prior_std = np.sqrt(abar), 1.0 - abar, 1.0
    elif hasattr(sde, "discrete_sigmas"):
        sigmas = np.asarray(sde.discrete_sigmas, np.float64)
        full_alpha, full_var, prior_std = np.ones_like(sigmas), sigmas**2, float(sde.sigma_max)
    else:
        raise ValueError(f"{type(sde).__name__} has no Gaussian discrete chain (DDPM: vpsde, "
                         f"cosine_vpsde; SMLD: vesde), so it has no DDPM sampler, variational "
                         f"bound or learned variance. Use one of those SDEs.")
    levels = np.arange(sde.N) if levels is None else np.asarray(levels, np.int64)
    alpha, var = full_alpha[levels], full_var[levels]
    alpha_prev = np.append(1.0, alpha[:-1])
    var_prev = np.append(0.0, var[:-1])
    ratio = alpha / alpha_prev
    if hasattr(sde, "alphas_cumprod"):
        beta = 1.0 - ratio**2          # 1 - bar-alpha_j / bar-alpha_{j-1}, in one rounding
    else:
        beta = var - var_prev
    return Chain(levels=levels, times=level_times(levels, sde.T, sde.N), alpha=alpha,
                 sigma=np.sqrt(var), beta=beta, beta_tilde=beta * var_prev / var,
                 coef_x0=alpha_prev * beta / var, coef_xt=ratio * var_prev / var,
                 prior_std=prior_std)


# --------------------------------------------------------------------------- the bound's terms


def normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats (broadcasting)."""
    # -1 first: it cancels exp(0) exactly when the variances are equal (float32 small KLs).
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _log_prob_between(lo: Array, hi: Array) -> Array:
    """log(Phi(hi) - Phi(lo)) for lo < hi, computed in the tail where it is accurate."""
    upper = (lo + hi) > 0                 # both in the upper tail: use 1 - Phi(x) = Phi(-x)
    a, b = jnp.where(upper, -hi, lo), jnp.where(upper, -lo, hi)
    log_b = jax.scipy.special.log_ndtr(b)
    return log_b + jnp.log1p(-jnp.exp(jax.scipy.special.log_ndtr(a) - log_b))


def discretized_gaussian_log_likelihood(x: Array, mean: Array, log_scale: Array, *,
                                        num_levels: int, low: float = -1.0,
                                        high: float = 1.0) -> Array:
    """log P(bin of x) per element, in nats, under N(mean, e^(2 log_scale)) (Ho et al. 2020,
    eq. 13): x takes the num_levels values low + k (high - low) / (L - 1), each owning the bin of
    half-width (high - low) / (2 (L - 1)) around it, the end bins reaching to -+infinity. The exact
    normal CDF (DDPM's code uses a tanh approximation of it, within 1e-3 of it)."""
    half = (high - low) / (2.0 * (num_levels - 1))
    inv_scale = jnp.exp(-log_scale)
    lo = (x - mean - half) * inv_scale
    hi = (x - mean + half) * inv_scale
    first = x < low + half
    last = x > high - half
    inner = _log_prob_between(jnp.where(first | last, -1.0, lo), jnp.where(first | last, 1.0, hi))
    return jnp.where(first, jax.scipy.special.log_ndtr(hi),
                     jnp.where(last, jax.scipy.special.log_ndtr(-lo), inner))


def gaussian_log_density(x: Array, mean: Array, log_scale: Array) -> Array:
    """log N(x; mean, e^(2 log_scale)) per element, in nats."""
    return (-0.5 * math.log(2 * math.pi) - log_scale
            - 0.5 * (x - mean) ** 2 * jnp.exp(-2.0 * log_scale))


@dataclasses.dataclass(frozen=True)
class Decoder:
    """L_0's likelihood of the data: discretized for pixel data (num_levels, values in
    [low, high]), the Gaussian density for continuous data (num_levels None)."""

    num_levels: int | None = None
    low: float = -1.0
    high: float = 1.0

    def log_likelihood(self, x: Array, mean: Array, log_scale: Array) -> Array:
        if self.num_levels is None:
            return gaussian_log_density(x, mean, log_scale)
        return discretized_gaussian_log_likelihood(x, mean, log_scale, num_levels=self.num_levels,
                                                   low=self.low, high=self.high)


def vlb_term(chain: Chain, decoder: Decoder, x0: Array, xt: Array, j: Array, mean: Array,
             log_variance: Array) -> Array:
    """L_{j-1} per element in nats (like x0): KL(q(x_{j-1} | x_j, x_0) || N(mean, e^log_variance))
    for j >= 1, the decoder's -log p(x_0 | x at kept level 0) for j = 0; j (B,) int."""
    true_mean, true_logvar = chain.posterior(x0, xt, j)
    log_variance = jnp.broadcast_to(batch_broadcast(log_variance, x0)
                                    if log_variance.ndim == 1 else log_variance, x0.shape)
    kl = normal_kl(true_mean, batch_broadcast(true_logvar, x0), mean, log_variance)
    nll = -decoder.log_likelihood(x0, mean, 0.5 * log_variance)
    return jnp.where(batch_broadcast(j == 0, x0), nll, kl)


def prior_term(chain: Chain, x0: Array) -> Array:
    """L_T per element in nats: KL(N(a_{K-1} x_0, s_{K-1}^2) || N(0, prior_std^2))."""
    a, s = chain.alpha[-1], chain.sigma[-1]
    return normal_kl(a * x0, 2.0 * math.log(s), 0.0, 2.0 * math.log(chain.prior_std))


def _sum(x: Array) -> Array:
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def variational_bound(keys: Array, chain: Chain, decoder: Decoder, model_fn, x0: Array,
                      variances: tuple[str, ...] = ("learned",)) -> dict[str, Array]:
    """The whole bound of x0 (B, ...) in nats per example, one noise draw per level.

    keys: (B,) per-example keys; level j's noise is fold_in(keys[b], j). model_fn(x, j) ->
    (score, v), v the learned variance fraction (or None). `variances`: which Sigma to score the
    KL and decoder terms with ("learned", "beta", "beta_tilde"), all from one network pass per
    level. Returns {"prior": (B,), and for each variance V: V: the total (B,), "decoder_" + V:
    L_0 (B,)}.
    """
    def level(carry, j):
        jb = jnp.full(x0.shape[:1], j, jnp.int32)
        z = jax.vmap(lambda k, like: jax.random.normal(jax.random.fold_in(k, j), like.shape,
                                                       like.dtype))(keys, x0)
        xt = batch_broadcast(chain.table("alpha")[jb], x0) * x0 + batch_broadcast(
            chain.table("sigma")[jb], x0) * z
        score, v = model_fn(xt, jb)
        mean = chain.reverse_mean(xt, score, jb)
        terms = {}
        for name in variances:
            logvar = chain.log_variance(jb, v if name == "learned" else name)
            terms[name] = _sum(vlb_term(chain, decoder, x0, xt, jb, mean, logvar))
        return carry, terms

    _, per_level = jax.lax.scan(level, None, jnp.arange(len(chain) - 1, -1, -1))
    prior = _sum(prior_term(chain, x0))
    out = {"prior": prior}
    for name in variances:
        out[name] = jnp.sum(per_level[name], axis=0) + prior
        out["decoder_" + name] = per_level[name][-1]
    return out
