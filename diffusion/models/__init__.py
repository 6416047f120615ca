"""Flax (linen) score networks and the wrappers that turn them into a score function.

    net = get_model(config)                                  # chosen by config.model.name
    variables = net.init(key, x, t, train=False)             # x (B, H, W, C) or (B, D), t (B,)
    out = net.apply(variables, x, t, train=True, rngs={"dropout": key})   # shaped like x
    score_model = get_score_model(config)      # network + SDE + parameterisation of a config
    s = score_model(params, x, t, y=None, train=False, rng=None)          # the score, like x
    score_fn = score_fn_from_model(score_model, variables["params"])     # score_fn(x, t)
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from diffusion import sde as sde_lib

from .classifier import NoiseConditionalClassifier as NoiseConditionalClassifier
from .layers import AttnBlock as AttnBlock
from .layers import Downsample as Downsample
from .layers import GaussianFourierProjection as GaussianFourierProjection
from .layers import ResnetBlock as ResnetBlock
from .layers import Upsample as Upsample
from .layers import sinusoidal_embedding as sinusoidal_embedding
from .mlp import MLP as MLP
from .ncsnpp import NCSNpp as NCSNpp
from .parameterization import NOISE_INPUTS as NOISE_INPUTS
from .parameterization import PARAMETERIZATIONS as PARAMETERIZATIONS
from .parameterization import ScoreModel as ScoreModel
from .parameterization import make_score_model as make_score_model
from .parameterization import score_fn_from_model as score_fn_from_model
from .unet import UNet as UNet

MODELS: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "unet": UNet,
    "ncsnpp": NCSNpp,
    "ddpmpp": NCSNpp,
}
# Networks that are not score networks: the noise-conditional classifier of classifier guidance.
CLASSIFIERS: dict[str, type[nn.Module]] = {"classifier": NoiseConditionalClassifier}
NETWORKS = {**MODELS, **CLASSIFIERS}


# config.model keys that are not network fields: read by get_score_model and the training loop.
SHARED_KEYS = ("name", "ema_rate", "ema_warmup", "parameterization", "noise_input", "scale_input",
               "scale_by_sigma", "label_dropout")
# Network fields with a shared default in every config (diffusion/defaults.py), passed to the
# networks that have them; `experiment.check_config` refuses a changed value for one that does not.
OPTIONAL_FIELDS = ("num_classes", "remat")


def network_fields(cls: type[nn.Module]) -> set[str]:
    """The constructor fields of a network class (what config.model may set for it)."""
    return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


def get_model(config) -> nn.Module:
    """The network named by `config.model.name`, built from the keys of `config.model`.

    Every key of the block is one of SHARED_KEYS, one of OPTIONAL_FIELDS or a field of the
    chosen class; any other key (a misspelt field, or one of another network) is a ValueError
    naming it and the valid fields. Lists become tuples.
    """
    name = config.model.name
    if name not in NETWORKS:
        raise ValueError(f"Unknown model {name!r}: config.model.name must be one of "
                         f"{sorted(NETWORKS)}.")
    cls = NETWORKS[name]
    fields = network_fields(cls)
    unknown = sorted(k for k in config.model
                     if k not in fields and k not in SHARED_KEYS + OPTIONAL_FIELDS)
    if unknown:
        raise ValueError(f"config.model has keys that network {name!r} ({cls.__name__}) does not "
                         f"take: {unknown}. Its fields are {sorted(fields)}; the shared keys "
                         f"are {list(SHARED_KEYS)}.")
    kwargs = {k: tuple(v) if isinstance(v, list) else v
              for k, v in config.model.items() if k in fields}
    return cls(**kwargs)


def get_score_model(config) -> ScoreModel:
    """The score model of `config`: the one place where network, SDE, parameterisation, noise
    conditioning and network input come together (training, sampling, evaluation and the
    score_sde converter all use it).

    Reads config.model (name and network fields, parameterization, noise_input, scale_input,
    scale_by_sigma), config.sde, config.training.continuous, config.data.centered (images in
    [0, 1] are fed to the network as 2 x - 1, as score_sde's networks do) and data.sigma_data
    (the "edm" parameterization). Computes in float32;
    `dataclasses.replace(score_model, compute_dtype="bfloat16")` gives the mixed-precision one.

        score_model = get_score_model(config)
        s = score_model(params, x, t, y=None, train=False, rng=None)    # the score, like x
    """
    m = config.model
    return make_score_model(
        get_model(config), sde_lib.get_sde(**config.sde), m.parameterization, m.noise_input,
        m.scale_input, scale_by_sigma=m.get("scale_by_sigma", False),
        center_input=not config.data.centered, continuous=config.training.continuous,
        sigma_data=config.data.get("sigma_data", 0.5))
