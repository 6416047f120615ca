"""Workarounds for bugs in the libraries the project runs on, each with its reproducer and fix.

jaxlib 0.10.0 - 0.11.0 on XLA:CPU: batched LAPACK calls can deadlock (every thread asleep)
---------------------------------------------------------------------------------------------
A batched LAPACK custom call (the LU of `jnp.linalg.solve`, `inv` and `det`, and also Cholesky,
triangular solves, QR, eigh, SVD, ...) whose batch costs more than about 2e5 flops (for 16 x 16
LU factorisations, 50 or more matrices) splits the batch into chunks on XLA:CPU's intra-op thread
pool. The thread that called it then blocks until its chunks are done
(`jax::ParallelBatchMap` in jaxlib/cpu/lapack_kernels.cc). XLA's thunk executor runs independent
operations of one program at the same time, on that same pool: one thread per CPU core the process
may use, or one per device with `--xla_force_host_platform_device_count` when that is more. When
every pool thread is inside such a call, the chunks they scheduled have no thread left to run on,
and the program never finishes. Sampling hit this through the PC sampler: the corrector and
predictor evaluate the score at the same time t, so a score that solves a t-dependent linear
system (the exact score of Gaussian data) ran two LU factorisations at once, one per thread of a
2-core machine.
Upstream stopped splitting LAPACK batches in open-source builds after the 0.11.0 release
(jax-ml/jax commit 859992407d on main, "Don't try to parallelize LAPACK kernels in opensource
builds"); the splitting came in 0.10.0 (bfd9e1fbd3). A reproducer in plain JAX is 8 independent
batched solves in one jitted function; the project's case is tests/test_hang.py.

`after(x, t)` is the workaround the samplers use: `score_fn(x, after(x, t))` evaluates the score
only once x is known, so no part of one evaluation can overlap the one before. Every sampler and
the likelihood evaluate the score this way (`sequenced` in the PC sampler, `after` in
`sde_base.denoised`, which the few-step solvers use, and in the probability-flow vector field),
so their score evaluations run one at a time, and so do the LAPACK calls in them (unless one
evaluation makes several independent calls itself, as a plain JAX program would).
(`lax.optimization_barrier((x, t))` does not do: XLA:CPU's thunk executor schedules by buffers,
and the barrier's outputs are its inputs' buffers, so the hang stays; measured.) Remove this
module when the project requires a jaxlib with that commit.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]


def after(x: jax.Array, t: jax.Array) -> jax.Array:
    """t, computed from x: anything computed from the result waits for x to be ready.

    Each example's t gets 0 * (its first entry of x) added. XLA does not simplify a float
    multiplied by 0 (the result is NaN when the value is inf or NaN), so the dependence
    survives optimisation. Where x is finite the value is t exactly; an example whose first
    entry is inf or NaN (a state that has already diverged) gets t = NaN.
    """
    t = jnp.asarray(t)
    zero = 0 * jnp.reshape(x, (x.shape[0], -1))[:, 0].astype(t.dtype)
    if t.ndim == 0:
        return t + zero[0]
    return t + jnp.reshape(zero, zero.shape + (1,) * (t.ndim - 1))


def sequenced(score_fn: ScoreFn) -> ScoreFn:
    """score_fn, evaluated only once its x is known (see `after` and this module's docstring)."""

    def score(x, t):
        return score_fn(x, after(x, t))

    return score
