"""Shared defaults of every experiment (score_sde's names and values); not an experiment itself.

Experiments (experiments/*.py) start from `get_default_config()` and override only what differs.
`diffusion.config_checks.check_config` refuses a key that is not here unless the chosen network
(model.*) or SDE (sde.*) takes it, and a value changed from its default here that the chosen
network, SDE, sampler or loss does not use. Keys (tests/test_config_checks.py keeps this list
complete):
  seed; sde.{name, beta_min, beta_max, sigma_min, sigma_max, N, s, exact_std} (rectified_flow
  also takes sde.T);
  model.{name, ema_rate, ema_warmup, parameterization, noise_input, scale_input, scale_by_sigma,
  num_classes, label_dropout, learn_variance, remat, <network fields>};
  data.{dataset, path, image_size, num_channels, crop_size, num_workers, centered,
  uniform_dequantization, random_flip, data_dir, train_split, eval_split, sigma_data};
  training.{batch_size, n_iters, snapshot_freq, log_freq, eval_freq, n_jitted_steps, unroll,
  compute_dtype, loss, continuous, reduce_mean, likelihood_weighting, eps, t_sampling,
  logit_mean, logit_std, p_mean, p_std, vlb_weight, importance_sampling, ct_s0, ct_s1, ct_p_mean,
  ct_p_std, teacher_workdir, target_ema, cd_levels, cd_solver, cd_distance, init_workdir,
  snapshot_sampling, keep_checkpoints};
  optim.{optimizer, lr, warmup, grad_clip, beta1, beta2, eps, weight_decay};
  sampling.{method, steps, spacing, variance, times, predictor, corrector, snr, n_steps_each,
  corrector_norm, noise_removal, denoiser, eps, order, eta, rho, s_churn, rtol, atol, ode_solver,
  batch_size, num_samples, labels, guidance, guidance_weight, classifier_workdir, task, task_input,
  mask, sr_factor};
  eval.{batch_size, num_batches, enable_bpd, enable_vlb, bpd_num_batches, bpd_num_repeats,
  bpd_divergence, likelihood_eps, likelihood_rtol, likelihood_atol, enable_fid, fid_num_samples,
  fid_batch_size, fid_ref_split, fid_ref_max_examples, fid_stats_dir, inception_weights,
  kid_subsets, kid_subset_size, is_splits}.
"""

import ml_collections


def get_default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 42

    config.sde = sde = ml_collections.ConfigDict()
    sde.name = "vpsde"          # "vpsde" | "subvpsde" | "vesde" | "cosine_vpsde" |
                                # "rectified_flow" (x_t = (1 - t) x_0 + t z on [0, sde.T = 0.99])
    sde.beta_min = 0.1          # VP / sub-VP linear schedule (Song et al. 2021)
    sde.beta_max = 20.0
    sde.sigma_min = 0.01        # VE geometric schedule
    sde.sigma_max = 50.0
    sde.s = 0.008               # cosine schedule offset (Nichol & Dhariwal 2021)
    sde.N = 1000                # levels of the discrete chain (DDPM / SMLD); default sampler steps
    sde.exact_std = False       # VE only: std sqrt(sigma(t)^2 - sigma_min^2) of the SDE started at
                                # the clean data, instead of score_sde's sigma(t) (our option)

    config.model = model = ml_collections.ConfigDict()
    model.name = "unet"
    model.ema_rate = 0.9999
    model.ema_warmup = False            # decay min(ema_rate, (1+n)/(10+n)) (our option; score_sde:
                                        # the constant ema_rate from step 0)
    model.parameterization = "epsilon"  # "epsilon" | "score" | "x0" | "v" (velocity, Salimans
                                        # & Ho's v for VP) | "edm" (EDM's preconditioning) |
                                        # "consistency" (f(x, t), f(x, training.eps) = x)
    model.scale_by_sigma = False        # "score" output divided by sigma (score_sde's VE models)
    model.noise_input = "time"          # continuous models conditioned on 999 t ("time") or
                                        # log sigma(t); discrete ones on the level (score_sde)
    model.scale_input = False           # feed x / sqrt(alpha^2 + sigma^2) to the network (EDM's
                                        # c_in; our option, not score_sde's)
    model.num_classes = ml_collections.config_dict.placeholder(int)  # an int: class-conditional
    model.label_dropout = 0.0           # conditional models: labels replaced by the null label
                                        # with this probability (classifier-free guidance)
    model.learn_variance = False        # discrete models: also output the reverse kernel's
                                        # variance (Nichol & Dhariwal 2021; training.loss
                                        # "hybrid" or "vlb")
    model.remat = False                 # recompute block activations in the backward pass
                                        # (less memory, ~1 more forward; unet/ncsnpp/ddpmpp)

    config.data = data = ml_collections.ConfigDict()
    data.dataset = "cifar10"
    data.image_size = 32
    data.num_channels = 3
    data.centered = True               # images in [-1, 1]; else [0, 1], and the network sees
                                       # 2 x - 1 (as score_sde's networks)
    data.uniform_dequantization = False
    data.random_flip = True
    data.num_workers = 4               # tfds data: processes preparing batches (0: a thread)
    data.crop_size = 0                 # tfds images: centered square crop side (0: largest)
    data.data_dir = ml_collections.config_dict.placeholder(str)  # tfds data_dir (None: default)
    data.path = ml_collections.config_dict.placeholder(str)  # dataset "folder": the image folder
    data.sigma_data = 0.5              # the data's std, for the "edm" parameterization and loss
                                       # (EDM: 0.5 for images in [-1, 1])
    data.train_split = "train"
    data.eval_split = "test"

    config.training = training = ml_collections.ConfigDict()
    training.batch_size = 128
    training.n_iters = 1_300_001
    training.snapshot_freq = 50_000     # checkpoint (and sample grid) every this many steps
    training.log_freq = 50
    training.eval_freq = 5_000          # EMA eval loss to TensorBoard; 0 disables
    training.n_jitted_steps = 1         # optimizer steps per jitted call
    training.unroll = "auto"            # the n_jitted_steps loop: "unroll" (a Python loop, fast
                                        # on XLA:CPU), "scan" (lax.scan: compiles once on
                                        # GPU / TPU), "auto" (unroll on CPU, else scan)
    training.compute_dtype = "float32"  # "bfloat16": mixed precision (params, optimizer, EMA
                                        # stay float32; sampling / likelihood use float32)
    training.loss = "dsm"               # "dsm": denoising score matching (score_sde), in
                                        # continuous time, or with training.continuous=False
                                        # the discrete DDPM (VP, cosine) / SMLD (VE) losses |
                                        # "flow_matching" (velocity regression) | "edm" (EDM's
                                        # loss) | "hybrid" / "vlb" (Improved DDPM: discrete,
                                        # model.learn_variance) | "consistency_training" (iCT)
                                        # | "consistency_distillation" (model.parameterization
                                        # "consistency");
                                        # diffusion/losses.py
    training.continuous = True          # False: DDPM / SMLD's discrete levels (see loss)
    training.reduce_mean = False        # mean over dimensions (else 1/2 sum, score_sde)
    training.likelihood_weighting = False   # dsm: weight g(t)^2 (Song et al. 2021b)
    training.eps = 1e-5                 # t ~ U(eps, T)
    training.t_sampling = "uniform"     # flow_matching: "uniform" | "logit_normal" (SD3)
    training.logit_mean = 0.0           # flow_matching, logit_normal: t = sigmoid(m + s n)
    training.logit_std = 1.0
    training.p_mean = -1.2              # edm: ln sigma~ ~ N(p_mean, p_std^2) (Karras et al.)
    training.p_std = 1.2
    training.vlb_weight = 0.001         # hybrid: L_simple + vlb_weight L_vlb (Nichol &
                                        # Dhariwal 2021: lambda = 0.001)
    training.importance_sampling = True  # vlb: levels drawn with p ~ sqrt(E[L^2]) (their
                                        # sec. 3.3), else uniformly
    training.ct_s0 = 10                 # consistency_training: iCT's curriculum N(k) from
    training.ct_s1 = 1280               # s0 + 1 levels doubling to s1 + 1 (Song & Dhariwal 2023)
    training.ct_p_mean = -1.1           # consistency_training: lognormal level distribution
    training.ct_p_std = 2.0
    training.teacher_workdir = ""       # consistency_distillation: the teacher's workdir (its
                                        # config.json and EMA weights)
    training.target_ema = 0.95          # consistency_distillation: the target network's EMA mu
    training.cd_levels = 18             # consistency_distillation: Karras levels N (CIFAR: 18)
    training.cd_solver = "heun"         # consistency_distillation: the teacher's ODE step,
                                        # "euler" | "heun" | "dpm_solver" (DPM-Solver++(2S))
    training.cd_distance = "l2"         # consistency_distillation: "l2" | "pseudo_huber"
    training.init_workdir = ""          # start from the EMA weights of the run in this workdir
                                        # (same network; ECT's start from a diffusion model)
    training.snapshot_sampling = True
    training.keep_checkpoints = 3

    config.optim = optim = ml_collections.ConfigDict()
    optim.optimizer = "adam"            # "adam" (AdamW with weight_decay) | "radam"
    optim.lr = 2e-4
    optim.warmup = 5000
    optim.grad_clip = 1.0               # global-norm clipping; <= 0 disables
    optim.beta1 = 0.9
    optim.beta2 = 0.999
    optim.eps = 1e-8
    optim.weight_decay = 0.0

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.method = "pc"              # "pc" | "ode" | "ddim" | "dpm_solver" | "edm" |
                                        # "ddpm" (ancestral on the discrete chain, respaced) |
                                        # "consistency" (multistep consistency sampling)
    sampling.steps = 0                  # 0: the sampler's default (pc, ddpm: sde.N; ddim 50,
                                        # dpm_solver 20, edm 18); unused by "ode" (adaptive)
    sampling.spacing = "evenly"         # ddpm with steps < sde.N: "evenly" | "quad" (DDIM's)
    sampling.times = ""                 # consistency: comma-separated times from T down, one
                                        # denoiser evaluation each ("": one step, from T)
    sampling.variance = "beta"          # ddpm, fixed-variance models: "beta" | "beta_tilde"
                                        # (learned-variance models use theirs)
    sampling.predictor = "euler_maruyama"  # | "reverse_diffusion" | "ancestral" | "none"
    sampling.corrector = "none"         # "langevin" | "ald" | "none"
    sampling.snr = 0.16
    sampling.n_steps_each = 1           # corrector steps per predictor step
    sampling.corrector_norm = "batch"   # pc, langevin: step size from the score / noise norms
                                        # averaged over the (global) batch (score_sde), or
                                        # "example": per sample, so that a sample does not
                                        # depend on sampling.batch_size (our option)
    sampling.noise_removal = True       # end with a noise-free step at eps: pc the last
                                        # predictor's mean, ode sampling.denoiser, ddim /
                                        # dpm_solver E[x_0 | x_eps], edm its last step to 0
    sampling.denoiser = "reverse_diffusion"  # ode: score_sde's reverse-diffusion step at eps,
                                        # or "tweedie": E[x_0 | x_eps] (our option)
    sampling.order = 2                  # dpm_solver: 1, 2 or 3 (DPM-Solver++ 2M / 3M)
    sampling.eta = 0.0                  # ddim: 0 deterministic, 1 DDPM-like noise
    sampling.rho = 7.0                  # edm: time-step exponent
    sampling.s_churn = 0.0              # edm: stochasticity (0 = deterministic Heun)
    sampling.rtol = 1e-5                # ode: adaptive solver tolerances (score_sde)
    sampling.atol = 1e-5
    sampling.ode_solver = "tsit5"       # ode: "tsit5" | "dopri5"
    sampling.eps = 1e-3
    sampling.batch_size = 64
    sampling.num_samples = 64
    # Controllable generation (diffusion/guidance.py; docs/controllable.md).
    sampling.labels = ""                # conditional / guided: "3,3,7" (cycled), "all" (0..K-1
                                        # cycled), "" (uniformly random)
    sampling.guidance = "none"          # "cfg" (classifier-free) | "classifier" | "none"
    sampling.guidance_weight = 0.0      # cfg: w; classifier: the scale
    sampling.classifier_workdir = ""    # classifier guidance: workdir of a trained classifier
    sampling.task = "none"              # "inpaint" | "colorize" | "super_resolve" | "none"
    sampling.task_input = "eval"        # conditioning images: "eval" (the eval split), or a
                                        # .npz (array "images") / .png file
    sampling.mask = "right_half"        # inpaint: the unknown part ("right_half", "bottom_half",
                                        # "center", "random")
    sampling.sr_factor = 2              # super_resolve: the upsampling factor

    config.eval = evaluation = ml_collections.ConfigDict()
    evaluation.batch_size = 256
    evaluation.num_batches = 20
    evaluation.enable_bpd = True        # likelihood through the probability-flow ODE
    evaluation.enable_vlb = True        # discrete models: DDPM's variational bound in bits/dim
                                        # (vlb_bpd; eval.bpd_num_batches batches)
    evaluation.bpd_num_batches = 1      # batches of eval.batch_size per pass (0: the whole split)
    evaluation.bpd_num_repeats = 1      # passes, each with fresh dequantization noise (score_sde:
                                        # 5 over the whole test set)
    evaluation.bpd_divergence = "hutchinson_rademacher"  # | "hutchinson_gaussian" | "exact"
    evaluation.likelihood_eps = 1e-5
    evaluation.likelihood_rtol = 1e-5
    evaluation.likelihood_atol = 1e-5
    # FID / KID / Inception Score of samples (image data; `--mode eval`); see diffusion/metrics.
    evaluation.enable_fid = True
    evaluation.fid_num_samples = 50_000   # the papers' FID uses 50k samples
    evaluation.fid_batch_size = 200       # Inception batch (299 x 299 inputs)
    evaluation.fid_ref_split = "train"    # reference statistics: this split ("train" | "eval")
    evaluation.fid_ref_max_examples = 0   # 0: the whole split
    evaluation.fid_stats_dir = ""         # cache of reference statistics; "": <workdir>/fid_stats
    evaluation.inception_weights = ""     # converted .npz; "": ~/.cache/diffusion/ (converted
                                          # on first use; docs/likelihood_and_fid.md)
    evaluation.kid_subsets = 100
    evaluation.kid_subset_size = 1000
    evaluation.is_splits = 10
    return config
