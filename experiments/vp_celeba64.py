"""CelebA at 64x64 with the VP SDE and DDPM++ cont.: the CIFAR-10 recipe at a higher resolution.

Identical to experiments/vp_cifar.py (DDPM++ cont., 61.8M parameters: the parameter count does not
depend on the resolution; batch 128, Adam 2e-4, EMA 0.9999, 1.3M steps, Euler-Maruyama sampling)
except for the data: tfds `celeb_a` (162,770 train / 19,867 validation images of 218x178), center
cropped to 140x140 and resized to 64x64 (score_sde's and DDIM's CelebA preprocessing), random
flips, data in [-1, 1]. The U-Net's four levels then run at 64, 32, 16 and 8 pixels with attention
at 16x16, so a step costs about 4x a CIFAR-10 step. `:deep` uses DDPM++ cont. (deep).

Expected: Song et al. 2021 report no CelebA 64x64 result for this model, so there is no paper
number to match; nothing has been measured with this codebase yet.

    python scripts/run.py --config experiments/vp_celeba64.py --workdir runs/vp_celeba64

Needs tfds `celeb_a` prepared, from CelebA's own files and without TensorFlow:
`python scripts/prepare_data.py celeb_a --archive img_align_celeba.zip --partition
list_eval_partition.txt --attributes list_attr_celeba.txt --landmarks
list_landmarks_align_celeba.txt --identity identity_CelebA.txt --data_dir DIR` (see
docs/paper_configs.md), then `--config.data.data_dir=DIR`. Smoke variant (16x16, tiny network,
the tests run it on `tfds.testing.mock_data`): --config experiments/vp_celeba64.py:smoke
"""

from experiments import vp_cifar


def get_config(arg: str | None = None):
    config = vp_cifar.get_config("deep" if arg == "deep" else None)
    config.data.dataset = "celeb_a"
    config.data.image_size = 64
    config.data.crop_size = 140
    config.data.eval_split = "validation"
    if arg == "smoke":
        config = vp_cifar.smoke(config)
        config.data.image_size = 16
        return config
    return vp_cifar._no_variant(config, arg)
