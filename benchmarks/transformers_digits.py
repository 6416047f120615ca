"""Transformers against the U-Net on the embedded digits: parameters, training speed, FID and
bits/dim of the default U-Net, a DiT (patch 2) and a U-ViT (patch 2) of similar size, trained
for the same 1,200 steps with the same optimiser, SDE and loss (experiments/digits.py, :dit,
:uvit). Train the three runs (4-8 minutes each on 2 CPU cores), then measure:

    R=runs/transformers
    python scripts/run.py --config experiments/digits.py --workdir $R/unet
    python scripts/run.py --config experiments/digits.py:dit --workdir $R/dit
    python scripts/run.py --config experiments/digits.py:uvit --workdir $R/uvit
    python benchmarks/transformers_digits.py --runs $R

For each network:
1. params: the network's parameter count.
2. train steps/s: the jitted train step (loss, gradient, Adam, EMA) at the run's batch of 128
   on one fixed batch, timed in `--rounds` interleaved windows of `--steps` steps (so that other
   load on the machine falls on all three alike); the median window. Also the final training
   loss of the run (its train.jsonl).
3. FID of `--fid_samples` DPM-Solver++ samples (20 steps) against the 1,497 training digits
   (needs the converted Inception weights, docs/likelihood_and_fid.md).
4. bits/dim of the 300 eval digits through the probability-flow ODE (the digits' protocol).

Records are appended to <runs>/transformers_digits.jsonl; what it holds is not measured again;
`--table` prints the table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compare_digits import (  # noqa: E402
    _load,
    _record,
    _settings,
    eval_config,
    fid,
    progress_records,
    run_rows,
)
from train_throughput import _jitted_step  # noqa: E402

from diffusion import evaluate, experiment, train  # noqa: E402
from diffusion.parallel import data_mesh  # noqa: E402
from diffusion.train_state import restore_latest  # noqa: E402
from experiments import digits  # noqa: E402

# row -> (label, run, digits.py variant)
ROWS = {"unet": ("U-Net (DDPM's, the default)", "unet", None),
        "dit": ("DiT, patch 2, 4 blocks of 96", "dit", "dit"),
        "uvit": ("U-ViT, patch 2, 7 blocks of 96", "uvit", "uvit"),
        # Optional (--rows): the DiT trained twice as long, adding
        # --config.training.n_iters=2400 into <runs>/dit_2400.
        "dit_2400": ("DiT, 2,400 steps", "dit_2400", "dit")}
DEFAULT_ROWS = ["unet", "dit", "uvit"]


def step_rates(rows, steps: int, rounds: int) -> dict[str, float]:
    """Median steps/s of each row's jitted train step over `rounds` interleaved windows."""
    jitted = {}
    for row in rows:
        step_fn, state, batch, key, _ = _jitted_step(digits.get_config(ROWS[row][2]))
        for _ in range(3):                                   # compile and warm up
            state, metrics = step_fn(state, batch, key)
        jax.block_until_ready(metrics)
        jitted[row] = [step_fn, state, batch, key]
    rates = {row: [] for row in rows}
    for _ in range(rounds):
        for row in rows:
            step_fn, state, batch, key = jitted[row]
            t0 = time.perf_counter()
            for _ in range(steps):
                state, metrics = step_fn(state, batch, key)
            jax.block_until_ready(metrics)
            rates[row].append(steps / (time.perf_counter() - t0))
            jitted[row][1] = state
    return {row: statistics.median(r) for row, r in rates.items()}


def final_loss(workdir: str) -> float | None:
    records = progress_records(workdir)
    return records[-1]["loss"] if records else None


def measure(args, rows, path: str) -> None:
    mesh = data_mesh()
    done = {(r["model"], r["what"]) for r in _load(path)}
    todo = [row for row in rows if (row, "speed") not in done]
    if todo:
        for row, rate in step_rates(todo, args.steps, args.rounds).items():
            _record(path, model=row, what="speed", steps_per_s=rate, window=args.steps,
                    rounds=args.rounds, device=jax.devices()[0].device_kind)
    extractor = None
    for row in rows:
        _, run, variant = ROWS[row]
        workdir = os.path.join(args.runs, run)
        config = eval_config(variant, args.runs)
        exp = experiment.build(config)
        state = restore_latest(exp, workdir, mesh)
        if (row, "params") not in done:
            _record(path, model=row, what="params", params=train.count_params(state.params),
                    steps=int(state.step), final_loss=final_loss(workdir))
        if (row, "bpd") not in done and not args.no_bpd:
            _record(path, model=row, what="bpd",
                    **evaluate.eval_likelihood(exp, state.ema_params, mesh))
        if (row, "fid") not in done and args.fid_samples:
            if extractor is None:
                extractor = evaluate.make_inception_extractor(exp.eval, mesh)
            t0 = time.time()
            value, nfe = fid(exp, state.ema_params, mesh, workdir, extractor,
                             _settings(config, "dpm_solver", 20), args.fid_samples)
            _record(path, model=row, what="fid", fid=value, nfe=nfe, samples=args.fid_samples,
                    seconds=round(time.time() - t0))


def table(path: str, rows) -> None:
    get = {(r["model"], r["what"]): r for r in _load(path)}
    samples = sorted({r["samples"] for (_, what), r in get.items() if what == "fid"})
    print(f"\nDigits, 1,200 training steps unless stated (batch 128, Adam lr 2e-3, VP SDE, "
          f"epsilon DSM); train step rate at batch 128; FID of "
          f"{', '.join(map(str, samples)) or '-'} DPM-Solver++ samples (20 steps, 21 NFE); "
          f"ODE bits/dim of the 300 eval digits:\n")
    print("| network | params | train steps/s | final loss | FID (DPM-Solver++ 20) | bits/dim |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        p, s = get.get((row, "params")), get.get((row, "speed"))
        f, b = get.get((row, "fid")), get.get((row, "bpd"))
        cells = [f"{p['params']:,}" if p else "-", f"{s['steps_per_s']:.2f}" if s else "-",
                 f"{p['final_loss']:.4f}" if p and p["final_loss"] else "-",
                 f"{f['fid']:.2f}" if f else "-",
                 f"{b['bpd']:.3f} +- {b['bpd_std_err']:.3f}" if b else "-"]
        print(f"| {ROWS[row][0]} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="runs/transformers", help="folder of the workdirs")
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                        help="subset of " + str(list(ROWS)))
    parser.add_argument("--fid_samples", type=int, default=2000, help="0: no FID")
    parser.add_argument("--steps", type=int, default=50, help="train steps per timed window")
    parser.add_argument("--rounds", type=int, default=5, help="timed windows per network")
    parser.add_argument("--no_bpd", action="store_true", help="skip the ODE likelihood")
    parser.add_argument("--table", action="store_true", help="only print the table")
    run_rows(parser.parse_args(), ROWS, "transformers_digits.jsonl", measure, table)


if __name__ == "__main__":
    main()
