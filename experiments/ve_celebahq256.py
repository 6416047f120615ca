"""CelebA-HQ at 256x256 with the VE SDE and NCSN++, score_sde's
`ve/celebahq_256_ncsnpp_continuous`; `:church` is its `ve/church_ncsnpp_continuous` (LSUN church).

The network is NCSN++ for 256x256 (65.6M parameters): nf 128, ch_mult (1, 1, 2, 2, 2, 2, 2) (seven
levels, 256 down to 4 pixels), 2 BigGAN residual blocks per level, attention at 16x16, FIR
resampling, the output_skip output pyramid and the input_skip input pyramid (combined by sum),
Gaussian Fourier embedding of log sigma, no dropout. VE SDE with sigma_min 0.01 and sigma_max 348
(church: 380; Song & Ermon 2020's rule, sigma_max = the largest distance between training
images), EMA 0.999, batch 64 (the paper's batch for 256x256), Adam 2e-4, 1/2-sum loss, 2.4M
steps, data in [0, 1] (the network sees 2 x - 1), score_sde's VE conventions as in ve_cifar.py.
Sampling: PC with reverse diffusion + Langevin at snr 0.075 over N = 2,000 steps down to 1e-5.
No bits/dim (score_sde's LSUN / CelebA-HQ configs have eval.enable_bpd False).

Expected: Song et al. 2021 show 256x256 CelebA-HQ and LSUN samples (their Figure 12 and appendix)
but report no FID for them, so there is no paper number to match; nothing has been measured with
this codebase yet. Cost: a train step at batch 64 is 102 TFLOP, and XLA's memory plan for it
(compiled for a CPU: `python benchmarks/train_throughput.py --networks ncsnpp_256 --width 0
--compile_only --batch 64`) is 218 GiB, so batch 64 needs several accelerators: the batch is
split over all devices (score_sde trained it on TPU pods), about 27 GiB each on 8.
--config.model.remat=True and --config.training.compute_dtype=bfloat16 are meant to cut that
further; their effect on an accelerator is not measured yet.

    python scripts/run.py --config experiments/ve_celebahq256.py --workdir runs/celebahq256

Needs tfds `celeb_a_hq/256` prepared, which takes a manual download (tfds's catalog page says
which files and where: `tfds build celeb_a_hq/256 --manual_dir M --data_dir DIR --file_format
array_record`), then `--config.data.data_dir=DIR`; CelebA-HQ has only a train split, which is also
the eval split (as in score_sde). `:church` reads `lsun/church_outdoor` instead (downloadable by
`tfds build`). Smoke variant (16x16, tiny network): --config experiments/ve_celebahq256.py:smoke
"""

from experiments import ve_cifar, vp_cifar


def get_config(arg: str | None = None):
    config = ve_cifar.get_config()
    config.data.dataset = "celeb_a_hq/256"
    config.data.image_size = 256
    config.data.random_flip = True
    config.data.train_split = config.data.eval_split = "train"
    config.sde.sigma_max = 348.0
    config.sde.N = 2000
    config.model.update(num_res_blocks=2, ch_mult=(1, 1, 2, 2, 2, 2, 2), dropout=0.0,
                        progressive="output_skip", progressive_input="input_skip",
                        progressive_combine="sum")
    config.training.batch_size = 64
    config.training.n_iters = 2_400_001       # configs/default_lsun_configs.py
    config.sampling.snr = 0.075
    config.eval.enable_bpd = False
    if arg == "church":
        config.data.dataset = "lsun/church_outdoor"
        config.data.eval_split = "validation"
        config.sde.sigma_max = 380.0
    elif arg == "smoke":
        config = vp_cifar.smoke(config)
        config.data.image_size = 16
        config.model.ch_mult = (1, 2, 2)
    elif arg not in (None, ""):
        raise ValueError(f"Unknown config variant {arg!r}; use ':church', ':smoke' or none.")
    return config
