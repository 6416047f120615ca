"""VP-epsilon, VP-v, EDM and rectified flow on the embedded digits: FID against NFE, and bits/dim.

The four runs train the same U-Net for the same steps with the same optimiser (experiments/
digits.py and its :v, :edm and :flow variants); only the process, the parameterisation and the
loss differ. Train them (about 5-10 minutes each on 2 CPU cores), then measure:

    for v in "" :v :edm :flow; do
      python scripts/run.py --config experiments/digits.py$v --workdir runs/compare/${v#:}
    done       # the first one's workdir is runs/compare/ (rename it runs/compare/eps)
    python benchmarks/compare_digits.py --runs runs/compare

For each model, from its EMA parameters:
1. Solver error. The deterministic samplers (DDIM, DPM-Solver++ 2M, EDM's Heun) all solve the
   model's probability-flow ODE from the same prior draw, so their distance to a tight adaptive
   solve (rtol = atol = 1e-6) from the same draw is their discretisation error: RMS over
   `--probe` samples, in data units ([-1, 1]), at 10, 20 and 50 steps. The best sampler at each
   step count is the one with the smallest error.
2. FID of `--fid_samples` samples (2,000: the digits' protocol, against the 1,497 training
   digits; needs the converted Inception weights, README "Sample quality") for that sampler at
   10, 20 and 50 steps, and for the adaptive ODE solver at the configs' tolerance (1e-5).
3. Bits/dim of the 300 eval digits through the probability-flow ODE (the configs' protocol:
   uniform dequantization, Hutchinson divergence, rtol 1e-5).

Prints three markdown tables. The Inception network at 299 x 299 dominates the time (about
3 minutes per FID on 2 cores; 16 FIDs in all).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion import evaluate, experiment, generate  # noqa: E402
from diffusion.parallel import data_mesh  # noqa: E402
from diffusion.train_state import restore_latest  # noqa: E402
from experiments import digits  # noqa: E402

MODELS = {"eps": ("VP, epsilon", None), "v": ("VP, v", "v"), "edm": ("EDM", "edm"),
          "flow": ("rectified flow", "flow")}
SAMPLERS = ("ddim", "dpm_solver", "edm")
STEPS = (10, 20, 50)


def _settings(config, method: str, steps: int = 0, **overrides):
    """The config's sampling settings with another sampler (and step count)."""
    s = config.sampling.copy_and_resolve_references()
    s.method, s.steps = method, steps
    s.update(overrides)
    return experiment.sampling_settings(s)


def _draw(exp, params, mesh, settings, n: int, key) -> tuple[np.ndarray, int]:
    """n samples (data units) of `settings` from `key`, and the NFE."""
    run = dataclasses.replace(exp, sampling=dataclasses.replace(settings, num_samples=n))
    return generate.draw_samples(run, params, mesh, n, key)


def solver_errors(exp, params, mesh, config, n: int) -> dict[tuple[str, int], tuple[float, int]]:
    """RMS distance of each (sampler, steps) to a tight adaptive solve from the same draws."""
    key = exp.key("solver_probe")
    reference, _ = _draw(exp, params, mesh, _settings(config, "ode", rtol=1e-6, atol=1e-6), n,
                         key)
    errors = {}
    for method in SAMPLERS:
        for steps in STEPS:
            x, nfe = _draw(exp, params, mesh, _settings(config, method, steps), n, key)
            errors[method, steps] = (float(np.sqrt(np.mean((x - reference) ** 2))), nfe)
    return errors


def fid(exp, params, mesh, workdir, extractor, settings, n: int) -> tuple[float, int]:
    run = dataclasses.replace(exp, sampling=settings,
                              eval=dataclasses.replace(exp.eval, fid_num_samples=n))
    out = evaluate.eval_sample_quality(run, params, mesh, workdir, extractor)
    return out["fid"], out["sampler_nfe"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="runs/compare", help="folder of the four workdirs")
    parser.add_argument("--models", default=",".join(MODELS), help="subset of " + str(list(MODELS)))
    parser.add_argument("--fid_samples", type=int, default=2000)
    parser.add_argument("--probe", type=int, default=256, help="samples for the solver error")
    parser.add_argument("--no_fid", action="store_true", help="solver errors and bits/dim only")
    args = parser.parse_args()
    mesh = data_mesh()
    names = [m for m in args.models.split(",") if m]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown models {unknown}: choose from {list(MODELS)}")
    missing = [n for n in names if not os.path.isdir(os.path.join(args.runs, n, "checkpoints"))]
    if missing:
        raise SystemExit(f"no trained run for {missing} under {args.runs}: train them first "
                         f"(see this script's docstring).")
    extractor = None
    errors, fids, bpds = {}, {}, {}
    for name in names:
        label, variant = MODELS[name]
        workdir = os.path.join(args.runs, name)
        config = digits.get_config(variant)
        config.eval.fid_stats_dir = os.path.join(args.runs, "fid_stats")   # shared reference
        config.eval.bpd_num_batches = 0                                     # all 300 eval digits
        config.sampling.batch_size = 256
        exp = experiment.build(config)
        params = restore_latest(exp, workdir, mesh).ema_params
        t0 = time.time()
        errors[name] = solver_errors(exp, params, mesh, config, args.probe)
        print(f"{label}: solver errors " + ", ".join(
            f"{m} {s}: {e:.4f}" for (m, s), (e, _) in errors[name].items())
            + f" ({time.time() - t0:.0f} s)", flush=True)
        bpds[name] = evaluate.eval_likelihood(exp, params, mesh)
        print(f"{label}: {bpds[name]}", flush=True)
        if args.no_fid:
            continue
        if extractor is None:
            extractor = evaluate.make_inception_extractor(exp.eval, mesh)
        for steps in STEPS:
            best = min(SAMPLERS, key=lambda m: errors[name][m, steps][0])
            fids[name, steps] = (best, *fid(exp, params, mesh, workdir, extractor,
                                            _settings(config, best, steps), args.fid_samples))
            print(f"{label}: FID {fids[name, steps]}", flush=True)
        fids[name, "ode"] = ("ode", *fid(exp, params, mesh, workdir, extractor,
                                         _settings(config, "ode"), args.fid_samples))
        print(f"{label}: FID {fids[name, 'ode']}", flush=True)

    print(f"\nRMS distance to the adaptive solve (rtol 1e-6) from the same {args.probe} prior "
          f"draws, data units [-1, 1]:\n")
    print("| model | " + " | ".join(f"{m} {s}" for m in SAMPLERS for s in STEPS) + " |")
    print("|---|" + "---|" * (len(SAMPLERS) * len(STEPS)))
    for name in names:
        print(f"| {MODELS[name][0]} | " + " | ".join(
            f"{errors[name][m, s][0]:.4f}" for m in SAMPLERS for s in STEPS) + " |")
    print("\n(NFE: DDIM and DPM-Solver++ = steps + 1 with the final denoising step; EDM = "
          "2 steps.)")
    if fids:
        print(f"\nFID of {args.fid_samples} samples (best sampler by solver error, NFE), and "
              f"bits/dim of the 300 eval digits:\n")
        print("| model | 10 steps | 20 steps | 50 steps | adaptive ODE | bits/dim |")
        print("|---|---|---|---|---|---|")
        for name in names:
            cells = [f"{fids[name, s][1]:.2f} ({fids[name, s][0]}, {fids[name, s][2]})"
                     for s in (*STEPS, "ode")]
            b = bpds[name]
            print(f"| {MODELS[name][0]} | " + " | ".join(cells)
                  + f" | {b['bpd']:.3f} +- {b['bpd_std_err']:.3f} |")
    else:
        print("\n| model | bits/dim | NFE |\n|---|---|---|")
        for name in names:
            b = bpds[name]
            print(f"| {MODELS[name][0]} | {b['bpd']:.3f} +- {b['bpd_std_err']:.3f} | "
                  f"{b['likelihood_nfe']} |")


if __name__ == "__main__":
    main()
