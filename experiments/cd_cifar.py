"""CIFAR-10 consistency distillation (Song, Dhariwal, Chen & Sutskever 2023, "Consistency
Models"; openai/consistency_models_cifar10, configs/cifar10_ve_cd.py), of an EDM teacher.

    python scripts/run.py --config experiments/edm_cifar.py --workdir runs/edm_cifar   # teacher
    python scripts/run.py --config experiments/cd_cifar.py --workdir runs/cd_cifar
    python scripts/run.py --config experiments/cd_cifar.py --workdir runs/cd_cifar --mode eval

Their settings: EDM's process x = x_0 + sigma z on [0.002, 80] (sigma_data 0.5), N = 18 Karras
levels (rho 7), Heun steps of the teacher's ODE, the student initialised from the teacher
(`finetune`), the target the online network itself (their code calls the CD loss without target
parameters: mu = 0), RAdam lr 4e-4 with a linear warmup over 10M images, no gradient clipping,
batch 512, 800k steps, EMA 0.9999, dropout 0; one-step sampling, and two steps through
sigma = 0.821 (t = 0.5678 on this VE SDE, as the paper's CIFAR-10 two-step sampling).

Expected (Song et al. 2023, Table 2, CIFAR-10, CD with LPIPS): FID 3.55 in one step, 2.93 in two
(CT with LPIPS: 8.70, 5.83). Not measured with this codebase.

Differences: LPIPS needs VGG weights this project cannot ship, so the distance is iCT's
pseudo-Huber (training.cd_distance; "l2" is the other choice), which changes the numbers to
expect. The teacher and student network here is EDM's DDPM++ of experiments/edm_cifar.py (so
the student starts from the teacher); the paper's is score_sde's NCSN++ with a residual input
pyramid and Fourier embedding, trained EDM-style in their JAX codebase.
"""

from experiments import edm_cifar, vp_cifar


def get_config(arg: str | None = None):
    config = edm_cifar.get_config()
    config.model.parameterization = "consistency"
    config.model.dropout = 0.0
    config.model.ema_rate = 0.9999
    config.model.ema_warmup = False
    config.training.loss = "consistency_distillation"
    config.training.teacher_workdir = "runs/edm_cifar"
    config.training.cd_levels = 18
    config.training.cd_solver = "heun"
    config.training.cd_distance = "pseudo_huber"   # LPIPS is not available (docstring)
    config.training.target_ema = 0.0
    config.training.eps = 0.0                      # the boundary sigma(0) = 0.002
    config.training.batch_size = 512
    config.training.n_iters = 800_001
    config.optim.optimizer = "radam"
    config.optim.lr = 4e-4
    config.optim.warmup = 10_000_000 // 512
    config.optim.grad_clip = 0.0
    config.sampling.method = "consistency"
    config.sampling.times = "1.0"                  # one step; "1.0,0.5678" for two
    config.sampling.steps = 0
    config.sampling.rho = 7.0
    if arg == "smoke":    # distils the teacher in training.teacher_workdir (a smoke run of it)
        return vp_cifar.smoke(config)
    return vp_cifar._no_variant(config, arg, variants=("smoke",))
