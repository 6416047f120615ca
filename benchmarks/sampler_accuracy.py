"""Sampler and likelihood accuracy with the exact score of Gaussian mixtures.

    python benchmarks/sampler_accuracy.py                 # all three tables (~10 min on 2 cores)
    python benchmarks/sampler_accuracy.py --tables samplers --sdes vpsde --num_samples 4000

1. likelihood: `likelihood.log_likelihood` (exact divergence, rtol = atol = 1e-5) against the exact
   log p_eps(x) of a 2-D ring of 8 Gaussians and a 64-D mixture of 4 full-covariance Gaussians;
   mean |error| in nats per example, with the exact p_T as the prior (the solver's error) and
   with the SDE's prior (adding the prior mismatch).
2. samplers: every sampler from T to eps = 1e-3 on the 2-D ring; sliced Wasserstein-2 distance
   (`metrics.sliced_wasserstein`, same projections) of num_samples samples to as many exact
   samples of p_eps, and the cross entropy -E log p_eps(x) of the samples under the exact density.
   The row "exact p_eps" is a second exact sample: the distances of a perfect sampler (noise).
3. orders: RMS error of the few-step solvers against the ODE solved at rtol = atol = 1e-10 from
   the same prior samples (float64), and the observed order log2(e(n) / e(2n)).
"""

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from diffusion import likelihood, metrics, sampling  # noqa: E402
from diffusion import sde as sde_lib  # noqa: E402
from diffusion.gaussian_mixture import GaussianMixture  # noqa: E402

EPS = 1e-3


def samplers() -> dict:
    """name -> sampler(key, sde, score_fn, shape) -> (x, nfe)."""
    p = functools.partial
    rows = {
        "pc euler_maruyama 1000": p(sampling.pc_sample, predictor="euler_maruyama",
                                    n_steps=1000, denoise=False),
        "pc euler_maruyama + langevin 1000": p(sampling.pc_sample, predictor="euler_maruyama",
                                               corrector="langevin", snr=0.16, n_steps=1000,
                                               denoise=False),
        "ode tsit5 (rtol 1e-5)": p(sampling.ode_sample),
    }
    rows.update({f"ddim {n}": p(sampling.ddim_sample, steps=n) for n in (50, 20, 10)})
    for order in (2, 3):
        rows.update({f"dpm_solver++ {order}M {n}": p(sampling.dpm_solver_sample, steps=n,
                                                     order=order) for n in (10, 15, 20, 50)})
    rows.update({f"edm heun {n}": p(sampling.edm_sample, steps=n, denoise=False)
                 for n in (10, 18)})
    return {name: p(fn, eps=EPS) for name, fn in rows.items()}


def likelihood_table(sdes: list[str], num: int) -> None:
    print(f"\n## Likelihood: mean |log p - exact| in nats per example ({num} points of p_eps, "
          "eps 1e-5, exact divergence, rtol = atol = 1e-5)\n")
    print("| data | SDE | NFE | error, exact p_T prior | error, SDE prior | seconds |")
    print("|------|-----|-----|------------------------|------------------|---------|")
    eps = 1e-5
    mixtures = {"2-D ring": GaussianMixture.ring(),
                "64-D mixture": GaussianMixture.random(jax.random.key(64), 64, n_components=4)}
    for data, mixture in mixtures.items():
        for name in sdes:
            sde = sde_lib.get_sde(name)
            score_fn = mixture.score_fn(sde)
            t_eps = jnp.full((num,), eps)
            x = mixture.sample(jax.random.key(1), num, t=t_eps, sde=sde)
            exact = mixture.log_prob(x, t_eps, sde)
            p_T = lambda z, sde=sde, m=mixture: m.log_prob(  # noqa: E731
                z, jnp.full((z.shape[0],), sde.T), sde)
            start = time.time()
            errors = []
            for prior in (p_T, None):
                fn = jax.jit(lambda x, prior=prior, sde=sde, score_fn=score_fn:
                             likelihood.log_likelihood(jax.random.key(2), sde, score_fn, x,
                                                       divergence="exact", eps=eps,
                                                       prior_logp=prior))
                logp, nfe = fn(x)
                errors.append(float(jnp.mean(jnp.abs(logp - exact))))
            print(f"| {data} | {name} | {int(nfe)} | {errors[0]:.1e} | {errors[1]:.1e} | "
                  f"{time.time() - start:.0f} |", flush=True)


def sampler_table(sdes: list[str], num: int) -> None:
    mixture = GaussianMixture.ring()
    print(f"\n## Samplers on the 2-D ring of 8 Gaussians, exact score, {num} samples of p_eps, "
          f"eps {EPS}\n")
    print("| SDE | sampler | NFE | sliced W2 | cross entropy (nats) | seconds |")
    print("|-----|---------|-----|-----------|----------------------|---------|")
    for name in sdes:
        sde = sde_lib.get_sde(name)
        score_fn = mixture.score_fn(sde)
        t_eps = jnp.full((num,), EPS)
        reference = mixture.sample(jax.random.key(10), num, t=t_eps, sde=sde)
        projections_key = jax.random.key(11)

        def row(label, x, nfe, seconds, name=name, sde=sde, t_eps=t_eps, reference=reference,
                projections_key=projections_key):
            distance = float(metrics.sliced_wasserstein(projections_key, x, reference))
            cross_entropy = -float(jnp.mean(mixture.log_prob(x, t_eps, sde)))
            print(f"| {name} | {label} | {nfe} | {distance:.4f} | {cross_entropy:.4f} | "
                  f"{seconds:.1f} |", flush=True)

        row("exact p_eps (noise floor)", mixture.sample(jax.random.key(12), num, t=t_eps,
                                                        sde=sde), 0, 0.0)
        for label, sampler in samplers().items():
            fn = jax.jit(lambda key, sampler=sampler, sde=sde, score_fn=score_fn:
                         sampler(key, sde, score_fn, (num, 2)))
            start = time.time()
            x, nfe = jax.block_until_ready(fn(jax.random.key(0)))
            row(label, x, int(nfe), time.time() - start)


def order_table(num: int) -> None:
    print(f"\n## Convergence: RMS error vs the ODE at rtol = atol = 1e-10 (2-D ring, VP, {num} "
          "samples, float64); observed order in brackets\n")
    steps = (25, 50, 100, 200)
    print("| solver | " + " | ".join(f"{n} steps" for n in steps) + " |")
    print("|--------|" + "|".join("---" for _ in steps) + "|")
    with jax.enable_x64(True):
        sde = sde_lib.VPSDE()
        mixture = GaussianMixture.ring()
        score_fn = mixture.score_fn(sde)
        key = jax.random.key(3)
        reference, _ = sampling.ode_sample(key, sde, score_fn, (num, 2), rtol=1e-10, atol=1e-10,
                                           eps=EPS)
        p = functools.partial
        solvers = {"ddim": p(sampling.ddim_sample),
                   "dpm_solver++ 2M": p(sampling.dpm_solver_sample, order=2),
                   "dpm_solver++ 3M": p(sampling.dpm_solver_sample, order=3),
                   "edm heun": p(sampling.edm_sample, denoise=False)}
        for label, solver in solvers.items():
            errors = []
            for n in steps:
                x, _ = solver(key, sde, score_fn, (num, 2), steps=n, eps=EPS)
                errors.append(float(jnp.sqrt(jnp.mean((x - reference) ** 2))))
            orders = [""] + [f" ({o:.2f})" for o in -np.diff(np.log2(errors))]
            cells = [f"{e:.2e}{o}" for e, o in zip(errors, orders, strict=True)]
            print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", default="likelihood,samplers,orders")
    parser.add_argument("--sdes", default="vpsde,subvpsde,vesde")
    parser.add_argument("--num_samples", type=int, default=10_000)
    parser.add_argument("--likelihood_points", type=int, default=500)
    args = parser.parse_args()
    tables = args.tables.split(",")
    sdes = args.sdes.split(",")
    print(f"{jax.device_count()} x {jax.devices()[0].platform}, {os.cpu_count()} CPU cores")
    if "likelihood" in tables:
        likelihood_table(sdes, args.likelihood_points)
    if "samplers" in tables:
        sampler_table(sdes, args.num_samples)
    if "orders" in tables:
        order_table(1000)


if __name__ == "__main__":
    main()
