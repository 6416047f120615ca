"""U-ViT: Bao, Nie, Xue, Cao, Li, Su & Zhu, "All are Worth Words: A ViT Backbone for Diffusion
Models" (CVPR 2023), in Flax linen, as the authors' `libs/uvit.py` (baofff/U-ViT).

    net = UViT(**PRESETS["U-ViT-S/2"])                       # CIFAR-10: 44M parameters
    variables = net.init(key, x, t, train=False)             # x (B, H, W, C), t (B,)

Everything is a token: the noise level (its sinusoidal embedding, optionally through an MLP),
the class label (a learned table with a null row) and the p x p patches of the image, plus a
learned position embedding. `depth` pre-LayerNorm ViT blocks (an odd number: (depth - 1) / 2 "in"
blocks, a middle block and as many "out" blocks) are joined by long skip connections: out block
k gets Dense([h, in-block activation]) of the in block at the mirrored depth, as a U-Net's
decoder gets its encoder's features. Then LayerNorm, a Dense to the p p C patch values,
unpatchify and a 3x3 convolution.

The paper counts depth as all blocks (U-ViT-S: 13); its code's `depth` field is one less (12
for U-ViT-S: 6 in blocks, the middle one, 6 out blocks).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion.models.layers import label_embedding, rematerialized
from diffusion.models.transformer import (
    Attention,
    Mlp,
    check_patch_input,
    patchify,
    timestep_embedding,
    torch_linear_init,
    unpatchify,
)

Array = jax.Array

# The paper's Table 1 sizes (depth counts every block), with the patch size of its uses:
# S/2 CIFAR-10 (32x32), S/4 CelebA 64x64, M/4 and L/4 ImageNet 64x64, H/2 ImageNet 256 latents.
PRESETS: dict[str, dict] = {
    "U-ViT-S/2": dict(depth=13, hidden_size=512, num_heads=8, patch_size=2),
    "U-ViT-S/4": dict(depth=13, hidden_size=512, num_heads=8, patch_size=4),
    "U-ViT-S-Deep/2": dict(depth=17, hidden_size=512, num_heads=8, patch_size=2),
    "U-ViT-M/4": dict(depth=17, hidden_size=768, num_heads=12, patch_size=4),
    "U-ViT-L/4": dict(depth=21, hidden_size=1024, num_heads=16, patch_size=4),
    "U-ViT-H/2": dict(depth=29, hidden_size=1152, num_heads=16, patch_size=2, conv=False),
}

_TRUNC = nn.initializers.truncated_normal(0.02)


class UViTBlock(nn.Module):
    """A pre-LayerNorm ViT block (no qkv bias, exact GELU); with `skip`, first
    h = Dense(concat(h, skip)) (U-ViT's long skip connection)."""

    num_heads: int
    mlp_ratio: float = 4.0
    skip: bool = False

    @nn.compact
    def __call__(self, x: Array, skip: Array | None = None) -> Array:
        if self.skip:
            x = nn.Dense(x.shape[-1], kernel_init=_TRUNC, name="skip_linear")(
                jnp.concatenate([x, skip], axis=-1))
        x = x + Attention(self.num_heads, qkv_bias=False, kernel_init=_TRUNC, name="attn")(
            nn.LayerNorm(epsilon=1e-5, name="norm1")(x))
        mlp = Mlp(int(x.shape[-1] * self.mlp_ratio), approximate_gelu=False, kernel_init=_TRUNC,
                  name="mlp")
        return x + mlp(nn.LayerNorm(epsilon=1e-5, name="norm2")(x))


class UViT(nn.Module):
    """U-ViT (module docstring). Presets: `PRESETS`.

    Attributes:
      patch_size: side p of the square patches; H and W must be divisible by it.
      hidden_size: token width D (the paper's "width"; divisible by num_heads).
      depth: number of blocks, odd (the paper's count: U-ViT-S has 13).
      num_heads: attention heads.
      mlp_ratio: MLP hidden width / D.
      mlp_time_embed: pass the noise embedding through Dense(4D) -> SiLU -> Dense(D) (U-ViT's
        ImageNet models do not; nor does CIFAR-10's).
      conv: a 3x3 convolution after unpatchify (U-ViT's pixel-space models; not its latent ones).
      num_classes: if set (and > 0), a label token: y (B,) int labels in [0, num_classes]
        (num_classes = the null label of classifier-free guidance; y=None means all null);
        None or 0: unconditional, y is ignored.
      learn_sigma: 2C output channels, the second C a learned variance.
      remat: recompute each block's activations in the backward pass (less memory).

    Computes in the dtype of x. Initialisation as U-ViT's: Dense kernels and the position
    embedding truncated normal with std 0.02 (flax truncates at 2 std; U-ViT's timm function at
    +-2, which is no truncation at std 0.02), biases 0, LayerNorm 1 / 0, the label table
    N(0, 1); the patch embedding and the final convolution as PyTorch's default Conv2d.
    """

    patch_size: int = 2
    hidden_size: int = 512
    depth: int = 13
    num_heads: int = 8
    mlp_ratio: float = 4.0
    mlp_time_embed: bool = False
    conv: bool = True
    num_classes: int | None = None
    learn_sigma: bool = False
    remat: bool = False

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array | None = None, train: bool = False) -> Array:
        """x (B, H, W, C), t (B,) noise conditioning, y (B,) int labels or None -> (B, H, W, C)
        ((B, H, W, 2C) with learn_sigma). `train` is accepted for the common interface (U-ViT
        has no dropout)."""
        check_patch_input("U-ViT", x, self.patch_size)
        if self.depth % 2 == 0:
            raise ValueError(f"U-ViT's depth counts the in blocks, the middle block and the out "
                             f"blocks, so it is odd (U-ViT-S: 13); got {self.depth}.")
        p, d = self.patch_size, self.hidden_size
        b, height, width, channels = x.shape
        kernel, bias = torch_linear_init(p * p * channels)
        tokens = nn.Dense(d, kernel_init=kernel, bias_init=bias, name="patch_embed")(
            patchify(x, p))

        time_token = timestep_embedding(t, d).astype(x.dtype)
        if self.mlp_time_embed:
            time_token = nn.Dense(4 * d, kernel_init=_TRUNC, name="time_embed_0")(time_token)
            time_token = nn.Dense(d, kernel_init=_TRUNC, name="time_embed_2")(
                nn.silu(time_token))
        extras = [time_token[:, None, :]]
        if self.num_classes:
            extras.insert(0, label_embedding(y, self.num_classes, d, b)[:, None, :].astype(
                x.dtype))
        tokens = jnp.concatenate([*extras, tokens], axis=1)
        pos = self.param("pos_embed", _TRUNC, (1, tokens.shape[1], d), jnp.float32)
        tokens = tokens + pos.astype(x.dtype)

        block_cls = rematerialized(UViTBlock) if self.remat else UViTBlock
        skips = []
        for i in range(self.depth // 2):
            tokens = block_cls(self.num_heads, self.mlp_ratio, name=f"in_blocks_{i}")(tokens)
            skips.append(tokens)
        tokens = block_cls(self.num_heads, self.mlp_ratio, name="mid_block")(tokens)
        for i in range(self.depth // 2):
            tokens = block_cls(self.num_heads, self.mlp_ratio, skip=True,
                               name=f"out_blocks_{i}")(tokens, skips.pop())

        out_channels = channels * (2 if self.learn_sigma else 1)
        tokens = nn.LayerNorm(epsilon=1e-5, name="norm")(tokens)
        tokens = nn.Dense(p * p * out_channels, kernel_init=_TRUNC, name="decoder_pred")(tokens)
        out = unpatchify(tokens[:, len(extras):], p, height, width)
        if self.conv:
            kernel, bias = torch_linear_init(9 * out_channels)
            out = nn.Conv(out_channels, (3, 3), padding="SAME", kernel_init=kernel,
                          bias_init=bias, name="final_layer")(out)
        return out
