"""Parameters and forward FLOPs of the transformer presets (diffusion/models/dit.py, uvit.py)
against the papers' numbers: nothing is materialised, so every preset runs on a laptop CPU.

    python benchmarks/transformer_sizes.py                          # every preset (~15 s)
    python benchmarks/transformer_sizes.py --presets DiT-XL/2,U-ViT-S/2
    python benchmarks/transformer_sizes.py --presets DiT-B,U-ViT-S  # prefixes: a size's rows

Parameters are counted from `jax.eval_shape` of the network's init (shapes only); FLOPs are
XLA's count for the forward pass of one image, `jax.jit(apply).lower(...).cost_analysis()` on
abstract parameters and inputs (`jax.ShapeDtypeStruct`), the estimate on the HLO before
compilation: no buffer is allocated and nothing is compiled. XLA counts a multiply-add as 2
flops (plus about one per element of each elementwise op: softmax, GELU, LayerNorm, ...); the
papers' "Gflops" count multiply-adds, so the tables give both, XLA's GFLOP and GMAC = XLA's
flops / 2 / 1e9. GMAC thus also holds half the elementwise flops and reads a little above a pure
multiply-add count (DiT-XL/2: 118.94 against the paper's 118.6, +0.3%). "lower s" is the wall
time of the shape evaluation and the lowering (all 18 presets: 13 s on 2 shared CPU cores).

1. DiT, every preset "DiT-{S,B,L,XL}/{2,4,8}" at the paper's setting: ImageNet 256x256 through
   Stable Diffusion's autoencoder, so x is (1, 32, 32, 4), 1000 classes (+ the null label),
   learned sigma. "train.py count" is what DiT's own train.py prints: it also counts the frozen
   2-D sin-cos position table, (32/p)^2 x hidden_size (DiT-XL/2: 675,129,632). "paper M" is the
   paper's Table 4 in millions, one number per size (the /4 and /8 models differ from the /2 by
   < 0.2%). "paper Gflops": DiT-XL/2 118.6 (Table 4; the facebookresearch/DiT README rounds it
   to 119); the /4 rows are Table 1's column "Gflops (I=32, p=4)" (one decimal: 1.4, 5.6, 19.7,
   29.1), read from a machine transcription of the paper, not checked against the PDF. The
   other rows are "-": Table 4 lists them, but the only copies found were third-party
   transcriptions that disagree with each other, so they are left out rather than guessed.
2. U-ViT, every preset at its use in the paper (tests/test_transformers.py, UVIT_USES: image
   side, channels, classes, and Table 1's parameters in millions): CIFAR-10 32x32x3 (S/2,
   S-Deep/2), CelebA 64x64x3 (S/4), ImageNet 64x64x3 with 1000 classes (M/4, L/4), ImageNet
   256x256 latents 32x32x4 with 1000 classes (H/2).

FLOPs and parameter counts do not depend on the machine (nor on the backend's kernels: this is
the HLO before any backend pass).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from diffusion.models import dit, uvit  # noqa: E402
from tests.test_transformers import DIT_PAPER_MILLIONS, UVIT_USES  # noqa: E402

# The paper's forward Gflops (multiply-adds) per image at 256x256 (32x32x4 latents), where
# found (module docstring): Table 4 for DiT-XL/2, Table 1 (I=32, p=4) for the /4 models.
DIT_PAPER_GFLOPS = {"DiT-XL/2": "118.6", "DiT-S/4": "1.4", "DiT-B/4": "5.6",
                    "DiT-L/4": "19.7", "DiT-XL/4": "29.1"}
DIT_INPUT = (1, 32, 32, 4)
DIT_CLASSES = 1000


def measure(net, x_shape: tuple[int, ...], classes: int | None) -> dict:
    """Trainable parameters and XLA's forward flops of `net` on one abstract input."""
    t0 = time.perf_counter()
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    t = jax.ShapeDtypeStruct(x_shape[:1], jnp.float32)
    y = jax.ShapeDtypeStruct(x_shape[:1], jnp.int32) if classes else None
    variables = jax.eval_shape(lambda k, x, t, y: net.init(k, x, t, y=y, train=False),
                               jax.random.key(0), x, t, y)
    params = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables["params"]))
    lowered = jax.jit(lambda v, x, t, y: net.apply(v, x, t, y=y, train=False)).lower(
        variables, x, t, y)
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return dict(params=params, flops=float(cost["flops"]), seconds=time.perf_counter() - t0)


def selected(names, filters: list[str]) -> list[str]:
    """The names equal to, or starting with, one of `filters` (all if none)."""
    return [n for n in names if not filters or any(n.startswith(f) for f in filters)]


def dit_table(names: list[str]) -> None:
    print(f"\nDiT at the paper's setting: x {DIT_INPUT} (ImageNet 256x256 latents), "
          f"{DIT_CLASSES} classes, learned sigma; forward pass of one image.\n")
    print(f"| {'preset':<9} | {'params':>11} | {'train.py count':>14} | {'paper M':>7} | "
          f"{'XLA GFLOP':>9} | {'GMAC':>7} | {'paper Gflops':>12} | {'lower s':>7} |")
    print(f"|{'-' * 11}|{'-' * 13}|{'-' * 16}|{'-' * 9}|{'-' * 11}|{'-' * 9}|{'-' * 14}|"
          f"{'-' * 9}|", flush=True)
    for name in names:
        cfg = dit.PRESETS[name]
        net = dit.DiT(**cfg, num_classes=DIT_CLASSES, learn_sigma=True)
        r = measure(net, DIT_INPUT, DIT_CLASSES)
        pos = (DIT_INPUT[1] // cfg["patch_size"]) ** 2 * cfg["hidden_size"]
        size = name.split("-")[1].split("/")[0]
        print(f"| {name:<9} | {r['params']:>11,} | {r['params'] + pos:>14,} | "
              f"{DIT_PAPER_MILLIONS[size]:>7} | {r['flops'] / 1e9:9.2f} | "
              f"{r['flops'] / 2e9:7.2f} | {DIT_PAPER_GFLOPS.get(name, '-'):>12} | "
              f"{r['seconds']:7.1f} |", flush=True)


def uvit_table(names: list[str]) -> None:
    print("\nU-ViT at each preset's use in the paper (tests/test_transformers.py, UVIT_USES); "
          "forward pass of one image.\n")
    print(f"| {'preset':<14} | {'input':<8} | {'classes':>7} | {'params':>11} | {'paper M':>7} | "
          f"{'XLA GFLOP':>9} | {'GMAC':>7} | {'lower s':>7} |")
    print(f"|{'-' * 16}|{'-' * 10}|{'-' * 9}|{'-' * 13}|{'-' * 9}|{'-' * 11}|{'-' * 9}|"
          f"{'-' * 9}|", flush=True)
    for name in names:
        side, channels, classes, millions = UVIT_USES[name]
        net = uvit.UViT(**uvit.PRESETS[name], num_classes=classes)
        r = measure(net, (1, side, side, channels), classes)
        print(f"| {name:<14} | {f'{side}x{side}x{channels}':<8} | {classes or '-':>7} | "
              f"{r['params']:>11,} | {millions:>7} | {r['flops'] / 1e9:9.2f} | "
              f"{r['flops'] / 2e9:7.2f} | {r['seconds']:7.1f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="",
                        help="comma-separated preset names or prefixes (e.g. DiT-XL/2,U-ViT-S); "
                             f"default all: {list(dit.PRESETS) + list(uvit.PRESETS)}")
    args = parser.parse_args()
    filters = [f.strip() for f in args.presets.split(",") if f.strip()]
    dit_names = selected(dit.PRESETS, filters)
    uvit_names = selected(uvit.PRESETS, filters)
    if not dit_names and not uvit_names:
        parser.error(f"--presets {args.presets!r} matches no preset; the presets are "
                     f"{list(dit.PRESETS) + list(uvit.PRESETS)}")
    t0 = time.perf_counter()
    if dit_names:
        dit_table(dit_names)
    if uvit_names:
        uvit_table(uvit_names)
    print(f"\n{len(dit_names) + len(uvit_names)} presets in {time.perf_counter() - t0:.0f} s "
          f"(jax {jax.__version__}, {jax.devices()[0].platform}).")


if __name__ == "__main__":
    main()
