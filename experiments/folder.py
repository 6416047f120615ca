"""Your own images: any folder of PNG / JPEG files, with the VP SDE and DDPM++ cont. scaled to
the image size (diffusion/folder.py says how the folder is read: splits, labels, cropping).

    python scripts/run.py --config experiments/folder.py --workdir runs/faces \
        --config.data.path=/data/faces                        # 64x64 (the default size)
    python scripts/run.py --config experiments/folder.py:128 --workdir runs/faces128 \
        --config.data.path=/data/faces                        # 128x128
    python scripts/run.py --config experiments/folder.py:32 --workdir runs/cond \
        --config.data.path=/data/classes --config.model.num_classes=10   # labels from subfolders

The size is the config argument (16, 32, 64, 128 or 256), because the network's depth follows
it: score_sde's DDPM++ cont. (vp_cifar.py: nf 128, 4 residual blocks per level, attention at
16x16, Adam 2e-4, EMA 0.9999, batch 128) with levels down to 4x4 pixels at 32 and 8x8 above
(ch_mult (1, 2, 2, 2) at 16-64 as for CIFAR-10 and CelebA 64x64; (1, 1, 2, 2, 2, 2) at 128;
(1, 1, 2, 2, 2, 2, 2) at 256 as score_sde's 256x256 models, with batch 64 there). Data in [-1, 1]
with random flips (set --config.data.random_flip=False for images that are not mirror symmetric,
e.g. text); `data.crop_size` crops a centred square of that side before resizing (0: the largest).
Smoke variant (a tiny network, seconds on a CPU; the tests run it):
--config experiments/folder.py:smoke --config.data.path=DIR
"""

from experiments import vp_cifar

SIZES = {16: (1, 2, 2), 32: (1, 2, 2, 2), 64: (1, 2, 2, 2), 128: (1, 1, 2, 2, 2, 2),
         256: (1, 1, 2, 2, 2, 2, 2)}


def get_config(arg: str | None = None):
    smoke = arg == "smoke"
    if not smoke and arg is not None and not (arg.isdigit() and int(arg) in SIZES):
        raise ValueError(f"experiments/folder.py takes an image size ({', '.join(map(str, SIZES))})"
                         f" or 'smoke' as its argument, got {arg!r}.")
    size = 64 if smoke or arg is None else int(arg)
    config = vp_cifar.get_config()
    config.data.dataset = "folder"
    config.data.image_size = size
    config.data.num_channels = 3
    config.data.eval_split = "eval"
    config.model.ch_mult = SIZES[size]
    if size >= 256:
        config.training.batch_size = 64
    config.eval.bpd_num_batches = 10            # bits/dim on 10 eval batches, not the whole split
    config.eval.bpd_num_repeats = 1
    if smoke:
        config = vp_cifar.smoke(config)
        config.data.image_size = 16
        config.data.num_workers = 0
    return config
