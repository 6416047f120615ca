"""CIFAR-10 improved consistency training, iCT (Song & Dhariwal 2023, "Improved Techniques for
Training Consistency Models"): no teacher, no LPIPS.

    python scripts/run.py --config experiments/ict_cifar.py --workdir runs/ict_cifar
    python scripts/run.py --config experiments/ict_cifar.py --workdir runs/ict_cifar --mode eval

The paper's choices, each a setting of `diffusion/consistency_losses.py`: EDM's process on
[0.002, 80] with Karras levels (rho 7); the curriculum N(k) doubling from 11 to 1281 levels
(s0 10, s1 1280) over the run; the lognormal level distribution (P_mean -1.1, P_std 2.0); the
weighting 1 / (sigma_{i+1} - sigma_i); the pseudo-Huber distance with c = 0.00054 sqrt(3072);
the online network as its own target (no EMA target); dropout 0.3; 400k steps of batch 1024,
Adam lr 1e-4, EMA 0.99993 for the evaluated weights; one-step and two-step sampling (the second
step at sigma = 0.821, t = 0.5678 here). iCT's code is not public: these values are the paper's
(its section 5 and appendix), not a config file's; the network is the consistency models'
NCSN++ in the paper, EDM's DDPM++ here (as experiments/edm_cifar.py).

Expected (Song & Dhariwal 2023, Table 2, CIFAR-10): FID 2.83 in one step, 2.46 in two
(iCT-deep: 2.51, 2.24); not yet checked against the PDF. Not measured with this codebase.
ECT (Geng et al. 2024) starts the same training from a diffusion model:
--config.training.init_workdir=runs/edm_cifar.
"""

from experiments import edm_cifar, vp_cifar


def get_config(arg: str | None = None):
    config = edm_cifar.get_config()
    config.model.parameterization = "consistency"
    config.model.dropout = 0.3
    config.model.ema_rate = 0.99993
    config.model.ema_warmup = False
    config.training.loss = "consistency_training"
    config.training.ct_s0, config.training.ct_s1 = 10, 1280
    config.training.ct_p_mean, config.training.ct_p_std = -1.1, 2.0
    config.training.eps = 0.0                      # the boundary sigma(0) = 0.002
    config.training.batch_size = 1024
    config.training.n_iters = 400_000
    config.optim.lr = 1e-4
    config.optim.warmup = 0
    config.optim.grad_clip = 0.0
    config.sampling.method = "consistency"
    config.sampling.times = "1.0"                  # one step; "1.0,0.5678" for two
    config.sampling.steps = 0
    if arg == "smoke":
        return vp_cifar.smoke(config)
    return vp_cifar._no_variant(config, arg, variants=("smoke",))
