"""Class-conditional digits for classifier-free guidance (Ho & Salimans 2022).

The embedded default (`experiments/digits.py`: the 8x8 scikit-learn digits, a VP-SDE, the small
U-Net) with a label embedding (`model.num_classes = 10`, plus the null label 10) and labels
dropped to the null label with probability 0.1 during training, so that one network learns both
s(x, t, y) and s(x, t). Sample a class, guided with weight w:

    python scripts/run.py --config experiments/digits_cond.py --workdir runs/digits_cond
    python scripts/run.py --config experiments/digits_cond.py --workdir runs/digits_cond \
        --mode sample --config.sampling.labels=all --config.sampling.guidance=cfg \
        --config.sampling.guidance_weight=3 --config.sampling.method=dpm_solver \
        --config.sampling.steps=20

writes runs/digits_cond/samples/cfg_w3_step_<N>.npz (samples and labels) and a PNG with one row
per class. Smoke variant: experiments/digits_cond.py:smoke.
"""

from experiments import digits


def get_config(arg: str | None = None):
    config = digits.get_config("smoke" if arg == "smoke" else None)
    if arg not in (None, "", "smoke"):
        raise ValueError(f"Unknown variant {arg!r} of experiments/digits_cond.py; use ':smoke' "
                         f"or none.")
    config.model.num_classes = 10
    config.model.label_dropout = 0.1     # Ho & Salimans use 0.1 / 0.2
    config.sampling.labels = "all"       # snapshots and --mode sample: 0..9 in turn
    return config
