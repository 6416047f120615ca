"""Prepares CIFAR-10 or CelebA for the paper configs from the original archives, without TensorFlow.

    python scripts/prepare_data.py cifar10 --archive cifar-10-python.tar.gz
    python scripts/prepare_data.py celeb_a --archive img_align_celeba.zip \
        --partition list_eval_partition.txt --attributes list_attr_celeba.txt \
        --landmarks list_landmarks_align_celeba.txt --identity identity_CelebA.txt

Writes the tfds dataset (array_record files, the layout `tfds build NAME` writes) into
--data_dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets), where the configs read it:
    python scripts/run.py --config experiments/vp_cifar.py --workdir runs/vp_cifar \
        --config.data.data_dir=<data_dir>
CIFAR-10's archive is cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html;
CelebA's files are img_align_celeba.zip, and list_eval_partition.txt (Eval/),
list_attr_celeba.txt, list_landmarks_align_celeba.txt and identity_CelebA.txt (Anno/) from
https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion.data import archives  # noqa: E402


def default_data_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=archives.DATASETS)
    parser.add_argument("--archive", required=True,
                        help="cifar-10-python.tar.gz (cifar10) or img_align_celeba.zip (celeb_a)")
    parser.add_argument("--data_dir", default=default_data_dir())
    for name in ("partition", "attributes", "landmarks", "identity"):
        parser.add_argument(f"--{name}", help=f"celeb_a: its {name} file (see above)")
    args = parser.parse_args(argv)
    data_dir = os.path.expanduser(args.data_dir)
    files = {k: getattr(args, k) for k in ("partition", "attributes", "landmarks", "identity")}
    if args.dataset == "celeb_a":
        missing = [f"--{k}" for k, v in files.items() if not v]
        if missing:
            parser.error(f"celeb_a needs {', '.join(missing)} (CelebA's annotation files)")
    for path in [args.archive, *(v for v in files.values() if v)]:
        if not os.path.isfile(path):
            parser.error(f"{path} does not exist")

    existing = archives.prepared_path(args.dataset, data_dir)
    if existing:
        print(f"{args.dataset} is already prepared in {existing}; nothing to do (delete that "
              f"folder to prepare it again).")
        return 0
    try:
        if args.dataset == "cifar10":
            path = archives.prepare_cifar10(args.archive, data_dir)
        else:
            path = archives.prepare_celeb_a(args.archive, data_dir, **files)
    except archives.ArchiveError as e:
        print(f"error: {e}. Nothing was written to {data_dir}.", file=sys.stderr)
        return 1
    print(f"{args.dataset} prepared in {path}. Train with --config.data.data_dir={data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
