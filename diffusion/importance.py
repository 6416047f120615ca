"""Importance sampling of the discrete levels for the variational bound (Nichol & Dhariwal 2021,
sec. 3.3): p_i proportional to sqrt(E[L_i^2]), estimated from the last 10 losses seen at each
level i, uniform until every level has 10, and mixed with 0.001 of the uniform distribution.

The history lives in the train state (`TrainState.loss_state`, saved with every checkpoint) and
is updated, identically on every device, with the whole global batch's (level, loss) pairs in
the order of the examples' global indices, so it does not depend on the number of devices.

    history = init_history(num_levels)
    p = level_probs(history)                      # (N,) sampling probabilities
    history = update_history(history, levels, losses)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
HISTORY_PER_LEVEL = 10
UNIFORM_PROB = 0.001


def init_history(num_levels: int, per_level: int = HISTORY_PER_LEVEL) -> dict[str, Array]:
    """{"losses": (N, per_level) float32, "counts": (N,) int32}, empty."""
    return {"losses": jnp.zeros((num_levels, per_level), jnp.float32),
            "counts": jnp.zeros((num_levels,), jnp.int32)}


def level_probs(history: dict[str, Array], uniform_prob: float = UNIFORM_PROB) -> Array:
    """(N,) probabilities: uniform until every level holds a full history, then
    sqrt(mean(L^2)) normalised, times (1 - uniform_prob), plus uniform_prob / N."""
    losses, counts = history["losses"], history["counts"]
    n = losses.shape[0]
    warm = jnp.all(counts == losses.shape[1])
    rms = jnp.sqrt(jnp.mean(losses**2, axis=1))
    weighted = rms / jnp.maximum(jnp.sum(rms), 1e-30) * (1.0 - uniform_prob) + uniform_prob / n
    return jnp.where(warm, weighted, jnp.full((n,), 1.0 / n))


def update_history(history: dict[str, Array], levels: Array, losses: Array) -> dict[str, Array]:
    """The history after seeing losses (G,) at levels (G,), one after another: a level with a
    full history drops its oldest loss."""
    per_level = history["losses"].shape[1]

    def see(j, h):
        i, loss = levels[j], losses[j].astype(jnp.float32)
        row, count = h["losses"][i], h["counts"][i]
        full = count == per_level
        shifted = jnp.where(full, jnp.roll(row, -1), row)
        row = shifted.at[jnp.where(full, per_level - 1, count)].set(loss)
        return {"losses": h["losses"].at[i].set(row),
                "counts": h["counts"].at[i].set(jnp.minimum(count + 1, per_level))}

    return jax.lax.fori_loop(0, levels.shape[0], see, history)
