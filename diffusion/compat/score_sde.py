"""score_sde checkpoints -> this codebase's parameters and checkpoints.

score_sde (Song et al. 2021, github.com/yang-song/score_sde) saves its training state with flax's
`checkpoints.save_checkpoint`: a file `checkpoint_<N>` holding the msgpack bytes of the state dict
{step, optimizer: {target: params, state}, lr, model_state, ema_rate, params_ema, rng}. Its
NCSN++ / DDPM++ networks (`models/ncsnpp.py`) and ours (`diffusion/models/ncsnpp.py`) create
their layers in the same order, so the parameters correspond one to one after renaming:

    score_sde                           here
    ResnetBlockBigGANpp_<k>/Conv_2      ResnetBlockBigGAN_<k>/skip       (the 1x1 skip conv)
    ResnetBlockDDPMpp_<k>/NIN_0 {W, b}  ResnetBlock_<k>/skip {kernel, bias}   (W as a 1x1 kernel)
    AttnBlockpp_<k>/NIN_0..3 {W, b}     AttnBlock_<k>/q, k, v, proj_out {kernel, bias}
    {Down,Up}sample_<k>/Conv2d_0 {weight, bias}   {Down,Up}sample_<k>/FIRConv_0 {kernel, bias}
    everything else (Conv_<k>, Dense_<k>, GroupNorm_<k>, Combine_<k>, GaussianFourierProjection_0/W)
                                        the same name

The converted tree is checked against the parameters the config's network expects (names and
shapes); a mismatch is one error naming the first differing parameter. What the network does with
its parameters (input 2x - 1, conditioning on 999 t or log sigma, output / sigma) is the config's
score model, `diffusion.models.get_score_model`; `tests/test_score_sde_compat.py` checks that the
two give score_sde's score on its own checkpoints.

    state_dict = load_state_dict("checkpoint_26")
    params = convert(state_dict, config)        # the EMA parameters (params_ema)
    score = models.get_score_model(config)(params, x, t)
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from diffusion import models

_BLOCKS = {"ResnetBlockBigGANpp": "ResnetBlockBigGAN", "ResnetBlockDDPMpp": "ResnetBlock",
           "AttnBlockpp": "AttnBlock"}
_ATTENTION = {"NIN_0": "q", "NIN_1": "k", "NIN_2": "v", "NIN_3": "proj_out"}
_NIN = {"W": "kernel", "b": "bias"}
SUPPORTED_MODELS = ("ncsnpp", "ddpmpp")


class ConversionError(ValueError):
    """A score_sde checkpoint that does not fit the config's network."""


def load_state_dict(path: str) -> dict:
    """The state dict of a score_sde checkpoint file (msgpack bytes), as nested dicts of numpy."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No score_sde checkpoint at {path}: pass the file "
                                f"<workdir>/checkpoints/checkpoint_<N> that score_sde wrote.")
    with open(path, "rb") as f:
        data = f.read()
    try:
        state = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several types on foreign bytes
        raise ConversionError(f"{path} is not a flax msgpack checkpoint ({type(e).__name__}: "
                              f"{str(e)[:200]}); score_sde writes checkpoint_<N> files.") from e
    if not isinstance(state, dict):
        raise ConversionError(f"{path} does not hold a state dict (got {type(state).__name__}).")
    return state


def score_sde_params(state_dict: dict, which: str = "ema") -> dict:
    """The parameter tree of a score_sde state dict: its EMA `params_ema` (which="ema"; falls
    back to `optimizer.target` when absent) or the raw `optimizer.target` (which="raw")."""
    target = (state_dict.get("optimizer") or {}).get("target")
    ema = state_dict.get("params_ema")
    params = (ema if ema is not None else target) if which == "ema" else target
    if not isinstance(params, dict) or not params:
        raise ConversionError(
            f"The state dict has no parameters ({'params_ema or ' if which == 'ema' else ''}"
            f"optimizer.target); its keys are {sorted(state_dict)}. Pass a score_sde "
            f"checkpoint_<N> file.")
    return params


def rename(params: dict) -> dict[tuple[str, ...], np.ndarray]:
    """score_sde's parameter tree -> {path in this codebase's tree: float32 array}."""
    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        new = list(path)
        block = re.fullmatch(r"(\w+?)_(\d+)", path[0])
        kind = block.group(1) if block else None
        if kind in _BLOCKS:
            new[0] = f"{_BLOCKS[kind]}_{block.group(2)}"
        if len(path) == 3:
            module, leaf = path[1], path[2]
            if kind == "ResnetBlockBigGANpp" and module == "Conv_2":
                new[1] = "skip"
            elif kind == "ResnetBlockDDPMpp" and module == "NIN_0":
                new[1:] = ["skip", _NIN[leaf]]
                value = value[None, None] if leaf == "W" else value
            elif kind == "AttnBlockpp" and module in _ATTENTION:
                new[1:] = [_ATTENTION[module], _NIN[leaf]]
            elif kind in ("Downsample", "Upsample") and module == "Conv2d_0":
                new[1:] = ["FIRConv_0", {"weight": "kernel"}.get(leaf, leaf)]
        out[tuple(new)] = np.asarray(value, np.float32)
    return out


def convert(state_dict: dict, config, which: str = "ema") -> dict:
    """A score_sde checkpoint's state dict -> the params `models.get_score_model(config)` takes.

    Args:
      state_dict: `load_state_dict(path)` (or flax's `msgpack_restore` of the file's bytes).
      config: this codebase's config of the same model (e.g. experiments/ve_cifar.py, with the
        checkpoint's width if it is not the paper's).
      which: "ema" (params_ema, score_sde's sampling weights; the default) or "raw"
        (optimizer.target).

    Returns the parameter tree (nested dicts of float32 jax arrays). Raises ConversionError naming
    the first parameter whose name or shape differs from what the config's network expects.
    """
    return _convert_params(score_sde_params(state_dict, which),
                           _expected_shapes(_experiment(config)))


def _convert_params(params: dict, expected) -> dict:
    """Renames score_sde `params` and checks them against the `expected` shape tree."""
    got = rename(params)
    want = {path: leaf.shape for path, leaf in traverse_util.flatten_dict(expected).items()}
    for path in sorted(set(want) | set(got)):
        name = "/".join(path)
        if path not in got:
            raise ConversionError(
                f"The checkpoint has no parameter for {name} {want[path]}, which the config's "
                f"network has: the checkpoint is a different architecture (check model.name, "
                f"num_res_blocks, ch_mult, attn_resolutions, progressive*, fir, embedding_type).")
        if path not in want:
            raise ConversionError(
                f"The checkpoint's parameter {name} {got[path].shape} has no place in the config's "
                f"network: the checkpoint is a different architecture (check model.name, "
                f"num_res_blocks, ch_mult, attn_resolutions, progressive*, fir, embedding_type).")
        if got[path].shape != want[path]:
            raise ConversionError(
                f"Parameter {name}: the checkpoint's shape {got[path].shape} differs from the "
                f"config's {tuple(want[path])} (check model.nf, ch_mult, embedding_type and "
                f"data.num_channels).")
    return traverse_util.unflatten_dict({path: jnp.asarray(v) for path, v in got.items()})


def write_checkpoint(state_dict: dict, config, workdir: str) -> int:
    """Writes a score_sde checkpoint as this codebase's checkpoint into `<workdir>/checkpoints`.

    The EMA parameters become `ema_params` (what sampling and evaluation use), the raw
    `optimizer.target` (or the EMA ones when absent) `params`; the step is score_sde's. The Adam
    moments are not carried over: training on from it starts a fresh optimizer state (with its
    warm-up). Refuses a workdir that already holds a checkpoint. Returns the step written.
    """
    from diffusion import checkpointing, train

    directory = checkpointing.checkpoint_dir(workdir)
    if os.path.isdir(directory) and os.listdir(directory):
        raise FileExistsError(f"{directory} already holds checkpoints; nothing was written. Use "
                              f"a fresh --workdir.")
    exp = _experiment(config)
    expected = _expected_shapes(exp)
    ema = _convert_params(score_sde_params(state_dict, "ema"), expected)
    has_raw = bool((state_dict.get("optimizer") or {}).get("target"))
    raw = _convert_params(score_sde_params(state_dict, "raw"), expected) if has_raw else ema
    step = int(np.asarray(state_dict.get("step", 0)))
    state = train.TrainState(step=jnp.asarray(step, jnp.int32), params=raw, ema_params=ema,
                             opt_state=exp.tx.init(raw))
    manager = checkpointing.make_manager(workdir, max_to_keep=None, async_save=False)
    try:
        checkpointing.save(manager, step, state)
        manager.wait_until_finished()
    finally:
        manager.close()
    return step


def _experiment(config):
    """The config's experiment (`experiment.build`: checked, data not opened); refuses networks
    other than NCSN++ / DDPM++."""
    from diffusion import experiment

    exp = experiment.build(config, shape_only_data=True)
    if not isinstance(exp.net, models.NCSNpp):
        raise ConversionError(f"Converting score_sde checkpoints is supported for the NCSN++ / "
                              f"DDPM++ networks (config.model.name in {list(SUPPORTED_MODELS)}); "
                              f"got {type(exp.net).__name__}.")
    return exp


def _expected_shapes(exp) -> dict:
    """The parameter shapes of the experiment's network (no computation)."""
    x = jnp.zeros((1, *exp.dataset.data_shape), jnp.float32)
    y = jnp.zeros((1,), jnp.int32) if exp.conditional else None
    return jax.eval_shape(lambda k: exp.net.init(k, x, jnp.ones((1,)), y=y)["params"],
                          jax.random.key(0))
