"""Per-example randomness: one key per example or sample, and one constant per purpose.

Every random draw of a training example (its noise, noise level, label dropout) and of a sample
(its prior draw, the sampler's noise at every step, a guided task's noise, its random label, the
Hutchinson probe of its likelihood) comes from the key of its global index, fold_in(key, index),
with the purpose below folded in. The draws therefore do not depend on the number of devices or
processes, on the batch size, or on where in a batch an example sits: sample n of a seed is the
same on a laptop and on a pod (EDM's generate.py seeds each image by its index the same way).

Keys are derived with `jax.random.fold_in` only, never `split`: in JAX's threefry implementation
split(k)[i] equals fold_in(k, i), so mixing the two gives two purposes one key (the label dropout
of classifier-free guidance once drew its decision from the same key as the example's noise
level, dropping labels only at small t).

A "key" argument of the samplers and of the likelihood is either one key, for which example b
uses fold_in(key, b), or a (B,) batch of keys, one per example (`per_example`). Raw uint32 keys
(`jax.random.PRNGKey`) and typed keys (`jax.random.key`) are both accepted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

# Purposes folded into an example's key. NOISE and TIME are fold_in(k, 0) and fold_in(k, 1),
# which equal the split(k) pair the losses drew (z, t) from before this module existed.
NOISE = 0           # training: the example's noise z
TIME = 1            # training: its noise level (t, sigma or the discrete level)
LABEL_DROPOUT = 2   # training: classifier-free guidance's label dropout
DROPOUT = 3         # training: the network's dropout (one key per device batch, see losses.py)
PRIOR = 4           # sampling: the prior draw x_T
STEPS = 5           # sampling: step j's noise from fold_in(fold_in(k, STEPS), j)
LABEL = 6           # sampling: the random label of a class-conditional sample
PROBE = 7           # likelihood: the Hutchinson probe
# Within one sampler step (after STEPS and the step index): the predictor, the corrector (then
# fold_in(., m) for its m-th step), the guided task's re-noising after each, RePaint's forward
# step (after its repeat index).
PREDICTOR, CORRECTOR, CONDITION_CORRECTOR, CONDITION_PREDICTOR, RENOISE = 0, 1, 2, 3, 7


def is_batch(key: Array) -> bool:
    """Whether `key` is a batch of keys (B,) rather than one key."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    return jnp.ndim(key) == (1 if typed else 2)


def per_example(key: Array, batch: int) -> Array:
    """(B,) keys: `key` itself if it is a batch of B keys, else fold_in(key, b) for b < B."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if is_batch(key):
        if key.shape[0] != batch:
            raise ValueError(f"Got {key.shape[0]} keys for a batch of {batch} examples.")
        return key
    return indexed(key, jnp.arange(batch))


def indexed(key: Array, indices: Array) -> Array:
    """fold_in(key, i) for each of the (B,) integer `indices`: the keys of those examples."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(indices, jnp.uint32))


def fold_in(key: Array, data) -> Array:
    """fold_in(., data) of one key or of each key of a batch."""
    if is_batch(key):
        return jax.vmap(lambda k: jax.random.fold_in(k, data))(key)
    return jax.random.fold_in(key, data)


def normal(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    """N(0, I) of `shape` = (B, ...): row b from example b's key (`per_example`)."""
    keys = per_example(key, shape[0])
    return jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype))(keys)


def rademacher(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    """Uniform signs of `shape` = (B, ...): row b from example b's key."""
    keys = per_example(key, shape[0])
    return jax.vmap(lambda k: jax.random.rademacher(k, shape[1:], dtype))(keys)


def prior(sde, key: Array, shape: tuple[int, ...]) -> Array:
    """Prior samples of `sde` of `shape` = (B, ...): row b from fold_in(example b's key, PRIOR).

    `sde.prior_sampling` draws a whole batch from one key; here each row is that draw for a
    batch of one, so a sample's starting point does not depend on the batch it is drawn in.
    """
    keys = fold_in(per_example(key, shape[0]), PRIOR)
    return jax.vmap(lambda k: sde.prior_sampling(k, (1, *shape[1:]))[0])(keys)
