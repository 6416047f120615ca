"""VP-epsilon, VP-v, EDM and rectified flow on the embedded digits: FID against NFE, and bits/dim.

The four runs train the same U-Net for the same steps with the same optimiser (experiments/
digits.py and its :v, :edm and :flow variants); only the process, the parameterisation and the
loss differ. Train them (about 5-10 minutes each on 2 CPU cores), then measure:

    for v in eps v edm flow; do
      python scripts/run.py --config experiments/digits.py$([ $v = eps ] || echo :$v) \
          --workdir runs/compare/$v --config.training.snapshot_sampling=False
    done
    python benchmarks/compare_digits.py --runs runs/compare

For each model, from its EMA parameters:
1. Solver error. The deterministic samplers (DDIM, DPM-Solver++ 2M, EDM's Heun) all solve the
   model's probability-flow ODE from the same prior draw, so their distance to a tight adaptive
   solve (rtol = atol = 1e-6) from the same draw is their discretisation error: RMS over
   `--probe` samples, in data units ([-1, 1]), at 10, 20 and 50 steps. The best sampler at each
   step count is the one with the smallest error.
2. FID of `--fid_samples` samples (2,000: the digits' protocol, against the 1,497 training
   digits; needs the converted Inception weights, docs/likelihood_and_fid.md) for that sampler at
   10, 20 and 50 steps, and for the adaptive ODE solver at the configs' tolerance (1e-5).
3. Bits/dim of the 300 eval digits through the probability-flow ODE (the configs' protocol:
   uniform dequantization, Hutchinson divergence, rtol 1e-5).

Each result is appended to <runs>/compare_digits.jsonl as it is measured, and what the file
already holds is not measured again, so the script can be stopped and resumed, or run column by
column (`--fid_steps 20,ode`); `--table` prints the tables from the file. The Inception network
at 299 x 299 dominates the time: about 5 images/s on 2 cores, 7 minutes per FID of 2,000
samples, 16 FIDs in all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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


def eval_config(variant: str | None, runs: str, batch_size: int = 250):
    """experiments/digits.py:<variant> set up for measuring: the FID reference statistics shared
    under <runs>/fid_stats, bits/dim over all 300 eval digits, large sampling batches."""
    config = digits.get_config(variant)
    config.eval.fid_stats_dir = os.path.join(runs, "fid_stats")
    config.eval.bpd_num_batches = 0
    config.sampling.batch_size = batch_size
    return config


def progress_records(workdir: str) -> list[dict]:
    """The training progress records (those with a loss) of a run's train.jsonl; [] if none."""
    path = os.path.join(workdir, "train.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def _settings(config, method: str, steps: int = 0, **overrides):
    """The config's sampling settings with another sampler (and step count)."""
    s = config.sampling.copy_and_resolve_references()
    s.method, s.steps = method, steps
    s.update(overrides)
    return experiment.sampling_settings(s)


def _draw(exp, params, mesh, settings, n: int, key) -> tuple[np.ndarray, int]:
    """n samples (data units) of `settings` from `key`, and the NFE."""
    settings = dataclasses.replace(settings, num_samples=n,
                                   batch_size=min(n, settings.batch_size))
    run = dataclasses.replace(exp, sampling=settings)
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


def _record(path: str, **record) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(record, flush=True)


def _load(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def measure(args, names, path: str) -> None:
    """Runs what `args` asks for that `path` does not hold yet, appending one record each."""
    mesh = data_mesh()
    done = {(r["model"], r["what"], r.get("steps")) for r in _load(path)}
    extractor = None
    for name in names:
        label, variant = MODELS[name]
        workdir = os.path.join(args.runs, name)
        config = eval_config(variant, args.runs, batch_size=256)
        exp = experiment.build(config)
        params = restore_latest(exp, workdir, mesh).ema_params
        if (name, "solver", None) not in done:
            t0 = time.time()
            errors = solver_errors(exp, params, mesh, config, args.probe)
            _record(path, model=name, what="solver", probe=args.probe,
                    seconds=round(time.time() - t0),
                    errors={f"{m} {s}": e for (m, s), (e, _) in errors.items()},
                    nfe={f"{m} {s}": n for (m, s), (_, n) in errors.items()})
        if (name, "bpd", None) not in done and not args.no_bpd:
            _record(path, model=name, what="bpd", **evaluate.eval_likelihood(exp, params, mesh))
        errors = next(r for r in _load(path) if r["model"] == name and r["what"] == "solver")
        for steps in args.fid_steps.split(","):
            steps = None if steps == "ode" else int(steps)
            if (name, "fid", steps) in done:
                continue
            if extractor is None:
                extractor = evaluate.make_inception_extractor(exp.eval, mesh)
            method = "ode" if steps is None else min(
                SAMPLERS, key=lambda m: errors["errors"][f"{m} {steps}"])
            t0 = time.time()
            value, nfe = fid(exp, params, mesh, workdir, extractor,
                             _settings(config, method, steps or 0), args.fid_samples)
            _record(path, model=name, what="fid", steps=steps, sampler=method, fid=value,
                    nfe=nfe, samples=args.fid_samples, seconds=round(time.time() - t0))


def tables(path: str, names) -> None:
    records = _load(path)
    get = {(r["model"], r["what"], r.get("steps")): r for r in records}
    solver = [n for n in names if (n, "solver", None) in get]
    if solver:
        probe = get[solver[0], "solver", None]["probe"]
        print(f"\nRMS distance to the adaptive solve (rtol 1e-6) from the same {probe} prior "
              f"draws, data units [-1, 1] (NFE: DDIM and DPM-Solver++ steps + 1, EDM 2 steps):\n")
        print("| model | " + " | ".join(f"{m} {s}" for m in SAMPLERS for s in STEPS) + " |")
        print("|---|" + "---|" * (len(SAMPLERS) * len(STEPS)))
        for n in solver:
            e = get[n, "solver", None]["errors"]
            print(f"| {MODELS[n][0]} | " + " | ".join(f"{e[f'{m} {s}']:.4f}" for m in SAMPLERS
                                                       for s in STEPS) + " |")
    samples = {r["samples"] for r in records if r["what"] == "fid"}
    print(f"\nFID ({', '.join(map(str, sorted(samples))) or '-'} samples; the sampler with the "
          f"smallest solver error at that step count, NFE) and bits/dim of the 300 eval digits:\n")
    print("| model | 10 steps | 20 steps | 50 steps | adaptive ODE | bits/dim |")
    print("|---|---|---|---|---|---|")
    for n in names:
        cells = []
        for s in (*STEPS, None):
            r = get.get((n, "fid", s))
            cells.append(f"{r['fid']:.2f} ({r['sampler']}, {r['nfe']})" if r else "-")
        b = get.get((n, "bpd", None))
        cells.append(f"{b['bpd']:.3f} +- {b['bpd_std_err']:.3f}" if b else "-")
        print(f"| {MODELS[n][0]} | " + " | ".join(cells) + " |")


def selected(listed: str, known: dict, runs: str, workdir=lambda name: name) -> list[str]:
    """The comma-separated names of `listed`, each a key of `known` whose run
    (<runs>/<workdir(name)>) has checkpoints; SystemExit saying what is wrong otherwise."""
    names = [m for m in listed.split(",") if m]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise SystemExit(f"unknown names {unknown}: choose from {list(known)}")
    missing = sorted({workdir(n) for n in names
                      if not os.path.isdir(os.path.join(runs, workdir(n), "checkpoints"))})
    if missing:
        raise SystemExit(f"no trained run for {missing} under {runs}: train them first "
                         f"(see this script's docstring).")
    return names


def run_rows(args, rows: dict, filename: str, measure, table) -> None:
    """The row benchmarks' main: rows `args.rows` (each (label, run, ...), its run the workdir
    <args.runs>/<run>) measured into <args.runs>/<filename> unless `args.table`, then the
    table printed."""
    names = selected(args.rows, rows, args.runs, lambda row: rows[row][1])
    path = os.path.join(args.runs, filename)
    if not args.table:
        measure(args, names, path)
    table(path, names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="runs/compare", help="folder of the four workdirs")
    parser.add_argument("--models", default=",".join(MODELS), help="subset of " + str(list(MODELS)))
    parser.add_argument("--fid_samples", type=int, default=2000)
    parser.add_argument("--fid_steps", default="10,20,50,ode",
                        help="FID columns to measure ('' for none)")
    parser.add_argument("--probe", type=int, default=64, help="samples for the solver error")
    parser.add_argument("--no_bpd", action="store_true", help="skip the likelihood")
    parser.add_argument("--table", action="store_true", help="only print the tables")
    args = parser.parse_args()
    names = selected(args.models, MODELS, args.runs)
    path = os.path.join(args.runs, "compare_digits.jsonl")
    if not args.table:
        measure(args, names, path)
    tables(path, names)


if __name__ == "__main__":
    main()
