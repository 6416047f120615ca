"""DDPM's ancestral sampler on the discrete chain, respaced (Ho et al. 2020, Alg. 2; Nichol &
Dhariwal 2021, sec. 4).

    x, nfe = ddpm_sample(key, sde, score_fn, shape, steps=100, spacing="evenly")

The chain (`diffusion.chain`) keeps `steps` of the SDE's N levels (all of them by default) with
the forward variances recomputed from the kept alpha-bars (or sigmas), and each step draws
x_{j-1} ~ N(mu, Sigma): mu the posterior mean at the model's x_0 prediction
D = (x_j + s_j^2 score) / a_j, Sigma the model's learned variance when `score_fn` gives one
(`sde_base.ScoreWithVariance`: its fraction v interpolates the respaced chain's own bounds, so a
learned variance rescales with the spacing), else b_j ("beta", DDPM's sigma^2 = beta) or beta~_j
("beta_tilde"). With all N levels this is the PC sampler's ancestral predictor (score_sde's
appendix F form of the same step): with "beta" for DDPM chains, "beta_tilde" for SMLD's. The last
step returns the mean at level 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from diffusion import chain as chain_lib
from diffusion import rng
from diffusion.sde_base import SDE, ScoreFn, batch_broadcast

Array = jax.Array


def ddpm_sample(key: Array, sde: SDE, score_fn: ScoreFn, shape: tuple[int, ...],
                steps: int | None = None, spacing: str = "evenly", variance: str = "beta",
                eps: float | None = None, denoise: bool = True) -> tuple[Array, int]:
    """Ancestral sampling of the SDE's discrete chain on `steps` of its N levels.

    Args:
      key: one PRNG key or (B,) keys, one per sample: sample b's prior draw comes from its key
        and rng.PRIOR, step j's noise from fold_in(fold_in(its key, rng.STEPS), j).
      sde: an SDE with a Gaussian chain (VPSDE, CosineVPSDE: DDPM; VESDE: SMLD).
      score_fn: score_fn(x, t) -> score; called at the float32 times that discrete-time models
        map back to each kept level (`chain.level_times`). With a `with_variance` method it
        also gives the learned variance.
      shape: (B, ...).
      steps: kept levels K (2 <= K <= N); None or 0: all N.
      spacing: "evenly" or "quad" (`chain.respaced_levels`).
      variance: the fixed Sigma of a model without a learned one: "beta" or "beta_tilde".
      eps: unused (the chain ends at its level 0); accepted like every sampler's.
      denoise: return the last step's mean (DDPM's x_0); False adds its noise too.

    Returns:
      (x, nfe = K): samples of `shape`.
    """
    del eps
    n = sde.N
    levels = None if not steps or steps == n else chain_lib.respaced_levels(n, steps, spacing)
    chain = chain_lib.make_chain(sde, levels)
    if variance not in chain_lib.FIXED_VARIANCES:
        raise ValueError(f"Unknown variance {variance!r}: use one of "
                         f"{list(chain_lib.FIXED_VARIANCES)}.")
    learned = hasattr(score_fn, "with_variance")
    keys = rng.per_example(key, shape[0])
    x = rng.prior(sde, keys, shape)
    loop_keys = rng.fold_in(keys, rng.STEPS)
    times = jnp.asarray(chain.times)

    def step(x, j):
        t = jnp.full(shape[:1], times[j], x.dtype)
        jb = jnp.full(shape[:1], j, jnp.int32)
        if learned:
            score, v = score_fn.with_variance(x, t)
        else:
            score, v = score_fn(x, t), variance
        mean = chain.reverse_mean(x, score, jb)
        std = jnp.exp(0.5 * chain.log_variance(jb, v))
        std = std if learned else batch_broadcast(std, x)
        z = rng.normal(rng.fold_in(loop_keys, j), x.shape, x.dtype)
        noisy = (j > 0) | (not denoise)
        return mean + jnp.where(noisy, std, 0.0) * z, None

    x, _ = lax.scan(step, x, jnp.arange(len(chain) - 1, -1, -1))
    return x, len(chain)
