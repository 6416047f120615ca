"""A 2-D Gaussian mixture learned by a small MLP score network with the VP SDE.

The data's density and score are known exactly (`diffusion.data.gmm_params`), so this is the
experiment to check a change to an SDE, loss or sampler by eye and by number.

    python scripts/run.py --config experiments/toy_2d.py --workdir runs/toy_2d
    python scripts/run.py --config experiments/toy_2d.py --workdir runs/toy_2d --mode sample

Training (20,000 steps of batch 512) takes about 3 minutes on 2 CPU cores; `--mode sample` writes
runs/toy_2d/samples/step_20000.png, a scatter plot of 5,000 samples beside the data, and the .npz.
Other toys: --config.data.dataset=moons or swiss_roll. Smoke variant: experiments/toy_2d.py:smoke.
The MLP conditions every layer on the noise level (363k parameters at hidden 256);
--config.model.embed_at=input --config.model.embed_dim=16 feeds the embedding to the first layer
only (137k parameters; the conditioning of diffusionjax's and sbgm's MLPs, used by
benchmarks/peers.py), and --config.model.activation=relu swaps SiLU for ReLU.
"""

from experiments import default


def get_config(arg: str | None = None):
    config = default.get_default_config()
    config.data.dataset = "gmm"
    config.data.image_size = 0
    config.data.num_channels = 0
    config.data.random_flip = False

    config.model.name = "mlp"
    config.model.hidden = 256
    config.model.n_layers = 3
    config.model.ema_rate = 0.999
    config.model.ema_warmup = True        # our option: short run, keep the EMA off the init

    config.training.batch_size = 512
    config.training.n_iters = 20_000
    config.training.snapshot_freq = 5000
    config.training.log_freq = 500
    config.training.eval_freq = 5000
    config.training.reduce_mean = True

    config.optim.lr = 1e-3
    config.optim.warmup = 500

    config.sampling.batch_size = 5000
    config.sampling.num_samples = 5000
    config.eval.batch_size = 1000
    config.eval.num_batches = 10
    config.eval.bpd_divergence = "exact"      # 2-D: the Jacobian trace costs two JVPs
    config.eval.bpd_num_batches = 2

    if arg == "smoke":
        config.model.hidden = 32
        config.training.batch_size = 64
        config.training.n_iters = 4
        config.training.snapshot_freq = 2
        config.training.log_freq = 2
        config.training.eval_freq = 4
        config.sde.N = 25   # > beta_max: a DDPM chain for the reverse-diffusion steps
        config.sampling.batch_size = 64
        config.sampling.num_samples = 64
        config.eval.batch_size = 64
        config.eval.num_batches = 1
        config.eval.likelihood_rtol = config.eval.likelihood_atol = 1e-3  # a quick solve
    elif arg:
        raise ValueError(f"Unknown variant {arg!r} of experiments/toy_2d.py; use ':smoke' or none.")
    return config
