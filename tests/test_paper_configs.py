"""The CIFAR-10 paper configs carry score_sde's settings, key by key.

Each line below is one setting that changes the trained model or its samples, with the value in
score_sde (github.com/yang-song/score_sde) and the file it comes from:
  D = configs/default_cifar10_configs.py, VP / SUBVP / VE = the experiment's own config file
  (configs/{vp,subvp}/cifar10_ddpmpp[_deep]_continuous.py, configs/ve/cifar10_ncsnpp[_deep]_
  continuous.py), R = run_lib.py, L = losses.py, U = models/utils.py (get_score_fn),
  N = models/ncsnpp.py, S = sde_lib.py, LK = likelihood.py (get_likelihood_fn's defaults).
Where score_sde's key has another name here, the line says so. What our NCSN++ fixes rather than
configures (swish, GroupNorm, 3x3 convs, DDPM attention) and the rest of the network are checked
by running score_sde's own checkpoints (tests/test_score_sde_compat.py).
"""

import pytest

from experiments import subvp_cifar, ve_cifar, vp_cifar

D = "configs/default_cifar10_configs.py"
VP = "configs/vp/cifar10_ddpmpp[_deep]_continuous.py"
SUBVP = "configs/subvp/cifar10_ddpmpp[_deep]_continuous.py"
VE = "configs/ve/cifar10_ncsnpp[_deep]_continuous.py"
R, L, U, N, S, LK = ("run_lib.py", "losses.py", "models/utils.py", "models/ncsnpp.py",
                     "sde_lib.py", "likelihood.py")

# (key here, score_sde's value, where), shared by all six configs.
COMMON = [
    ("seed", 42, D),
    ("data.dataset", "cifar10", D),                      # data.dataset = 'CIFAR10'
    ("data.image_size", 32, D),
    ("data.num_channels", 3, D),
    ("data.random_flip", True, D),
    ("data.uniform_dequantization", False, D),
    ("sde.beta_min", 0.1, D),                            # model.beta_min
    ("sde.beta_max", 20.0, D),                           # model.beta_max
    ("sde.sigma_min", 0.01, D),                          # model.sigma_min
    ("sde.sigma_max", 50.0, D),                          # model.sigma_max
    ("sde.N", 1000, D),                                  # model.num_scales
    ("training.batch_size", 128, D),
    ("training.continuous", True, D),
    ("training.likelihood_weighting", False, D),
    ("training.eps", 1e-5, L),                           # get_sde_loss_fn(eps=1e-5)
    ("optim.lr", 2e-4, D),
    ("optim.warmup", 5000, D),
    ("optim.grad_clip", 1.0, D),
    ("optim.beta1", 0.9, D),
    ("optim.beta2", 0.999, D),                           # flax.optim.Adam's default
    ("optim.eps", 1e-8, D),
    ("optim.weight_decay", 0.0, D),
    ("model.ema_warmup", False, L),                      # get_step_fn: constant ema_rate
    ("model.scale_input", False, U),                     # the network sees x as it is
    ("model.nf", 128, VP),
    ("model.ch_mult", (1, 2, 2, 2), VP),
    ("model.attn_resolutions", (16,), VP),
    ("model.dropout", 0.1, D),
    ("model.resamp_with_conv", True, VP),
    ("model.conditional", True, VP),
    ("model.fir_kernel", (1, 3, 3, 1), VP),
    ("model.skip_rescale", True, VP),
    ("model.resblock_type", "biggan", VP),
    ("model.progressive", "none", VP),
    ("model.progressive_combine", "sum", VP),
    ("model.init_scale", 0.0, VP),
    ("model.fourier_scale", 16.0, VP),
    ("sampling.method", "pc", VP),
    ("sampling.steps", 0, R),                            # 0: sde.N steps, as get_pc_sampler
    ("sampling.snr", 0.16, D),
    ("sampling.n_steps_each", 1, D),
    ("sampling.noise_removal", True, D),
    ("eval.bpd_num_batches", 0, R),                      # the whole bpd_dataset
    ("eval.bpd_num_repeats", 5, R),                      # bpd_num_repeats for 'test'
    ("data.eval_split", "test", D),                      # eval.bpd_dataset = 'test'
    ("eval.bpd_divergence", "hutchinson_rademacher", LK),
    ("eval.likelihood_eps", 1e-5, LK),
    ("eval.likelihood_rtol", 1e-5, LK),
    ("eval.likelihood_atol", 1e-5, LK),
]
# DDPM++ cont. with the VP or sub-VP SDE.
DDPMPP = [
    ("model.name", "ddpmpp", VP),                        # score_sde's 'ncsnpp' class as DDPM++
    ("data.centered", True, VP),
    ("model.ema_rate", 0.9999, VP),
    ("model.fir", False, VP),
    ("model.progressive_input", "none", VP),
    ("model.embedding_type", "positional", VP),
    ("model.parameterization", "epsilon", U),            # score = -model / std
    ("model.scale_by_sigma", False, VP),
    ("model.noise_input", "time", U),                    # labels = 999 t
    ("training.reduce_mean", True, VP),
    ("sampling.predictor", "euler_maruyama", VP),
    ("sampling.corrector", "none", VP),
    ("sampling.eps", 1e-3, R),                           # sampling_eps for VP / sub-VP
]
NCSNPP = [
    ("sde.name", "vesde", VE),                           # training.sde
    ("sde.exact_std", False, S),                         # marginal std sigma(t)
    ("model.name", "ncsnpp", VE),
    ("data.centered", False, D),                         # the network sees 2 x - 1 (N)
    ("model.ema_rate", 0.999, VE),
    ("model.fir", True, VE),
    ("model.progressive_input", "residual", VE),
    ("model.embedding_type", "fourier", D),
    ("model.parameterization", "score", N),              # the network's output is the score,
    ("model.scale_by_sigma", True, VE),                  # divided by sigma
    ("model.noise_input", "log_sigma", U),               # labels = sigma(t); N takes the log
    ("training.reduce_mean", False, D),
    ("sampling.predictor", "reverse_diffusion", VE),
    ("sampling.corrector", "langevin", VE),
    ("sampling.eps", 1e-5, R),                           # sampling_eps for VE
]
NORMAL = [("training.n_iters", 1_300_001, D), ("model.num_res_blocks", 4, VP)]
DEEP = [("training.n_iters", 950_001, VP), ("model.num_res_blocks", 8, VP)]

CONFIGS = {
    "vp_cifar": (vp_cifar, None, COMMON + DDPMPP + NORMAL + [("sde.name", "vpsde", VP)]),
    "vp_cifar:deep": (vp_cifar, "deep", COMMON + DDPMPP + DEEP + [("sde.name", "vpsde", VP)]),
    "subvp_cifar": (subvp_cifar, None,
                    COMMON + DDPMPP + NORMAL + [("sde.name", "subvpsde", SUBVP)]),
    "subvp_cifar:deep": (subvp_cifar, "deep",
                         COMMON + DDPMPP + DEEP + [("sde.name", "subvpsde", SUBVP)]),
    "ve_cifar": (ve_cifar, None, COMMON + NCSNPP + NORMAL),
    "ve_cifar:deep": (ve_cifar, "deep", COMMON + NCSNPP + DEEP),
}


def _get(config, key):
    value = config
    for part in key.split("."):
        value = value[part]
    return tuple(value) if isinstance(value, list) else value


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_paper_config_equals_score_sde(name):
    module, variant, expected = CONFIGS[name]
    config = module.get_config(variant)
    keys = [key for key, _, _ in expected]
    assert len(keys) == len(set(keys)), "a key is listed twice"
    wrong = [f"{key} = {_get(config, key)!r}, score_sde's {value!r} ({source})"
             for key, value, source in expected if _get(config, key) != value]
    assert not wrong, f"{name} differs from score_sde:\n  " + "\n  ".join(wrong)
