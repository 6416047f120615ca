"""Consistency models on the embedded digits: FID, NFE, training time and sampling speed of the
teacher (the default run) against consistency distillation (CD), consistency training (CT, iCT)
and CT started from the teacher (ECT), each sampled in 1 and 2 steps.

Train the four runs (the teacher first; 1,200 steps each, the default U-Net and optimiser):

    R=runs/cm
    python scripts/run.py --config experiments/digits.py --workdir $R/teacher
    python scripts/run.py --config experiments/digits.py:cd --workdir $R/cd \
        --config.training.teacher_workdir=$R/teacher
    python scripts/run.py --config experiments/digits.py:ct --workdir $R/ct
    python scripts/run.py --config experiments/digits.py:ct --workdir $R/ect \
        --config.training.init_workdir=$R/teacher
    python benchmarks/consistency_digits.py --runs runs/cm

For each row: FID of `--fid_samples` samples against the 1,497 training digits (the Inception
weights are needed, docs/likelihood_and_fid.md), the sampler's NFE, the training time of the run
(its train.jsonl: time per step x steps, on whatever else shared the machine) and the sampling
speed in images/s (a second, compiled draw of the FID's sample count). Records are appended to
<runs>/consistency_digits.jsonl; what it holds is not measured again; `--table` prints the table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compare_digits import (  # noqa: E402
    _draw,
    _load,
    _record,
    _settings,
    fid,
    progress_records,
    run_rows,
)

from diffusion import evaluate, experiment  # noqa: E402
from diffusion.parallel import data_mesh  # noqa: E402
from diffusion.train_state import restore_latest  # noqa: E402
from experiments import digits  # noqa: E402

# row -> (label, run, digits.py variant, sampler, its settings)
ROWS = {
    "teacher_dpm20": ("teacher, DPM-Solver++ 20 steps", "teacher", None, "dpm_solver",
                      {"steps": 20}),
    "teacher_ode": ("teacher, adaptive ODE (rtol 1e-5)", "teacher", None, "ode", {}),
    "cd_1": ("CD, 1 step", "cd", "cd", "consistency", {"times": "1.0"}),
    "cd_2": ("CD, 2 steps", "cd", "cd", "consistency", {"times": "1.0,0.45"}),
    "ct_1": ("CT (iCT), 1 step", "ct", "ct", "consistency", {"times": "1.0"}),
    "ct_2": ("CT (iCT), 2 steps", "ct", "ct", "consistency", {"times": "1.0,0.45"}),
    "ect_1": ("CT from the teacher (ECT), 1 step", "ect", "ct", "consistency", {"times": "1.0"}),
    "ect_2": ("CT from the teacher (ECT), 2 steps", "ect", "ct", "consistency",
              {"times": "1.0,0.45"}),
    # Optional (--rows): CD with the CIFAR-10 config's mu = 0 and a fine-tuning lr, trained by
    # adding --config.training.target_ema=0 --config.optim.lr=4e-4 into <runs>/cd_mu0.
    "cd_mu0_1": ("CD, mu 0, lr 4e-4, 1 step", "cd_mu0", "cd", "consistency", {"times": "1.0"}),
    "cd_mu0_2": ("CD, mu 0, lr 4e-4, 2 steps", "cd_mu0", "cd", "consistency",
                 {"times": "1.0,0.45"}),
}
DEFAULT_ROWS = [row for row in ROWS if not row.startswith("cd_mu0")]


def training_seconds(workdir: str) -> float | None:
    """Time per step x steps, from the run's train.jsonl progress records."""
    records = progress_records(workdir)
    if len(records) < 2:
        return None
    first, last = records[0], records[-1]
    return (last["time"] - first["time"]) / (last["step"] - first["step"]) * last["step"]


def measure(args, rows, path: str) -> None:
    mesh = data_mesh()
    done = {r["model"] for r in _load(path)}
    extractor = None
    for row in rows:
        if row in done:
            continue
        _, run, variant, method, options = ROWS[row]
        workdir = os.path.join(args.runs, run)
        config = digits.get_config(variant)
        if variant == "cd":
            config.training.teacher_workdir = os.path.join(args.runs, "teacher")
        config.eval.fid_stats_dir = os.path.join(args.runs, "fid_stats")
        config.sampling.batch_size = 250
        exp = experiment.build(config)
        params = restore_latest(exp, workdir, mesh).ema_params
        settings = _settings(config, method, options.get("steps", 0),
                             **{k: v for k, v in options.items() if k != "steps"})
        if extractor is None:
            extractor = evaluate.make_inception_extractor(exp.eval, mesh)
        value, nfe = fid(exp, params, mesh, workdir, extractor, settings, args.fid_samples)
        key = exp.key("speed")
        _draw(exp, params, mesh, settings, args.fid_samples, key)        # compiled
        t0 = time.time()
        _draw(exp, params, mesh, settings, args.fid_samples, key)
        speed = args.fid_samples / (time.time() - t0)
        _record(path, model=row, fid=value, nfe=nfe, samples=args.fid_samples,
                images_per_s=round(speed, 1), train_seconds=training_seconds(workdir))


def table(path: str, rows) -> None:
    get = {r["model"]: r for r in _load(path)}
    teacher = get.get("teacher_dpm20")
    print("\n| model | NFE | FID | training time | images/s (x teacher, DPM-Solver++ 20) |")
    print("|---|---|---|---|---|")
    for row in rows:
        r = get.get(row)
        if r is None:
            print(f"| {ROWS[row][0]} | - | - | - | - |")
            continue
        minutes = f"{r['train_seconds'] / 60:.1f} min" if r.get("train_seconds") else "-"
        ratio = f" ({r['images_per_s'] / teacher['images_per_s']:.1f}x)" if teacher else ""
        print(f"| {ROWS[row][0]} | {r['nfe']} | {r['fid']:.2f} | {minutes} | "
              f"{r['images_per_s']:.0f}{ratio} |")
    samples = sorted({r["samples"] for r in get.values()})
    print(f"\nFID of {', '.join(map(str, samples)) or '-'} samples against the 1,497 training "
          f"digits.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="runs/cm", help="folder of the four workdirs")
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                        help="subset of " + str(list(ROWS)))
    parser.add_argument("--fid_samples", type=int, default=2000)
    parser.add_argument("--table", action="store_true", help="only print the table")
    run_rows(parser.parse_args(), ROWS, "consistency_digits.jsonl", measure, table)


if __name__ == "__main__":
    main()
