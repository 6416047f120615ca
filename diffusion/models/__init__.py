"""Flax (linen) score networks and the wrappers that turn them into a score function.

    net = build_network("unet", {"ch": 32})                   # a network by name and fields
    net = get_model(config)                                  # chosen by config.model.name
    variables = net.init(key, x, t, train=False)             # x (B, H, W, C) or (B, D), t (B,)
    out = net.apply(variables, x, t, train=True, rngs={"dropout": key})   # shaped like x
    score_model = get_score_model(config)      # network + SDE + parameterisation of a config
    s = score_model(params, x, t, y=None, train=False, rng=None)          # the score, like x
    score_fn = score_fn_from_model(score_model, variables["params"])     # score_fn(x, t)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from .classifier import NoiseConditionalClassifier as NoiseConditionalClassifier
from .dit import DiT as DiT
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
from .uvit import UViT as UViT

MODELS: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "unet": UNet,
    "ncsnpp": NCSNpp,
    "ddpmpp": NCSNpp,
    "dit": DiT,
    "uvit": UViT,
}
# Networks that are not score networks: the noise-conditional classifier of classifier guidance.
CLASSIFIERS: dict[str, type[nn.Module]] = {"classifier": NoiseConditionalClassifier}
NETWORKS = {**MODELS, **CLASSIFIERS}


# config.model keys that are not network fields: read by the score model and the training loop.
SHARED_KEYS = ("name", "ema_rate", "ema_warmup", "parameterization", "noise_input", "scale_input",
               "scale_by_sigma", "label_dropout", "learn_variance")
# Network fields with a shared default in every config (diffusion/defaults.py), passed to the
# networks that have them; `config_checks.check_config` refuses a changed value for one that
# does not.
OPTIONAL_FIELDS = ("num_classes", "remat")


def network_fields(cls: type[nn.Module]) -> set[str]:
    """The constructor fields of a network class (what config.model may set for it)."""
    return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


def build_network(name: str, fields: Mapping[str, Any]) -> nn.Module:
    """The network called `name` (a config's model.name), built from `fields` (the keys of a
    config's `model` block).

    Every key is one of SHARED_KEYS, one of OPTIONAL_FIELDS or a field of the chosen class; any
    other key (a misspelt field, or one of another network) is a ValueError naming it and the
    valid fields. Lists become tuples. model.learn_variance sets the network's learn_sigma
    (twice the output channels).
    """
    if name not in NETWORKS:
        raise ValueError(f"Unknown model {name!r}: config.model.name must be one of "
                         f"{sorted(NETWORKS)}.")
    cls = NETWORKS[name]
    valid = network_fields(cls)
    unknown = sorted(k for k in fields if k not in valid and k not in SHARED_KEYS + OPTIONAL_FIELDS)
    if unknown:
        raise ValueError(f"config.model has keys that network {name!r} ({cls.__name__}) does not "
                         f"take: {unknown}. Its fields are {sorted(valid)}; the shared keys "
                         f"are {list(SHARED_KEYS)}.")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k in valid}
    if fields.get("learn_sigma") and not fields.get("learn_variance"):
        raise ValueError("Set model.learn_variance=True (not the network field learn_sigma): the "
                         "score model must know that half of the output is a variance.")
    if fields.get("learn_variance"):
        if "learn_sigma" not in valid:
            raise ValueError(f"model.learn_variance needs a network with a variance output; "
                             f"{name!r} ({cls.__name__}) has none.")
        kwargs["learn_sigma"] = True
    return cls(**kwargs)


def get_model(config) -> nn.Module:
    """The network named by `config.model.name`, built from the keys of `config.model`
    (`build_network`; the config is unpacked by `diffusion.experiment.network_of`)."""
    from diffusion import experiment  # the config reader, which imports this package

    return experiment.network_of(config)


def get_score_model(config) -> ScoreModel:
    """The score model of `config`: network, SDE, parameterisation, noise conditioning and
    network input together (`make_score_model`; the config is unpacked by
    `diffusion.experiment.score_model_of`). Computes in float32;
    `dataclasses.replace(score_model, compute_dtype="bfloat16")` gives the mixed-precision one.

        score_model = get_score_model(config)
        s = score_model(params, x, t, y=None, train=False, rng=None)    # the score, like x
    """
    from diffusion import experiment

    return experiment.score_model_of(config)
