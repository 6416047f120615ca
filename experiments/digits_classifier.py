"""Classifiers of the embedded 8x8 digits: a noise-conditional one for classifier guidance, and
one of clean digits that judges class-conditional samples.

Noise-conditional (default): p_t(y | x_t) for x_t = alpha(t) x_0 + sigma(t) z under the digits
experiment's VP-SDE, t ~ U(1e-5, 1) (Song et al. 2021, app. I.1); the encoder half of the
digits U-Net (`models/classifier.py`). Guide the unconditional digits model with it:

    python scripts/run.py --config experiments/digits_classifier.py --workdir runs/digits_clf
    python scripts/run.py --config experiments/digits.py --workdir runs/digits --mode sample \
        --config.sampling.labels=all --config.sampling.guidance=classifier \
        --config.sampling.guidance_weight=1 --config.sampling.classifier_workdir=runs/digits_clf

Clean (`:clean`): trained on the digits themselves (t = 0), the judge in
`benchmarks/guidance_digits.py`. `--mode eval` reports the accuracy on the eval split (at t = 0,
and for the noise-conditional one also at t = 0.1, 0.25 and 0.5). Smoke variants: `:smoke`,
`:clean_smoke`.
"""

from experiments import digits


def get_config(arg: str | None = None):
    variants = (None, "", "clean", "smoke", "clean_smoke")
    if arg not in variants:
        raise ValueError(f"Unknown variant {arg!r} of experiments/digits_classifier.py; use one "
                         f"of {variants[2:]} or none.")
    smoke = arg in ("smoke", "clean_smoke")
    config = digits.get_config("smoke" if smoke else None)
    model = config.model
    model.name = "classifier"
    for key in ("attn_resolutions",):       # U-Net fields the classifier does not have
        del model[key]
    model.num_classes = 10
    model.ch = 32 if not smoke else 8
    model.ch_mult = (1, 2)
    model.num_res_blocks = 2 if not smoke else 1
    model.dropout = 0.1
    model.noise_conditional = arg not in ("clean", "clean_smoke")
    model.ema_rate = 0.999
    config.training.snapshot_sampling = False
    config.training.n_iters = 1000 if not smoke else 4
    config.training.snapshot_freq = 500 if not smoke else 2
    config.training.eval_freq = 500 if not smoke else 4
    config.optim.lr = 2e-3
    config.optim.warmup = 100
    config.eval.enable_bpd = False
    config.eval.enable_fid = False
    return config
