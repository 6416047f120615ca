"""Guided sampling on the embedded digits: how often samples are the class asked for, and FID.

Needs four trained runs (docs/controllable.md has the commands):

    python scripts/run.py --config experiments/digits_cond.py --workdir runs/digits_cond
    python scripts/run.py --config experiments/digits.py --workdir runs/digits
    python scripts/run.py --config experiments/digits_classifier.py --workdir runs/digits_clf
    python scripts/run.py --config experiments/digits_classifier.py:clean \
        --workdir runs/digits_clf_clean

then

    python benchmarks/guidance_digits.py --runs runs

For classifier-free guidance (the class-conditional model) at each weight w, and classifier
guidance (the unconditional model and the noise-conditional classifier) at each scale, it draws
`--n` samples with the labels 0..9 in turn (DPM-Solver++ 2M, 20 steps) and reports the fraction
that the clean classifier (trained on the digits themselves; its eval accuracy is printed) labels
as the class asked for, and the FID of `--fid_samples` samples against the 1,497 training digits
(the digits experiment's FID protocol, `--mode eval`). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion import evaluate, generate, train  # noqa: E402
from diffusion.parallel import data_mesh  # noqa: E402
from diffusion.train_state import restore_latest  # noqa: E402
from experiments import digits, digits_classifier, digits_cond  # noqa: E402


def _guided(config, guidance: str, weight: float, classifier_workdir: str = ""):
    config.sampling.update(method="dpm_solver", steps=20, labels="all", guidance=guidance,
                           guidance_weight=weight, classifier_workdir=classifier_workdir)
    config.eval.update(enable_bpd=False, fid_num_samples=2000)
    return config


def _rate(config, workdir: str, judge, n: int, mesh) -> tuple[float, float]:
    """Fraction of n samples the judge labels as asked, and the sampling time."""
    exp = train.build(config, shape_only_data=True)
    params = restore_latest(exp, workdir, mesh).ema_params
    t0 = time.time()
    x, _ = generate.draw_samples(exp, params, mesh, n, exp.key("sample"))
    seconds = time.time() - t0
    labels = generate.sample_labels(exp, n, exp.key("sample"))
    net, judge_params = judge
    predict = jax.jit(lambda p, x: net.apply({"params": p}, x, np.zeros(x.shape[0], np.float32)))
    predicted = np.concatenate([np.argmax(np.asarray(predict(judge_params, x[i:i + 500])), -1)
                                for i in range(0, n, 500)])
    return float(np.mean(predicted == labels)), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="runs", help="folder of the four runs' workdirs")
    parser.add_argument("--n", type=int, default=1000, help="samples per rate")
    parser.add_argument("--weights", default="0,1,3", help="CFG weights w")
    parser.add_argument("--scales", default="1,4", help="classifier-guidance scales")
    parser.add_argument("--no_fid", action="store_true", help="skip the FID column")
    args = parser.parse_args()
    run = {name: os.path.join(args.runs, name) for name in
           ("digits_cond", "digits", "digits_clf", "digits_clf_clean")}
    mesh = data_mesh()
    judge = generate.load_classifier(run["digits_clf_clean"], mesh)
    accuracy = evaluate.classifier_accuracy(
        train.build(digits_classifier.get_config("clean")), judge[1])["accuracy_t0"]
    print(f"judge: the clean classifier, {100 * accuracy:.1f}% on the 300 eval digits")
    noisy = evaluate.classifier_accuracy(train.build(digits_classifier.get_config()),
                                         generate.load_classifier(run["digits_clf"], mesh)[1])
    print("noise-conditional classifier accuracy: " + ", ".join(
        f"{k[9:]} {100 * v:.1f}%" for k, v in noisy.items()))
    rows = []
    settings = [("cfg", float(w), digits_cond.get_config(), run["digits_cond"], "")
                for w in args.weights.split(",") if w]
    settings += [("classifier", float(s), digits.get_config(), run["digits"], run["digits_clf"])
                 for s in args.scales.split(",") if s]
    for guidance, weight, config, workdir, clf in settings:
        config = _guided(config, guidance, weight, clf)
        rate, seconds = _rate(config, workdir, judge, args.n, mesh)
        fid = "" if args.no_fid else f"{train.evaluate(config, workdir)['fid']:.2f}"
        name = f"CFG w = {weight:g}" if guidance == "cfg" else f"classifier, scale {weight:g}"
        rows.append((name, rate, fid, seconds))
        print(f"{name}: {100 * rate:.1f}% as asked, FID {fid or '-'} ({seconds:.1f} s for "
              f"{args.n} samples)", flush=True)
    print(f"\n| guidance | samples labelled as asked (n={args.n}) | FID (2,000 samples) |")
    print("|---|---|---|")
    for name, rate, fid, _ in rows:
        print(f"| {name} | {100 * rate:.1f}% | {fid or '-'} |")


if __name__ == "__main__":
    main()
