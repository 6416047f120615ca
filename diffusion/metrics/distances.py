"""Distances between two sets of samples for low-dimensional data (toys, vectors).

Both are pure JAX, jit-compatible, and take x (N, D), y (M, D).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


@functools.partial(jax.jit, static_argnames="num_projections")
def sliced_wasserstein(key: Array, x: Array, y: Array, num_projections: int = 256) -> Array:
    """Sliced 2-Wasserstein distance: sqrt(E_theta W_2^2(theta.x, theta.y)), theta ~ U(sphere).

    x (N, D), y (M, D). The 1-D distances are exact for the empirical measures: the integral over
    q in [0, 1] of the squared difference of their quantile functions, which are piecewise
    constant between the breaks i / N and j / M (sorted samples matched one to one when N = M).
    For N(m1, I) against N(m2, I) in D dimensions it is |m1 - m2| / sqrt(D) (Bonneel et al. 2015).
    """
    d = x.shape[1]
    theta = jax.random.normal(key, (d, num_projections))
    theta = theta / jnp.linalg.norm(theta, axis=0, keepdims=True)
    px, py = jnp.sort(x @ theta, axis=0), jnp.sort(y @ theta, axis=0)
    n, m = px.shape[0], py.shape[0]
    if n == m:
        return jnp.sqrt(jnp.mean((px - py) ** 2))
    breaks = jnp.sort(jnp.concatenate([jnp.arange(n + 1) / n, jnp.arange(1, m) / m]))
    width, middle = jnp.diff(breaks), (breaks[1:] + breaks[:-1]) / 2
    ix = jnp.minimum(jnp.floor(middle * n).astype(jnp.int32), n - 1)
    iy = jnp.minimum(jnp.floor(middle * m).astype(jnp.int32), m - 1)
    return jnp.sqrt(jnp.mean(width @ (px[ix] - py[iy]) ** 2))


def mmd_rbf(x: Array, y: Array, bandwidth: float | None = None) -> Array:
    """Unbiased squared maximum mean discrepancy with a Gaussian kernel (Gretton et al. 2012).

    bandwidth None: the median pairwise distance of the pooled samples. Near 0 (and unbiased, so
    possibly slightly negative) for samples of one distribution.
    """
    z = jnp.concatenate([x, y])
    sq = jnp.sum((z[:, None, :] - z[None, :, :]) ** 2, axis=-1)
    if bandwidth is None:
        bandwidth = jnp.sqrt(jnp.median(sq[jnp.triu_indices(z.shape[0], 1)]))
    k = jnp.exp(-sq / (2.0 * bandwidth**2))
    n, m = x.shape[0], y.shape[0]
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    off = lambda a, size: (jnp.sum(a) - jnp.trace(a)) / (size * (size - 1))
    return off(kxx, n) + off(kyy, m) - 2.0 * jnp.mean(kxy)
