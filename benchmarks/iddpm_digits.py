"""Improved DDPM on the embedded digits: the variational bound, the ODE's bits/dim and the FID of
respaced DDPM sampling, for L_simple with Sigma = beta and beta~, L_hybrid and L_vlb.

The three runs train the default digits U-Net for the same 1,200 steps with the same optimiser
on the VP SDE's 1,000-level DDPM chain (experiments/digits.py :ddpm, :hybrid, :vlb); only the
loss and the variance differ (the L_simple model is evaluated with both fixed variances). Train
them (3-5 minutes each on 2 CPU cores), then measure:

    for v in ddpm hybrid vlb; do
      python scripts/run.py --config experiments/digits.py:$v --workdir runs/iddpm/$v \
          --config.training.snapshot_sampling=False
    done
    python benchmarks/iddpm_digits.py --runs runs/iddpm

For each model, from its EMA parameters:
1. vlb_bpd: DDPM's bound on the 300 eval digits in bits/dim of the 17-level data (prior term,
   the 999 KL terms, the discretized decoder; `evaluate.eval_variational_bound`).
2. Bits/dim through the probability-flow ODE (the digits' protocol: uniform dequantization,
   Hutchinson divergence, rtol 1e-5; the L_simple model's is its rows' shared value).
3. FID of `--fid_samples` samples of the DDPM sampler on 25, 50 and 100 evenly respaced levels
   and on all 1,000, against the 1,497 training digits (needs the converted Inception weights,
   docs/likelihood_and_fid.md). The Inception network at 299 x 299 dominates the time.

Records are appended to <runs>/iddpm_digits.jsonl as they are measured; what the file holds is
not measured again (stop and resume, or `--fid_steps 25`); `--table` prints the table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compare_digits import _load, _record, _settings, eval_config, fid, run_rows  # noqa: E402

from diffusion import evaluate, experiment  # noqa: E402
from diffusion.parallel import data_mesh  # noqa: E402
from diffusion.train_state import restore_latest  # noqa: E402

# row -> (label, run / config variant, Sigma of the DDPM sampler: None = the learned one)
ROWS = {"beta": ("L_simple, Sigma = beta", "ddpm", "beta"),
        "beta_tilde": ("L_simple, Sigma = beta~", "ddpm", "beta_tilde"),
        "hybrid": ("L_hybrid, learned Sigma", "hybrid", None),
        "vlb": ("L_vlb, learned Sigma", "vlb", None)}
STEPS = (25, 50, 100, 1000)


def measure(args, rows, path: str) -> None:
    mesh = data_mesh()
    done = {(r["model"], r["what"], r.get("steps")) for r in _load(path)}
    extractor = None
    for row in rows:
        _, run, variance = ROWS[row]
        workdir = os.path.join(args.runs, run)
        config = eval_config(run, args.runs)
        config.sampling.variance = variance or "beta"
        exp = experiment.build(config)
        params = restore_latest(exp, workdir, mesh).ema_params
        if (run, "vlb", None) not in done:
            t0 = time.time()
            bound = evaluate.eval_variational_bound(exp, params, mesh)
            _record(path, model=run, what="vlb", seconds=round(time.time() - t0), **bound)
            done.add((run, "vlb", None))
        if (run, "bpd", None) not in done and not args.no_bpd:
            _record(path, model=run, what="bpd", **evaluate.eval_likelihood(exp, params, mesh))
            done.add((run, "bpd", None))
        for steps in (int(s) for s in args.fid_steps.split(",") if s):
            if (row, "fid", steps) in done:
                continue
            if extractor is None:
                extractor = evaluate.make_inception_extractor(exp.eval, mesh)
            t0 = time.time()
            settings = _settings(config, "ddpm", 0 if steps == config.sde.N else steps)
            value, nfe = fid(exp, params, mesh, workdir, extractor, settings, args.fid_samples)
            _record(path, model=row, what="fid", steps=steps, fid=value, nfe=nfe,
                    samples=args.fid_samples, seconds=round(time.time() - t0))


def table(path: str, rows) -> None:
    get = {(r["model"], r["what"], r.get("steps")): r for r in _load(path)}
    samples = sorted({r["samples"] for (_, what, _), r in get.items() if what == "fid"})
    print(f"\nDigits, 1,200 steps each; vlb_bpd and ODE bits/dim of the 300 eval digits; FID of "
          f"{', '.join(map(str, samples)) or '-'} DDPM samples (evenly respaced levels):\n")
    print("| model | vlb_bpd | ODE bpd | " + " | ".join(f"FID {s}" for s in STEPS) + " |")
    print("|---|---|---|" + "---|" * len(STEPS))
    for row in rows:
        label, run, variance = ROWS[row]
        v, b = get.get((run, "vlb", None)), get.get((run, "bpd", None))
        bound = "-"
        if v:
            bound = f"{v['vlb_bpd_' + variance] if variance else v['vlb_bpd']:.3f}"
        cells = [bound, f"{b['bpd']:.3f}" if b else "-"]
        for s in STEPS:
            r = get.get((row, "fid", s))
            cells.append(f"{r['fid']:.2f}" if r else "-")
        print(f"| {label} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="runs/iddpm", help="folder of the three workdirs")
    parser.add_argument("--rows", default=",".join(ROWS), help="subset of " + str(list(ROWS)))
    parser.add_argument("--fid_samples", type=int, default=2000)
    parser.add_argument("--fid_steps", default=",".join(map(str, STEPS)),
                        help="FID columns to measure ('' for none)")
    parser.add_argument("--no_bpd", action="store_true", help="skip the ODE likelihood")
    parser.add_argument("--table", action="store_true", help="only print the table")
    run_rows(parser.parse_args(), ROWS, "iddpm_digits.jsonl", measure, table)


if __name__ == "__main__":
    main()
