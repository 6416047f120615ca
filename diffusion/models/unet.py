"""A small DDPM-style U-Net (Ho et al. 2020, appendix B; the "DDPM" model of score_sde)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion.models.layers import (
    AttnBlock,
    Downsample,
    ResnetBlock,
    Upsample,
    check_image_input,
    conv3x3,
    default_init,
    group_norm,
    label_embedding,
    noise_embedding,
    rematerialized,
)

Array = jax.Array


class UNet(nn.Module):
    """DDPM U-Net: ResNet blocks at len(ch_mult) resolutions, self-attention at some of them.

    Layout: noise embedding (B, 4 ch) = Dense(SiLU(Dense(embed(t)))) [+ label embedding];
    conv3x3 to ch channels; per level i, num_res_blocks ResNet blocks with ch * ch_mult[i]
    channels (+ attention where the feature map is attn_resolutions pixels high), then a
    downsampling except at the last level; middle ResNet-attention-ResNet; the mirror image going
    up with num_res_blocks + 1 blocks per level, each fed the concatenation with the matching
    down-path activation; GroupNorm, SiLU and a zero-initialised conv3x3 to the input channels.

    8x8 digits: ch_mult=(1, 2), attn_resolutions=(4,). 32x32 CIFAR-10 (DDPM, 35.7M parameters
    at ch=128): ch_mult=(1, 2, 2, 2), attn_resolutions=(16,).

    Attributes:
      ch: base channel count.
      ch_mult: channel multiplier per resolution; the image is halved len(ch_mult) - 1 times.
      num_res_blocks: ResNet blocks per resolution on the way down.
      attn_resolutions: feature-map heights (pixels) at which self-attention is applied.
      dropout: dropout rate inside the ResNet blocks (train=True only).
      embedding: "sinusoidal" (for t = 999 * time) | "fourier" (for t = log sigma).
      fourier_scale: std of the random Fourier frequencies.
      num_classes: if set, y (B,) int labels in [0, num_classes] (num_classes = null label for
        classifier-free guidance; y=None means all null) are embedded and added to the noise
        embedding; if None, y is ignored.
      skip_rescale: divide residual sums by sqrt(2) (NCSN++ / DDPM++).
      resamp_with_conv: strided conv / conv after nearest upsampling, else average pooling /
        plain nearest upsampling.
      remat: recompute each ResNet / attention block's activations in the backward pass
        (`layers.rematerialized`): less memory, about one more forward pass; same parameters.
      learn_sigma: 2C output channels, the second C a learned variance (Nichol & Dhariwal 2021;
        `parameterization.ScoreModel`).

    The network computes in the dtype of x (float32, or bfloat16 under mixed precision, see
    `parameterization.make_score_model`); the noise embedding is formed in float32 first.
    """

    ch: int = 64
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    embedding: str = "sinusoidal"
    fourier_scale: float = 16.0
    num_classes: int | None = None
    skip_rescale: bool = False
    resamp_with_conv: bool = True
    remat: bool = False
    learn_sigma: bool = False

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array | None = None, train: bool = False) -> Array:
        """x (B, H, W, C), t (B,) noise conditioning, y (B,) int labels or None -> (B, H, W, C)
        ((B, H, W, 2C) with learn_sigma).

        H and W must be divisible by 2 ** (len(ch_mult) - 1).
        """
        check_image_input("UNet", x, self.ch_mult)
        temb = noise_embedding(self.embedding, t, self.ch, self.fourier_scale).astype(x.dtype)
        temb = nn.Dense(4 * self.ch, kernel_init=default_init())(temb)
        temb = nn.Dense(4 * self.ch, kernel_init=default_init())(nn.silu(temb))
        if self.num_classes is not None:
            temb = temb + label_embedding(y, self.num_classes, 4 * self.ch, x.shape[0])

        resnet_cls = rematerialized(ResnetBlock, (3,)) if self.remat else ResnetBlock
        attn_cls = rematerialized(AttnBlock) if self.remat else AttnBlock

        def resnet(h, channels):
            block = resnet_cls(channels, dropout=self.dropout, skip_rescale=self.skip_rescale)
            return block(h, temb, train)

        def maybe_attend(h):
            attend = h.shape[1] in self.attn_resolutions
            return attn_cls(skip_rescale=self.skip_rescale)(h) if attend else h

        # Down path; every activation in `skips` feeds one up-path block.
        h = conv3x3(self.ch)(x)
        skips = [h]
        for level, mult in enumerate(self.ch_mult):
            for _ in range(self.num_res_blocks):
                h = maybe_attend(resnet(h, self.ch * mult))
                skips.append(h)
            if level != len(self.ch_mult) - 1:
                h = Downsample(self.resamp_with_conv)(h)
                skips.append(h)

        # Middle.
        h = resnet(h, h.shape[-1])
        h = attn_cls(skip_rescale=self.skip_rescale)(h)
        h = resnet(h, h.shape[-1])

        # Up path.
        for level, mult in reversed(list(enumerate(self.ch_mult))):
            for _ in range(self.num_res_blocks + 1):
                h = resnet(jnp.concatenate([h, skips.pop()], axis=-1), self.ch * mult)
                h = maybe_attend(h)
            if level != 0:
                h = Upsample(self.resamp_with_conv)(h)

        h = nn.silu(group_norm(h))
        return conv3x3(x.shape[-1] * (2 if self.learn_sigma else 1), init_scale=0.0)(h)
