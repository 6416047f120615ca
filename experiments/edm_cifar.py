"""Unconditional CIFAR-10 with EDM (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models"): their DDPM++ run, `train.py --cond=0 --arch=ddpmpp`.

Every setting is EDM's (NVlabs/edm at 008a4e5: train.py, training/training_loop.py, loss.py,
networks.py, generate.py; each line below cites its value). The process is x = x_0 + sigma z
(the VE SDE over the sampler's sigma range 0.002 .. 80, std exactly sigma(t)), with EDM's
preconditioning (model.parameterization "edm": c_skip, c_out, c_in and c_noise = ln(sigma) / 4,
sigma_data 0.5) and loss (training.loss "edm": ln sigma ~ N(-1.2, 1.2^2), weight 1 / c_out^2) on
data in [-1, 1]. Adam lr 1e-3, betas (0.9, 0.999), eps 1e-8, ramped up linearly over 10 Mimg
(19,531 steps) and then constant, no gradient clipping, batch 512 for 200 Mimg (390,625 steps),
EMA with a half-life of 0.5 Mimg (decay 0.5 ** (512 / 500,000) = 0.99929), half the images
flipped horizontally. Sampling is EDM's deterministic Heun sampler: 18 steps (35 NFE), rho 7,
sigma 80 down to 0.002, then to 0. The network is DDPM++ as EDM configures it (our
`diffusion/models/ncsnpp.py`): nf 128, ch_mult (2, 2, 2) (three levels, 32/16/8, all 256
channels), 4 BigGAN residual blocks per level, attention at 16x16, dropout 0.13, positional
embedding, no FIR (resample_filter [1, 1]), skip rescale, EDM's 1e-5 xavier "zero" init;
55,732,739 parameters, the count of EDM's own SongUNet with augment_dim=0 (55,733,891 = 55.73M
with its augmentation input, below).

Expected (EDM, Table 2; docs/flows_v_edm.md): FID 1.97, unconditional, 35 NFE, 50k samples
against the training set's statistics, the minimum of three FIDs (seeds 0-49999, 50000-99999,
100000-149999); users rerunning the official code get 2.04-2.08 (NVlabs/edm issue #16). Without
the augmentation (below) this is EDM's config E, FID 2.05: expect about 2.05, within that
spread. Not measured with this codebase yet (EDM: about 2 days on 8 V100s).

    python scripts/run.py --config experiments/edm_cifar.py --workdir runs/edm_cifar
    python scripts/run.py --config experiments/edm_cifar.py --workdir runs/edm_cifar --mode eval

`--mode eval` gives FID / KID of 50k samples of this sampler (Inception weights:
docs/likelihood_and_fid.md). Needs tfds `cifar10` prepared, from CIFAR-10's own archive and
without TensorFlow (`python scripts/prepare_data.py cifar10 --archive cifar-10-python.tar.gz
--data_dir DIR`, then `--config.data.data_dir=DIR`). Smoke variant (tiny, a few steps on a
CPU; the tests run it on `tfds.testing.mock_data`): --config experiments/edm_cifar.py:smoke
Useful overrides: --config.training.n_jitted_steps=5 (390,625 = 5^8: 5 or 25),
--config.model.remat=True, --config.training.compute_dtype=bfloat16 (EDM trains in float32).

Differences from EDM that this config cannot express (or chooses):
- No non-leaky augmentation, expected to cost about 0.08 FID (EDM Table 2, unconditional
  DDPM++ / VP: config E without it 2.05, config F with it 1.97; conditional 1.88 vs 1.79).
  EDM's AugmentPipe (p = 0.12) flips by pixel blitting (x-flips always gated on, y-flips with
  probability p) and resamples (sym6-filtered) with isotropic scaling 2^N(0, 0.2^2), rotation
  U(-pi, pi), anisotropic scaling and translation N(0, 0.125^2) image widths, each with
  probability p. The augmented image is both the denoiser's input and its target, and the
  transforms' 9 parameters condition the network through `map_augment`, a bias-free
  Linear(9 -> 128) added to the noise embedding before the embedding MLP (zeros when sampling).
  Neither the pipe nor that input (1,152 parameters) exists here.
- Flips: data.random_flip flips half the images, the distribution of EDM's always-on x-flip,
  but without telling the network; EDM feeds it the flip bit and samples with it 0. CIFAR-10 is
  mirror-symmetric, so the learned distribution should be the same.
- EMA ramp-up: EDM's half-life is min(0.5 Mimg, 0.05 x images seen), a decay 0.5 ** (20 / n)
  after n updates until step 19,531; ours (model.ema_warmup) is min(ema_rate, (1 + n) /
  (10 + n)). Chosen over a constant decay because it is the closer one: both start near a copy
  of the network (decay 0 and 0.18) and ramp as 1 - c / n (c = 20 ln 2 = 13.9 for EDM, 9 here),
  so early snapshots average the recent weights rather than the initialisation; ours reaches
  0.99929 at step 12.7k instead of 19.5k. From about step 20k (5% of the run) they agree, so the
  final EMA does not depend on the ramp.
- Loss scale: EDM sums the loss over the 3,072 pixels; reduce_mean=False here takes half the
  sum, hence half EDM's gradients, and Adam's update m / (sqrt(v) + eps) is EDM's with eps acting
  as 2e-8 (reduce_mean=True, a mean over pixels, would make it 3.1e-5). The logged loss is 1/2 x
  sum, 1,536 times the per-pixel mean EDM logs.
- EDM replaces NaN / inf gradients (nan_to_num) before each step; here a non-finite loss stops
  training at the next log or snapshot. EDM's sampler computes in float64, ours in float32. EDM
  disables TF32; JAX's default float32 precision may use it on Ampere or newer GPUs
  (JAX_DEFAULT_MATMUL_PRECISION=highest to match). Training sigmas beyond [0.002, 80] are
  clipped to those ends (1.6e-5 of them; EDM does not clip).
- Layout only: EDM's attention has one fused qkv 1x1 conv (interleaved channels, sqrt(0.2) x
  xavier on 3C outputs), ours three Dense layers at variance scale 0.1: the same uniform bound
  sqrt(0.3 / C). Class labels (for --cond=1; not this config) enter EDM's network before the
  embedding MLP, ours (model.num_classes) after it.
- FID is ours (diffusion/metrics, against the training split); EDM's fid.py uses the StyleGAN
  Inception pickle.
"""

from diffusion.models import ncsnpp
from experiments import default, vp_cifar

# Images per optimizer step, and EDM's durations in images (train.py / training_loop.py).
BATCH = 512
TRAIN_IMAGES = 200_000_000        # --duration=200 (Mimg)
LR_RAMPUP_IMAGES = 10_000_000     # lr_rampup_kimg=10000
EMA_HALFLIFE_IMAGES = 500_000     # --ema=0.5 (Mimg)


def get_config(arg: str | None = None):
    config = default.get_default_config()
    # EDM's process x = x_0 + sigma z, over generate.py's sigma range [0.002, 80].
    config.sde.name = "vesde"
    config.sde.sigma_min = 0.002                # EDM: sigma_min 0.002 (edm_sampler)
    config.sde.sigma_max = 80.0                 # EDM: sigma_max 80 (edm_sampler)
    config.sde.exact_std = False                # std sigma(t) exactly: x = x_0 + sigma z

    config.data.dataset = "cifar10"
    config.data.image_size = 32
    config.data.num_channels = 3
    config.data.centered = True                 # EDM: images / 127.5 - 1, in [-1, 1]
    config.data.random_flip = True              # EDM: AugmentPipe xflip=1e8, always on (50%)
    config.data.sigma_data = 0.5                # EDM: EDMPrecond / EDMLoss sigma_data=0.5

    config.model.name = "ddpmpp"
    config.model.update(ncsnpp.PRESETS["ddpmpp_cont"])  # then EDM's changes:
    config.model.nf = 128                       # EDM: model_channels=128
    config.model.ch_mult = (2, 2, 2)            # EDM: channel_mult=[2, 2, 2]
    config.model.num_res_blocks = 4             # EDM: num_blocks=4
    config.model.attn_resolutions = (16,)       # EDM: attn_resolutions=[16]
    config.model.dropout = 0.13                 # EDM: --dropout=0.13 (train.py default)
    config.model.embedding_type = "positional"  # EDM: embedding_type='positional'
    config.model.fir = False                    # EDM: resample_filter=[1, 1] (nearest / avg)
    config.model.resblock_type = "biggan"       # EDM: resampling inside the blocks, 1x1 skip
    config.model.skip_rescale = True            # EDM: skip_scale=sqrt(0.5)
    config.model.progressive = "none"           # EDM: decoder_type='standard'
    config.model.progressive_input = "none"     # EDM: encoder_type='standard'
    config.model.init_scale = 0.0               # EDM: init_zero = xavier_uniform x 1e-5 (our
                                                # 0: variance scale 1e-10, the same bound)
    config.model.conditional = True             # EDM: noise embedding, channel_mult_emb=4
    config.model.parameterization = "edm"       # EDM: EDMPrecond (c_noise = ln(sigma) / 4)
    config.model.ema_rate = 0.5 ** (BATCH / EMA_HALFLIFE_IMAGES)   # EDM: half-life 0.5 Mimg
    config.model.ema_warmup = True              # EDM: ema_rampup_ratio=0.05 (see docstring)

    config.training.batch_size = BATCH          # EDM: --batch=512
    config.training.n_iters = TRAIN_IMAGES // BATCH         # EDM: --duration=200 Mimg: 390,625
    config.training.loss = "edm"                # EDM: --precond=edm -> EDMLoss
    config.training.p_mean = -1.2               # EDM: P_mean=-1.2
    config.training.p_std = 1.2                 # EDM: P_std=1.2
    config.training.reduce_mean = False         # EDM: loss.sum() over pixels (see docstring)
    config.training.continuous = True

    config.optim.lr = 1e-3                      # EDM: --lr=10e-4
    config.optim.warmup = LR_RAMPUP_IMAGES // BATCH         # EDM: 10 Mimg ramp: 19,531 steps
    config.optim.grad_clip = 0.0                # EDM: no clipping (<= 0 disables it)
    config.optim.beta1 = 0.9                    # EDM: Adam betas=[0.9, 0.999]
    config.optim.beta2 = 0.999
    config.optim.eps = 1e-8                     # EDM: eps=1e-8
    config.optim.weight_decay = 0.0             # EDM: none

    config.sampling.method = "edm"              # EDM: edm_sampler (Heun, Alg. 2)
    config.sampling.steps = 18                  # EDM: num_steps=18 (35 NFE)
    config.sampling.rho = 7.0                   # EDM: rho=7
    config.sampling.s_churn = 0.0               # EDM: S_churn=0 (deterministic)
    config.sampling.noise_removal = True        # EDM: the last step goes to sigma = 0
    config.sampling.eps = 0.0                   # sigma(0) = sigma_min = 0.002 exactly
    config.eval.fid_num_samples = 50_000        # EDM: 50k samples per FID
    if arg == "smoke":
        return vp_cifar.smoke(config)           # nf 16, 1 block, ch_mult (1, 2), 2 steps
    return vp_cifar._no_variant(config, arg, variants=("smoke",))
