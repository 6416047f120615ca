"""Conditional sampling (`diffusion.guidance`) against exact conditionals, with exact scores.

    python benchmarks/guidance_accuracy.py             # all tasks, 4000 samples (~1.5 min, 2 cores)
    python benchmarks/guidance_accuracy.py --n 1000 --tasks inpaint_gaussian,colorize

Data with a closed-form conditional p(x | P x = P x_0), sampled with the exact score of the data
under the VP SDE (so every error is the conditional sampler's, not a network's):

- inpaint_gaussian: a 2-D Gaussian with correlation 0.9, coordinate 0 known (mask [1, 0]);
- inpaint_mixture: a 2-D mixture of two full-covariance Gaussians, coordinate 0 known; the
  conditional of x_1 is a two-component mixture with posterior weights;
- super_resolve: 4x4x1 Gaussian images (smooth covariance 0.25 (exp(-|i - j|^2 / 1.5^2) +
  0.05 I)), factor 2: the 2x2 block means are known, 12 dimensions to fill;
- colorize: 2x2x3 Gaussian images with correlated channels (spatial x channel covariance):
  the channel means are known, 8 dimensions to fill.

Each of `--n` data points x_0 (drawn once per task) is conditioned on, once per method. Columns:

- NFE: score evaluations per sample;
- known err: max |P x - P x_0| over all samples (0 up to float32 rounding by construction);
- SW2: the distance to the exact conditional. The unknown part of every sample is mapped to a
  residual that is N(0, I) exactly when the sample is from the exact conditional: for Gaussian
  data the whitened residual L^-1 (b - E[b | a]) (b, a: the unknown / known coordinates in an
  orthonormal basis of the complement / range of P, C = L L^T the conditional covariance); for
  the mixture the probability integral transform Phi^-1(F(x_1 | x_0)) with the exact conditional
  CDF F. SW2 is the sliced Wasserstein-2 distance (`metrics.sliced_wasserstein`, 256 fixed
  projections; exact W2 in 1-D) between these residuals and n fixed samples of N(0, I);
- var: the mean variance of the residual's coordinates (1 when exact; > 1 is excess spread);
- the row "exact conditional" is n exact conditional samples through the same residual map: the
  SW2 of a perfect sampler at this n (the noise floor);
- seconds: wall time of the first (jitted) call, compilation included.

Methods: the PC replacement method (Song et al. 2021, app. I.2) with the paper's predictor and
corrector (reverse diffusion + Langevin, snr 0.16, `--steps` grid = VPSDE(N=steps)) and with the
Euler-Maruyama predictor alone; RePaint (r = 5 runs per step, Euler-Maruyama, steps / 5 grid
steps: the same NFE as Euler-Maruyama); and the deterministic variant (the known part of the data
prediction replaced) with DPM-Solver++ 2M (`--dpm_steps`) and DDIM (`--ddim_steps`).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scipy import special, stats  # noqa: E402

from diffusion import guidance, metrics  # noqa: E402
from diffusion import sde as sde_lib  # noqa: E402
from diffusion.gaussian_mixture import GaussianMixture  # noqa: E402

TASKS = ("inpaint_gaussian", "inpaint_mixture", "super_resolve", "colorize")
EM = dict(predictor="euler_maruyama", corrector=None)


# --------------------------------------------------------------------------- data and conditionals


def smooth_cov(h: int, w: int, ell: float, nugget: float) -> np.ndarray:
    """exp(-|i - j|^2 / ell^2) + nugget I over the pixel positions of an h x w image."""
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    pos = np.stack([ii.ravel(), jj.ravel()], axis=1).astype(np.float64)
    return np.exp(-np.sum((pos[:, None] - pos[None]) ** 2, -1) / ell**2) + nugget * np.eye(h * w)


def complement(u_k: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the orthogonal complement of the columns of u_k."""
    d, dk = u_k.shape
    q, _ = np.linalg.qr(np.concatenate([u_k, np.eye(d)], axis=1))
    return q[:, dk:d]


class GaussianTask:
    """Data N(mu, cov) in R^D, shown to the sampler as `shape`; known part spanned by u_k."""

    def __init__(self, mu, cov, u_k, shape):
        self.mu, self.cov, self.u_k, self.shape = mu, cov, u_k, shape
        self.u_u = complement(u_k)
        s_aa = u_k.T @ cov @ u_k
        s_ba, s_bb = self.u_u.T @ cov @ u_k, self.u_u.T @ cov @ self.u_u
        self.gain = s_ba @ np.linalg.inv(s_aa)
        self.chol = np.linalg.cholesky(s_bb - self.gain @ s_ba.T)
        self.model = GaussianMixture(jnp.ones(1, jnp.float32), jnp.asarray(mu[None], jnp.float32),
                                     jnp.asarray(cov[None], jnp.float32))

    def data(self, rng, n):
        return rng.multivariate_normal(self.mu, self.cov, size=n, method="cholesky")

    def score_fn(self, sde):
        gm = self.model
        return lambda x, t: gm.score(x.reshape(x.shape[0], -1), t, sde).reshape(x.shape)

    def _conditional_mean(self, x0):
        a = x0 @ self.u_k
        return self.u_u.T @ self.mu + (a - self.u_k.T @ self.mu) @ self.gain.T

    def residual(self, x, x0):
        return np.linalg.solve(self.chol, (x @ self.u_u - self._conditional_mean(x0)).T).T

    def exact(self, rng, x0):
        b = self._conditional_mean(x0) + rng.standard_normal(
            (len(x0), self.u_u.shape[1])) @ self.chol.T
        return x0 @ self.u_k @ self.u_k.T + b @ self.u_u.T


class MixtureInpaintTask:
    """A 2-D mixture of two Gaussians, coordinate 0 known."""

    weights = np.array([0.4, 0.6])
    means = np.array([[-1.0, 0.5], [1.0, -0.5]])
    covs = np.array([[[0.3, 0.1], [0.1, 0.2]], [[0.2, -0.05], [-0.05, 0.3]]])
    shape = (2,)
    u_k = np.array([[1.0], [0.0]])

    def __init__(self):
        self.model = GaussianMixture(*(jnp.asarray(a, jnp.float32)
                                       for a in (self.weights, self.means, self.covs)))

    def data(self, rng, n):
        k = rng.choice(2, size=n, p=self.weights)
        chol = np.linalg.cholesky(self.covs)[k]
        return self.means[k] + np.einsum("nde,ne->nd", chol, rng.standard_normal((n, 2)))

    def score_fn(self, sde):
        return self.model.score_fn(sde)

    def _conditional(self, a):
        """Posterior weights (n, 2), component conditional means (n, 2) and stds (2,)."""
        log_w = np.log(self.weights) + stats.norm.logpdf(a[:, None], self.means[:, 0],
                                                         np.sqrt(self.covs[:, 0, 0]))
        weights = np.exp(log_w - special.logsumexp(log_w, axis=-1, keepdims=True))
        slope = self.covs[:, 1, 0] / self.covs[:, 0, 0]
        means = self.means[:, 1] + slope * (a[:, None] - self.means[:, 0])
        return weights, means, np.sqrt(self.covs[:, 1, 1] - slope * self.covs[:, 1, 0])

    def residual(self, x, x0):
        weights, means, sds = self._conditional(x0[:, 0])
        cdf = np.sum(weights * stats.norm.cdf((x[:, 1:2] - means) / sds), axis=-1)
        return stats.norm.ppf(np.clip(cdf, 1e-15, 1.0 - 1e-15))[:, None]

    def exact(self, rng, x0):
        weights, means, sds = self._conditional(x0[:, 0])
        k = np.sum(rng.random(len(x0))[:, None] > np.cumsum(weights, axis=-1), axis=-1)
        b = means[np.arange(len(x0)), k] + sds[k] * rng.standard_normal(len(x0))
        return np.stack([x0[:, 0], b], axis=1)


def make_task(name: str):
    if name == "inpaint_gaussian":
        cov = np.array([[1.0, 0.72], [0.72, 0.64]])  # stds 1 and 0.8, correlation 0.9
        return GaussianTask(np.array([0.5, -0.3]), cov, np.array([[1.0], [0.0]]), (2,))
    if name == "inpaint_mixture":
        return MixtureInpaintTask()
    if name == "super_resolve":
        u_k = np.zeros((16, 4))
        for block in range(4):
            img = np.zeros((4, 4))
            i, j = divmod(block, 2)
            img[2 * i:2 * i + 2, 2 * j:2 * j + 2] = 0.5  # normalised block indicator
            u_k[:, block] = img.ravel()
        return GaussianTask(np.linspace(-0.3, 0.3, 16), 0.25 * smooth_cov(4, 4, 1.5, 0.05), u_k,
                            (4, 4, 1))
    if name == "colorize":
        channels = np.array([[1.0, 0.6, 0.3], [0.6, 1.0, 0.6], [0.3, 0.6, 1.0]])
        cov = 0.2 * np.kron(smooth_cov(2, 2, 1.5, 0.1), channels)
        u_k = np.kron(np.eye(4), np.ones((3, 1)) / np.sqrt(3.0))
        return GaussianTask(np.tile([0.3, 0.0, -0.2], 4), cov, u_k, (2, 2, 3))
    raise ValueError(f"Unknown task {name!r}: choose from {TASKS}.")


def conditional_sampler(task_name: str, shape):
    """sample(key, sde, score_fn, x0 (n, *shape), steps, **kwargs) -> (x, nfe) for the task."""
    if task_name.startswith("inpaint"):
        mask = jnp.asarray([[1.0, 0.0]])
        return lambda key, sde, score_fn, x0, steps, **kw: guidance.inpaint_sample(
            key, sde, score_fn, x0, mask, steps, **kw)
    if task_name == "super_resolve":
        return lambda key, sde, score_fn, x0, steps, **kw: guidance.super_resolve_sample(
            key, sde, score_fn, guidance.downsample(x0, 2), 2, steps, **kw)
    return lambda key, sde, score_fn, x0, steps, **kw: guidance.colorize_sample(
        key, sde, score_fn, jnp.mean(x0, axis=-1, keepdims=True), steps, **kw)


def methods(steps: int, dpm_steps: int, ddim_steps: int, resample: int) -> dict:
    """label -> (sde, steps, kwargs)."""
    vp = sde_lib.VPSDE()
    return {
        f"pc: reverse diffusion + Langevin, {steps} steps (paper)":
            (sde_lib.VPSDE(N=steps), steps, {}),
        f"pc: Euler-Maruyama, {steps} steps": (vp, steps, dict(EM)),
        f"RePaint r={resample}: Euler-Maruyama, {steps // resample} steps":
            (vp, steps // resample, dict(resample=resample, **EM)),
        f"dpm_solver++ 2M, {dpm_steps} steps": (vp, dpm_steps, dict(sampler="dpm_solver")),
        f"ddim, {ddim_steps} steps": (vp, ddim_steps, dict(sampler="ddim")),
    }


def task_rows(task_name: str, args) -> None:
    """The table's rows for one task."""
    task = make_task(task_name)
    rng = np.random.default_rng(0)
    x0 = task.data(rng, args.n)
    d_u = task.residual(x0, x0).shape[1]
    reference = jax.random.normal(jax.random.key(1), (args.n, d_u))
    sample = conditional_sampler(task_name, task.shape)

    def row(label, x, nfe, seconds):
        residual = task.residual(x, x0)
        known = float(np.max(np.abs((x - x0) @ task.u_k)))
        distance = float(metrics.sliced_wasserstein(
            jax.random.key(2), jnp.asarray(residual, jnp.float32), reference))
        var = float(np.mean(residual.var(axis=0)))
        print(f"| {task_name} | {label} | {nfe} | {known:.1e} | {distance:.4f} | {var:.3f} | "
              f"{seconds:.1f} |", flush=True)

    row("exact conditional (noise floor)", task.exact(rng, x0), 0, 0.0)
    x0_in = jnp.asarray(x0.reshape(args.n, *task.shape), jnp.float32)
    for label, (sde, steps, kwargs) in methods(args.steps, args.dpm_steps, args.ddim_steps,
                                               args.resample).items():
        score_fn = task.score_fn(sde)
        fn = jax.jit(lambda key, x0, sde=sde, score_fn=score_fn, steps=steps, kwargs=kwargs:
                     sample(key, sde, score_fn, x0, steps, **kwargs))
        start = time.time()
        x, nfe = jax.block_until_ready(fn(jax.random.key(0), x0_in))
        row(label, np.asarray(x, np.float64).reshape(args.n, -1), int(nfe), time.time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="samples (conditions) per task")
    parser.add_argument("--steps", type=int, default=1000,
                        help="PC grid; RePaint runs steps / resample grid steps")
    parser.add_argument("--resample", type=int, default=5)
    parser.add_argument("--dpm_steps", type=int, default=30)
    parser.add_argument("--ddim_steps", type=int, default=100)
    parser.add_argument("--tasks", default=",".join(TASKS))
    args = parser.parse_args()
    start = time.time()
    print(f"{jax.device_count()} x {jax.devices()[0].platform}, {os.cpu_count()} CPU cores; "
          f"n = {args.n}, exact scores, VP SDE, float32\n")
    print("| task | method | NFE | known err | SW2 | var | seconds |")
    print("|------|--------|-----|-----------|-----|-----|---------|")
    for task_name in args.tasks.split(","):
        task_rows(task_name, args)
    print(f"\ntotal {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
