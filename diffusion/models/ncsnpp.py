"""NCSN++ and DDPM++ score networks (Song et al. 2021, "Score-Based Generative Modeling through
Stochastic Differential Equations", section 4.4 and appendix H).

One class, `NCSNpp`, covers both: DDPM++ is NCSN++ without FIR resampling, without the
progressive input / output pyramids and with a positional (rather than random Fourier) noise
embedding. The options and their names follow the `config.model` keys of the score_sde code:

    resblock_type      "ddpm" (resample with separate layers) | "biggan" (resample inside blocks)
    fir                FIR (StyleGAN2 upfirdn2d) resampling with `fir_kernel`, else nearest / avg
    progressive        output pyramid: "none" | "output_skip" | "residual"
    progressive_input  input pyramid: "none" | "input_skip" | "residual"
    progressive_combine  how "input_skip" joins the pyramid: "sum" | "cat"
    embedding_type     "positional" (sinusoidal of t) | "fourier" (Gaussian Fourier features of t)

The paper's CIFAR-10 models (score_sde configs `vp/cifar10_ddpmpp_continuous.py`,
`vp/cifar10_ddpmpp_deep_continuous.py`, `ve/cifar10_ncsnpp_continuous.py`,
`ve/cifar10_ncsnpp_deep_continuous.py`) are in `PRESETS`; all have nf=128, ch_mult=(1, 2, 2, 2),
attn_resolutions=(16,), dropout=0.1, resamp_with_conv, skip_rescale, BigGAN blocks, init_scale 0:

    preset              num_res_blocks  fir    progressive  progressive_input  embedding_type
    ddpmpp_cont         4               False  none         none               positional
    ddpmpp_deep_cont    8               False  none         none               positional
    ncsnpp_cont         4               True   none         residual           fourier
    ncsnpp_deep_cont    8               True   none         residual           fourier

Inputs are taken as given: centring / scaling of x, the choice of t (e.g. 999 * time for the
positional embedding, log sigma for the Fourier one) and any division by sigma (score_sde's
`scale_by_sigma`) are the score model's (`parameterization.ScoreModel`). Parameters are named so
that a score_sde checkpoint maps onto them one to one (`diffusion/compat/score_sde.py`).

Shapes: x (B, H, W, C) NHWC, t (B,), optional labels y (B,) int; output (B, H, W, C).
"""

from __future__ import annotations

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion.models.fir import FIRConv as FIRConv
from diffusion.models.fir import fir_downsample as fir_downsample
from diffusion.models.fir import fir_kernel_2d as fir_kernel_2d
from diffusion.models.fir import fir_upsample as fir_upsample
from diffusion.models.layers import (
    AttnBlock,
    GaussianFourierProjection,
    ResnetBlock,
    check_image_input,
    conv3x3,
    default_init,
    group_norm,
    label_embedding,
    naive_downsample,
    naive_upsample,
    rematerialized,
    sinusoidal_embedding,
)

Array = jax.Array

RESBLOCK_TYPES = ("ddpm", "biggan")
PROGRESSIVE = ("none", "output_skip", "residual")
PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
PROGRESSIVE_COMBINE = ("sum", "cat")
EMBEDDING_TYPES = ("positional", "fourier")

_COMMON = dict(nf=128, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,), dropout=0.1,
               resamp_with_conv=True, fir_kernel=(1, 3, 3, 1), skip_rescale=True,
               resblock_type="biggan", progressive_combine="sum", init_scale=0.0,
               fourier_scale=16.0, conditional=True)

# The values of score_sde's configs (`configs/default_cifar10_configs.py` for dropout 0.1, and
# `vp|subvp/cifar10_ddpmpp[_deep]_continuous.py`, `ve/cifar10_ncsnpp[_deep]_continuous.py`);
# tests/test_paper_configs.py checks them key by key.
PRESETS: dict[str, dict] = {
    "ddpmpp_cont": dict(_COMMON, num_res_blocks=4, fir=False, progressive="none",
                        progressive_input="none", embedding_type="positional"),
    "ddpmpp_deep_cont": dict(_COMMON, num_res_blocks=8, fir=False, progressive="none",
                             progressive_input="none", embedding_type="positional"),
    "ncsnpp_cont": dict(_COMMON, num_res_blocks=4, fir=True, progressive="none",
                        progressive_input="residual", embedding_type="fourier"),
    "ncsnpp_deep_cont": dict(_COMMON, num_res_blocks=8, fir=True, progressive="none",
                             progressive_input="residual", embedding_type="fourier"),
}


def _conv1x1(features: int, init_scale: float = 1.0, name: str | None = None) -> nn.Conv:
    return nn.Conv(features, (1, 1), kernel_init=default_init(init_scale), name=name)


# ----------------------------------------------------------------------------- layers


class FIRUpsample(nn.Module):
    """x2 upsampling of NCSN++: FIR (`fir`, with a fused 3x3 conv if `with_conv`) or nearest
    (then a 3x3 conv if `with_conv`), to `out_ch` channels.

    Unlike `layers.Upsample` (DDPM's U-Net: nearest, channels kept) it can filter with the FIR
    kernel and change the channel count. NCSNpp names its instances `Upsample_<i>`, the names of
    score_sde's layerspp.Upsample, so checkpoints map onto them (`compat/score_sde.py`).
    """

    out_ch: int | None = None
    with_conv: bool = False
    fir: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x (B, H, W, C) -> (B, 2H, 2W, out_ch or C); without conv the channels stay C."""
        out_ch = self.out_ch or x.shape[-1]
        if self.fir:
            if self.with_conv:
                return FIRConv(out_ch, up=True, fir_kernel=self.fir_kernel)(x)
            return fir_upsample(x, self.fir_kernel)
        h = naive_upsample(x)
        return conv3x3(out_ch)(h) if self.with_conv else h


class FIRDownsample(nn.Module):
    """/2 downsampling of NCSN++: FIR (`fir`, then a fused 3x3 conv if `with_conv`) or a
    stride-2 3x3 conv (`with_conv`) / 2x2 average pooling, to `out_ch` channels.

    Unlike `layers.Downsample` (DDPM's U-Net: channels kept) it can filter with the FIR kernel and
    change the channel count. NCSNpp names its instances `Downsample_<i>`, the names of score_sde's
    layerspp.Downsample, so checkpoints map onto them (`compat/score_sde.py`).
    """

    out_ch: int | None = None
    with_conv: bool = False
    fir: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x (B, H, W, C) -> (B, H/2, W/2, out_ch or C); without conv the channels stay C."""
        out_ch = self.out_ch or x.shape[-1]
        if self.fir:
            if self.with_conv:
                return FIRConv(out_ch, down=True, fir_kernel=self.fir_kernel)(x)
            return fir_downsample(x, self.fir_kernel)
        return conv3x3(out_ch, stride=2)(x) if self.with_conv else naive_downsample(x)


class Combine(nn.Module):
    """Joins a pyramid image with features: 1x1 conv of the pyramid to h's channels, then sum
    or concatenation ("cat" doubles the channels)."""

    method: str = "cat"

    @nn.compact
    def __call__(self, pyramid: Array, h: Array) -> Array:
        """pyramid (B, H, W, C'), h (B, H, W, C) -> (B, H, W, C) ("sum") or (B, H, W, 2C)."""
        p = _conv1x1(h.shape[-1])(pyramid)
        if self.method == "cat":
            return jnp.concatenate([p, h], axis=-1)
        if self.method == "sum":
            return p + h
        raise ValueError(f"Unknown progressive_combine {self.method!r}: must be one of "
                         f"{list(PROGRESSIVE_COMBINE)}.")


class ResnetBlockBigGAN(nn.Module):
    """BigGAN-style residual block, optionally resampling (x2 up or /2 down) inside the block.

    h = GN -> SiLU -> [resample] -> conv3x3 -> + Dense(SiLU(temb)) -> GN -> SiLU -> dropout ->
    conv3x3 (init_scale); skip = [resample] x, then a 1x1 conv if the channels change or the block
    resamples; out = (skip + h) / sqrt(2) if skip_rescale. Resampling is FIR (`fir`) or
    nearest / 2x2 average pooling.
    """

    out_ch: int | None = None
    up: bool = False
    down: bool = False
    dropout: float = 0.1
    fir: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    skip_rescale: bool = True
    init_scale: float = 0.0

    @nn.compact
    def __call__(self, x: Array, temb: Array | None = None, train: bool = False) -> Array:
        """x (B, H, W, C), temb (B, E) or None -> (B, H', W', out_ch), H' = 2H, H / 2 or H."""
        channels = x.shape[-1]
        out_ch = self.out_ch or channels
        h = nn.silu(group_norm(x))
        if self.up:
            resample = ((lambda a: fir_upsample(a, self.fir_kernel)) if self.fir
                        else naive_upsample)
        elif self.down:
            resample = ((lambda a: fir_downsample(a, self.fir_kernel)) if self.fir
                        else naive_downsample)
        else:
            resample = None
        if resample is not None:
            h, x = resample(h), resample(x)
        h = conv3x3(out_ch)(h)
        if temb is not None:
            h = h + nn.Dense(out_ch, kernel_init=default_init())(nn.silu(temb))[:, None, None, :]
        h = nn.silu(group_norm(h))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = conv3x3(out_ch, init_scale=self.init_scale)(h)
        if channels != out_ch or resample is not None:
            x = _conv1x1(out_ch, name="skip")(x)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


# ----------------------------------------------------------------------------- network


class NCSNpp(nn.Module):
    """NCSN++ / DDPM++ U-Net (Song et al. 2021); see the module docstring for the options.

    Layout: noise embedding of t ("positional": sinusoidal, nf dims; "fourier": Gaussian Fourier
    features, 2 nf dims as score_sde), then Dense -> SiLU -> Dense to 4 nf (if `conditional`),
    plus a label embedding when `num_classes` is set. conv3x3 to nf; per level i,
    num_res_blocks residual blocks with nf * ch_mult[i] channels, each followed by attention at
    attn_resolutions, then (except at the last level) a downsampling (FIRDownsample layer for
    "ddpm" blocks, a down BigGAN block for "biggan"), joined by the input pyramid if any. Middle
    block-attention-block. Up path: per level num_res_blocks + 1 blocks on the concatenation
    with the matching down activation, attention once at attn_resolutions, the output pyramid,
    then upsampling. Output: the output_skip pyramid, or GN -> SiLU -> conv3x3 (init_scale).

    Attributes: named as score_sde's config.model keys (see the module docstring).
      num_classes: if set, y (B,) int labels in [0, num_classes] (num_classes is the null label;
        y=None means all null) are embedded and added to the noise embedding.
      remat: recompute each residual / attention block's activations in the backward pass
        (`layers.rematerialized`): less memory for about one more forward pass; the parameters
        are the same with or without it.
      learn_sigma: 2C output channels, the second C a learned variance (`ScoreModel`).

    The network computes in the dtype of x (float32, or bfloat16 under mixed precision, see
    `parameterization.make_score_model`); the noise embedding is formed in float32 first.
    """

    nf: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    fir: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    skip_rescale: bool = True
    resblock_type: str = "biggan"
    progressive: str = "none"
    progressive_input: str = "none"
    progressive_combine: str = "sum"
    embedding_type: str = "positional"
    fourier_scale: float = 16.0
    init_scale: float = 0.0
    conditional: bool = True
    num_classes: int | None = None
    remat: bool = False
    learn_sigma: bool = False

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array | None = None, train: bool = False) -> Array:
        """x (B, H, W, C), t (B,) noise conditioning, y (B,) int labels or None -> (B, H, W, C)
        ((B, H, W, 2C) with learn_sigma).

        H and W must be divisible by 2 ** (len(ch_mult) - 1).
        """
        self._check(x)
        nf, num_levels = self.nf, len(self.ch_mult)
        fir = dict(fir=self.fir, fir_kernel=tuple(self.fir_kernel))

        temb = None
        if self.conditional:
            if self.embedding_type == "fourier":
                temb = GaussianFourierProjection(embed_dim=2 * nf, scale=self.fourier_scale)(t)
            else:
                temb = sinusoidal_embedding(t, nf)
            temb = temb.astype(x.dtype)   # formed in float32, then the network's dtype
            temb = nn.Dense(4 * nf, kernel_init=default_init())(temb)
            temb = nn.Dense(4 * nf, kernel_init=default_init())(nn.silu(temb))
        if self.num_classes is not None:
            labels = label_embedding(y, self.num_classes, 4 * nf, x.shape[0])
            temb = labels if temb is None else temb + labels

        def block_class(cls, static_argnums=()):
            return rematerialized(cls, static_argnums) if self.remat else cls

        def resnet(h, out_ch=None, up=False, down=False):
            common = dict(dropout=self.dropout, skip_rescale=self.skip_rescale,
                          init_scale=self.init_scale)
            if self.resblock_type == "ddpm":
                block = block_class(ResnetBlock, (3,))(out_ch, **common)
            else:
                block = block_class(ResnetBlockBigGAN, (3,))(out_ch, up=up, down=down, **common,
                                                             **fir)
            return block(h, temb, train)

        def attend(h):
            attn = block_class(AttnBlock)
            return attn(skip_rescale=self.skip_rescale, init_scale=self.init_scale)(h)

        def rescaled_sum(a, b):
            return (a + b) / math.sqrt(2.0) if self.skip_rescale else a + b

        # Named "Upsample_<i>" / "Downsample_<i>" in call order (what flax would call classes of
        # those names), as in score_sde's checkpoints; parameterless instances take a number too.
        up_index, down_index = itertools.count(), itertools.count()

        def upsample(h, out_ch=None, with_conv=False):
            return FIRUpsample(out_ch, with_conv=with_conv, **fir,
                               name=f"Upsample_{next(up_index)}")(h)

        def downsample(h, out_ch=None, with_conv=False):
            return FIRDownsample(out_ch, with_conv=with_conv, **fir,
                                 name=f"Downsample_{next(down_index)}")(h)

        # Down path; every activation in `hs` feeds one up-path block.
        input_pyramid = x if self.progressive_input != "none" else None
        hs = [conv3x3(nf)(x)]
        for level in range(num_levels):
            for _ in range(self.num_res_blocks):
                h = resnet(hs[-1], nf * self.ch_mult[level])
                if h.shape[1] in self.attn_resolutions:
                    h = attend(h)
                hs.append(h)
            if level != num_levels - 1:
                if self.resblock_type == "ddpm":
                    h = downsample(hs[-1], with_conv=self.resamp_with_conv)
                else:
                    h = resnet(hs[-1], down=True)
                if self.progressive_input == "input_skip":
                    input_pyramid = downsample(input_pyramid)
                    h = Combine(self.progressive_combine)(input_pyramid, h)
                elif self.progressive_input == "residual":
                    input_pyramid = downsample(input_pyramid, h.shape[-1], with_conv=True)
                    h = input_pyramid = rescaled_sum(input_pyramid, h)
                hs.append(h)

        # Middle.
        h = resnet(hs[-1])
        h = attend(h)
        h = resnet(h)

        # Up path.
        out_channels = x.shape[-1] * (2 if self.learn_sigma else 1)
        pyramid = None
        for level in reversed(range(num_levels)):
            for _ in range(self.num_res_blocks + 1):
                h = resnet(jnp.concatenate([h, hs.pop()], axis=-1), nf * self.ch_mult[level])
            if h.shape[1] in self.attn_resolutions:
                h = attend(h)

            if self.progressive == "output_skip":
                out = conv3x3(out_channels, init_scale=self.init_scale)(nn.silu(group_norm(h)))
                if pyramid is None:
                    pyramid = out
                else:
                    pyramid = upsample(pyramid) + out
            elif self.progressive == "residual":
                if pyramid is None:
                    pyramid = conv3x3(h.shape[-1])(nn.silu(group_norm(h)))
                else:
                    pyramid = upsample(pyramid, h.shape[-1], with_conv=True)
                    h = pyramid = rescaled_sum(pyramid, h)

            if level != 0:
                if self.resblock_type == "ddpm":
                    h = upsample(h, with_conv=self.resamp_with_conv)
                else:
                    h = resnet(h, up=True)
        assert not hs

        if self.progressive == "output_skip":
            return pyramid
        h = nn.silu(group_norm(h))
        return conv3x3(out_channels, init_scale=self.init_scale)(h)

    def _check(self, x: Array) -> None:
        for value, allowed, key in ((self.resblock_type, RESBLOCK_TYPES, "resblock_type"),
                                    (self.progressive, PROGRESSIVE, "progressive"),
                                    (self.progressive_input, PROGRESSIVE_INPUT,
                                     "progressive_input"),
                                    (self.progressive_combine, PROGRESSIVE_COMBINE,
                                     "progressive_combine"),
                                    (self.embedding_type, EMBEDDING_TYPES, "embedding_type")):
            if value not in allowed:
                raise ValueError(f"Unknown {key} {value!r}: must be one of {list(allowed)}.")
        check_image_input("NCSNpp", x, self.ch_mult)
