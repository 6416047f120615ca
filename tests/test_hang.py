"""A sampler must not hang on XLA:CPU (issue 26, part 4).

jaxlib 0.10.0 - 0.11.0 can deadlock when a program runs batched LAPACK calls (e.g. the LU
factorisation of `jnp.linalg.solve`) at the same time as each other. Each call splits its batch
over XLA:CPU's intra-op thread pool and then blocks its thread until the chunks are done. When
every pool thread is blocked this way, nothing is left to run the chunks (`diffusion.workarounds`
has the details). The PC sampler evaluates the score twice per grid step at the same time t. The
parts of a score that depend only on t, such as factorising a t-dependent matrix, could then run
at once, and on a 2-core machine `../shared/repro/sr_solve_hang.py` hung forever.
`diffusion.workarounds.sequenced` makes each evaluation wait for its state.

- `test_after_*`, `test_pc_sampler_scores_wait_for_their_state`: the workaround itself, in-process
  and deterministic (about 3 s together on 2 cores). They fail without it.
- `test_super_resolve_with_linear_solve_finishes` (slow set): the reported case, jitted as
  generate.py runs it, in a subprocess with a timeout. It is a race. Without the workaround it
  hung in every run measured on 2 cores at batches 200-2000 (jax 0.10.2). With it the case
  finishes in 5-15 s, compilation included.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import sampling
from diffusion import sde as sde_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_after_is_t_exactly_for_finite_states():
    from diffusion.workarounds import after

    x = jax.random.normal(jax.random.PRNGKey(0), (5, 4, 4, 1)) * 1e30
    t = jnp.linspace(0.0, 1.0, 5)
    np.testing.assert_array_equal(jax.jit(after)(x, t), t)
    np.testing.assert_array_equal(jax.jit(after)(x, t[0]), t[0])


def test_after_depends_on_the_state_after_optimisation():
    """Compiled by XLA, `after` still reads x: a NaN in an example's first entry reaches its t.
    So XLA has not folded the 0 * x away, and the dependence also orders execution."""
    from diffusion.workarounds import after

    x = jnp.zeros((3, 2, 2, 1)).at[1, 0, 0, 0].set(jnp.nan)
    out = np.asarray(jax.jit(after)(x, jnp.full((3,), 0.5)))
    assert np.isnan(out[1]) and np.all(out[[0, 2]] == 0.5)


def test_pc_sampler_scores_wait_for_their_state():
    """Each score evaluation of the PC sampler gets a time computed from the state it is given.
    The score returns NaN for example 0, so from the second grid step on that example's state
    is NaN, and the time its score gets must be NaN too; example 1's stays finite."""
    seen = []

    def score(x, t):
        jax.debug.callback(lambda t: seen.append(np.asarray(t)), t)
        return (-x).at[0].set(jnp.nan)

    sde = sde_lib.VPSDE(N=4)
    x, _ = sampling.pc_sample(jax.random.PRNGKey(0), sde, score, (2, 2, 2, 1),
                              predictor="euler_maruyama", corrector=None, n_steps=4)
    jax.block_until_ready(x)
    assert len(seen) == 4, seen
    assert all(np.isfinite(t[1]) for t in seen), seen           # example 1: its grid time
    first = [t for t in seen if not np.isnan(t[0])]
    assert len(first) == 1 and first[0][0] == first[0][1], seen  # step 0: the same time


# The case of the report (../shared/repro/sr_solve_hang.py), jitted: super-resolution with the
# exact score of Gaussian 4x4 images, which solves a batched 16 x 16 linear system.
CASE = textwrap.dedent("""
    import sys, time
    import numpy as np, jax, jax.numpy as jnp
    from diffusion import guidance, sde as sde_lib

    D, M, STEPS = 16, int(sys.argv[1]), int(sys.argv[2])
    sde = sde_lib.VPSDE(N=STEPS)
    A = np.random.default_rng(0).normal(size=(D, D)) / 4
    S = jnp.asarray(A @ A.T + 0.05 * np.eye(D), jnp.float32)

    def score(x, t):
        lm = -0.25 * t**2 * 19.9 - 0.05 * t
        a2, s2 = jnp.exp(2 * lm), -jnp.expm1(2 * lm)
        C = a2[:, None, None] * S[None] + s2[:, None, None] * jnp.eye(D)[None]
        b = x.reshape(x.shape[0], D)[..., None]
        return -jnp.linalg.solve(C, b)[..., 0].reshape(x.shape)

    t0 = time.time()
    run = jax.jit(lambda key: guidance.super_resolve_sample(
        key, sde, score, jnp.zeros((M, 2, 2, 1)), 2, steps=STEPS)[0])
    x = np.asarray(run(jax.random.PRNGKey(9)))
    assert x.shape == (M, 4, 4, 1) and np.all(np.isfinite(x)), x.shape
    print(f"finished {M} images, {STEPS} steps in {time.time() - t0:.1f} s")
""")


# Pins the child to the cores in TEST_HANG_CPUS before JAX sizes its thread pool.
PRELUDE = ("import os\n"
           "os.sched_setaffinity(0, [int(c) for c in os.environ['TEST_HANG_CPUS'].split(',')])\n")


def run_isolated(code: str, args: list[str], timeout: float) -> str:
    """Runs `code` in a fresh Python that imports this checkout. The child sees one CPU device,
    so its intra-op pool has one thread per core it may use, and at most 2 cores, so the pool
    has 2 threads as on the 2-core machine where the hang was found (on more cores it only gets
    rarer). The child does not inherit conftest's XLA_FLAGS: its 4 fake devices give the pool 4
    threads, and that hides the deadlock. Fails if the child has not finished after `timeout`
    seconds."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env["TEST_HANG_CPUS"] = ",".join(map(str, sorted(os.sched_getaffinity(0))[:2]))
    proc = subprocess.Popen([sys.executable, "-c", PRELUDE + code, *args], cwd=ROOT, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"not finished after {timeout:.0f} s: hung (the XLA:CPU batched-LAPACK "
                    f"deadlock, see diffusion/workarounds.py?). Output:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.slow
def test_super_resolve_with_linear_solve_finishes():
    out = run_isolated(CASE, ["400", "40"], timeout=120)
    assert "finished 400 images" in out, out
