"""Pieces shared by the transformer backbones (DiT, `dit.py`; U-ViT, `uvit.py`): patches,
position and timestep embeddings, multi-head self-attention and the MLP of a ViT block.

Images are NHWC, (B, H, W, C); token sequences (B, T, D) with the T = (H / p)(W / p) patches in
row-major order (patch (i, j) is token i W / p + j), each patch flattened in (p, p, C) order.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion.models.layers import check_image_rank

Array = jax.Array


def check_patch_input(network: str, x: Array, patch_size: int) -> None:
    """One clear error unless x is (B, H, W, C) with H and W divisible by the patch size."""
    check_image_rank(network, x)
    height, width = x.shape[1:3]
    if height % patch_size or width % patch_size:
        raise ValueError(f"{network} cuts the image into {patch_size}x{patch_size} patches, so "
                         f"height and width must be divisible by {patch_size}; got "
                         f"{height}x{width}. Change model.patch_size or resize the data.")


def patchify(x: Array, p: int) -> Array:
    """(B, H, W, C) -> (B, (H/p)(W/p), p p C): non-overlapping p x p patches as tokens."""
    b, height, width, c = x.shape
    x = x.reshape(b, height // p, p, width // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (height // p) * (width // p), p * p * c)


def unpatchify(tokens: Array, p: int, height: int, width: int) -> Array:
    """The inverse of `patchify`: (B, (H/p)(W/p), p p C) -> (B, H, W, C)."""
    b, _, d = tokens.shape
    c = d // (p * p)
    x = tokens.reshape(b, height // p, width // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height, width, c)


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, dim): [sin(m w_k), cos(m w_k)], w_k = 10000^(-2k / dim),
    k = 0 .. dim/2 - 1 (the transformer's fixed position code, as MAE and DiT compute it)."""
    if dim % 2:
        raise ValueError(f"A sin-cos position embedding needs an even size, got {dim}.")
    omega = 1.0 / 10_000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """The fixed 2-D position embedding of a grid_h x grid_w grid of patches, (grid_h grid_w, dim)
    in row-major order: the first dim/2 entries code the column j, the last dim/2 the row i
    (DiT's and MAE's `get_2d_sincos_pos_embed`, whose meshgrid puts the w coordinate first)."""
    if dim % 4:
        raise ValueError(f"A 2-D sin-cos position embedding needs a size divisible by 4, "
                         f"got {dim}.")
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)


def timestep_embedding(t: Array, dim: int, max_period: float = 10_000.0) -> Array:
    """(B,) noise conditioning -> (B, dim) float32: [cos(t w_k), sin(t w_k)],
    w_k = max_period^(-k / (dim/2)), k = 0 .. dim/2 - 1, zero-padded when dim is odd (GLIDE's,
    DiT's and U-ViT's timestep embedding; `layers.sinusoidal_embedding` is DDPM's, with sin first
    and w_k = max_period^(-k / (dim/2 - 1)))."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim - 2 * half)))


def torch_linear_init(fan_in: int):
    """(kernel_init, bias_init) of PyTorch's default nn.Linear / nn.Conv2d initialisation:
    both uniform on +-1/sqrt(fan_in) (kaiming_uniform with a = sqrt(5))."""
    bound = 1.0 / math.sqrt(fan_in)

    def bias_init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"), bias_init


class Attention(nn.Module):
    """Multi-head self-attention over tokens (B, T, D): one Dense to q, k, v (laid out as
    (3, heads, D / heads), as timm's Attention), softmax(q k^T / sqrt(D / heads)) v by
    `jax.nn.dot_product_attention` (XLA's or a fused cuDNN kernel), and an output Dense.

    Attributes:
      num_heads: heads; D must be divisible by it.
      qkv_bias: a bias on the q, k, v projection (DiT: yes; U-ViT: no).
      kernel_init: initialiser of both Dense kernels (biases start at 0).
    """

    num_heads: int
    qkv_bias: bool = True
    kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, t, d = x.shape
        if d % self.num_heads:
            raise ValueError(f"Attention width {d} is not divisible by num_heads "
                             f"{self.num_heads}.")
        qkv = nn.Dense(3 * d, use_bias=self.qkv_bias, kernel_init=self.kernel_init,
                       name="qkv")(x)
        q, k, v = jnp.moveaxis(qkv.reshape(b, t, 3, self.num_heads, d // self.num_heads), 2, 0)
        h = jax.nn.dot_product_attention(q, k, v).reshape(b, t, d)
        return nn.Dense(d, kernel_init=self.kernel_init, name="proj")(h)


class Mlp(nn.Module):
    """The ViT block's MLP: Dense(hidden) -> GELU -> Dense(D) (no dropout).

    Attributes:
      hidden: the hidden width (mlp_ratio x D).
      approximate_gelu: the tanh approximation of GELU (DiT) or the exact erf one (U-ViT).
      kernel_init: initialiser of both kernels (biases start at 0).
    """

    hidden: int
    approximate_gelu: bool = True
    kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = nn.Dense(self.hidden, kernel_init=self.kernel_init, name="fc1")(x)
        h = nn.gelu(h, approximate=self.approximate_gelu)
        return nn.Dense(x.shape[-1], kernel_init=self.kernel_init, name="fc2")(h)
