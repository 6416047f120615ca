"""DiT: the diffusion transformer of Peebles & Xie, "Scalable Diffusion Models with
Transformers" (ICCV 2023), in Flax linen, block for block as the authors' `models.py`
(facebookresearch/DiT).

    net = DiT(**PRESETS["DiT-XL/2"], num_classes=1000, learn_sigma=True)
    variables = net.init(key, x, t, y=labels, train=False)   # x (B, H, W, C), t (B,), y (B,)

The image is cut into p x p patches, each embedded linearly, plus the fixed 2-D sin-cos position
embedding; the noise level t (256 sinusoidal frequencies -> MLP) and the class label (a learned
table with a null row for classifier-free guidance) are summed into one conditioning vector c;
`depth` transformer blocks are modulated by c through adaLN-Zero: LayerNorm without affine
parameters, then scale and shift regressed from c, and every residual branch multiplied by a
gate regressed from c, these regressions initialised to zero. The final layer (adaLN, then a
zero-initialised Dense to p p C_out) and unpatchify give an output shaped like the input (2C
channels with learn_sigma), exactly 0 at initialisation.

DiT was designed for the 32x32x4 latents of Stable Diffusion's autoencoder; here it runs on
whatever the data are (pixels). The presets and their sizes are the paper's Table 4.
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
    sincos_2d,
    timestep_embedding,
    unpatchify,
)

Array = jax.Array

_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
# "DiT-{S,B,L,XL}/{2,4,8}" -> the DiT fields (depth, hidden_size, num_heads, patch_size).
PRESETS: dict[str, dict[str, int]] = {
    f"DiT-{size}/{p}": dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=p)
    for size, (depth, hidden, heads) in _SIZES.items() for p in (2, 4, 8)
}

_ZERO = nn.initializers.zeros_init()
_XAVIER = nn.initializers.xavier_uniform()


def modulate(x: Array, shift: Array, scale: Array) -> Array:
    """x (B, T, D) * (1 + scale) + shift, with shift and scale (B, D) per example."""
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


def _layer_norm(name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, name=name)


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning (DiT, their Fig. 3):

        shift1, scale1, gate1, shift2, scale2, gate2 = Dense(SiLU(c))   (zero-initialised)
        x = x + gate1 * Attention(modulate(LN(x), shift1, scale1))
        x = x + gate2 * Mlp(modulate(LN(x), shift2, scale2))

    so the block starts as the identity."""

    num_heads: int
    mlp_ratio: float = 4.0

    @nn.compact
    def __call__(self, x: Array, c: Array) -> Array:
        d = x.shape[-1]
        mod = nn.Dense(6 * d, kernel_init=_ZERO, name="adaLN_modulation")(nn.silu(c))
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
        h = Attention(self.num_heads, qkv_bias=True, name="attn")(
            modulate(_layer_norm("norm1")(x), shift1, scale1))
        x = x + gate1[:, None, :] * h
        h = Mlp(int(d * self.mlp_ratio), approximate_gelu=True, name="mlp")(
            modulate(_layer_norm("norm2")(x), shift2, scale2))
        return x + gate2[:, None, :] * h


class DiT(nn.Module):
    """Diffusion transformer (module docstring). Presets: `PRESETS`.

    Attributes:
      patch_size: side p of the square patches; H and W must be divisible by it.
      hidden_size: token width D (divisible by 4 for the 2-D position code and by num_heads).
      depth: number of DiT blocks.
      num_heads: attention heads.
      mlp_ratio: MLP hidden width / D.
      num_classes: if set (and > 0), y (B,) int labels in [0, num_classes] are embedded
        (num_classes = the null label of classifier-free guidance; y=None means all null) and
        added to the noise embedding; None or 0: unconditional, y is ignored.
      learn_sigma: 2C output channels, the second C a learned variance (Nichol & Dhariwal 2021;
        `parameterization.ScoreModel`).
      frequency_embedding_size: sinusoidal frequencies of the noise level before its MLP (256).
      remat: recompute each block's activations in the backward pass (`layers.rematerialized`):
        less memory for about one more forward pass; same parameters.

    The network computes in the dtype of x (float32, or bfloat16 under mixed precision).
    Initialisation as DiT's: Dense kernels xavier-uniform (the patch embedding as a Dense on
    flattened patches), biases 0; timestep MLP and label table N(0, 0.02^2); every adaLN
    regression and the final Dense zero.
    """

    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int | None = None
    learn_sigma: bool = False
    frequency_embedding_size: int = 256
    remat: bool = False

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array | None = None, train: bool = False) -> Array:
        """x (B, H, W, C), t (B,) noise conditioning, y (B,) int labels or None -> (B, H, W, C)
        ((B, H, W, 2C) with learn_sigma). `train` is accepted for the common interface (DiT has
        no dropout; label dropout is the training loss's, `losses.with_label_dropout`)."""
        check_patch_input("DiT", x, self.patch_size)
        p, d = self.patch_size, self.hidden_size
        b, height, width, channels = x.shape
        pos = sincos_2d(d, height // p, width // p)
        tokens = nn.Dense(d, kernel_init=_XAVIER, name="x_embedder")(patchify(x, p))
        tokens = tokens + jnp.asarray(pos, x.dtype)[None]

        normal = nn.initializers.normal(0.02)
        temb = timestep_embedding(t, self.frequency_embedding_size).astype(x.dtype)
        temb = nn.Dense(d, kernel_init=normal, name="t_embedder_mlp_0")(temb)
        c = nn.Dense(d, kernel_init=normal, name="t_embedder_mlp_2")(nn.silu(temb))
        if self.num_classes:
            c = c + label_embedding(y, self.num_classes, d, b, std=0.02,
                                    name="y_embedder").astype(x.dtype)

        block_cls = rematerialized(DiTBlock) if self.remat else DiTBlock
        for i in range(self.depth):
            tokens = block_cls(self.num_heads, self.mlp_ratio, name=f"blocks_{i}")(tokens, c)

        out_channels = channels * (2 if self.learn_sigma else 1)
        shift, scale = jnp.split(
            nn.Dense(2 * d, kernel_init=_ZERO, name="final_adaLN_modulation")(nn.silu(c)), 2, -1)
        tokens = modulate(_layer_norm("final_norm")(tokens), shift, scale)
        tokens = nn.Dense(p * p * out_channels, kernel_init=_ZERO, name="final_linear")(tokens)
        return unpatchify(tokens, p, height, width)
