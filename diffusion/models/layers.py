"""Building blocks shared by the score networks: noise-level embeddings, ResNet and attention
blocks, and resampling layers (nearest-neighbour upsampling and average pooling are written
here once, `naive_upsample` / `naive_downsample`, for the networks and for guidance's
super-resolution measurement; the FIR resampling is in `fir.py`).

The blocks follow DDPM (Ho et al. 2020, appendix B) as re-implemented in score_sde
(Song et al. 2021): GroupNorm -> SiLU -> 3x3 conv, the noise embedding added between the two
convolutions, DDPM's "fan_avg uniform" initialiser and zero-initialised last layers, so that
every residual branch starts as the identity.

Shapes: images are NHWC, (B, H, W, C); per-example noise levels t are (B,); embeddings (B, E).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
EMBEDDINGS = ("sinusoidal", "fourier")


# Modules whose parameters are constants drawn at initialisation and never trained (they get
# zero gradients): weight decay skips them and mixed precision keeps them float32.
UNTRAINED_MODULES = ("GaussianFourierProjection",)


def is_untrained(path) -> bool:
    """Whether the parameter at `path` (a jax tree path) belongs to an UNTRAINED_MODULES module."""
    return any(str(getattr(k, "key", "")).startswith(UNTRAINED_MODULES) for k in path)


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
    """DDPM's initialiser: variance_scaling(scale, "fan_avg", "uniform"). Scale 0 means 1e-10
    (weights of order 1e-5, not zeros), as in DDPM's and score_sde's `default_init` and EDM's
    `init_zero` (xavier x 1e-5)."""
    return nn.initializers.variance_scaling(scale or 1e-10, "fan_avg", "uniform")


@functools.cache
def rematerialized(cls: type[nn.Module], static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
    """`nn.remat(cls)`: a block whose activations are recomputed in the backward pass instead of
    kept in memory (Chen et al. 2016), trading about one extra forward pass for memory.

    The class keeps `cls`'s name, so parameters (and dropout streams) are named exactly as without
    rematerialisation, and a checkpoint trained with one setting loads with the other.
    static_argnums index the call's arguments with `self` as 0 (e.g. (3,) for a `train` flag
    passed third: block(x, temb, train)).
    """
    remat_cls = nn.remat(cls, static_argnums=static_argnums)
    remat_cls.__name__ = remat_cls.__qualname__ = cls.__name__
    return remat_cls


def check_image_rank(network: str, x: Array) -> None:
    """One clear error unless x is a batch of images, (B, H, W, C)."""
    if x.ndim != 4:
        raise ValueError(f"{network} expects images shaped (B, H, W, C); got shape {x.shape}. "
                         "Use model.name='mlp' for vector data.")


def check_image_input(network: str, x: Array, ch_mult) -> None:
    """One clear error unless x is (B, H, W, C) with H and W divisible by 2^(len(ch_mult) - 1),
    the factor a U-Net with these channel multipliers downsamples by."""
    check_image_rank(network, x)
    factor = 2 ** (len(ch_mult) - 1)
    height, width = x.shape[1:3]
    if height % factor or width % factor:
        raise ValueError(
            f"{network} with ch_mult={tuple(ch_mult)} halves the image {len(ch_mult) - 1} "
            f"times, so height and width must be divisible by {factor}; got {height}x{width}. "
            "Shorten model.ch_mult or resize the data.")


def num_groups(channels: int, max_groups: int = 32, min_group_size: int = 4) -> int:
    """Number of GroupNorm groups for `channels`: min(32, C // 4), lowered until it divides C."""
    groups = max(1, min(max_groups, channels // min_group_size))
    while channels % groups:
        groups -= 1
    return groups


def group_norm(x: Array) -> Array:
    """GroupNorm over the last (channel) axis of x (B, ..., C), with `num_groups(C)` groups."""
    return nn.GroupNorm(num_groups=num_groups(x.shape[-1]), epsilon=1e-6)(x)


def conv3x3(features: int, init_scale: float = 1.0, stride: int = 1) -> nn.Conv:
    """3x3 convolution, "SAME" padding (for stride 2 on even sizes: pad 0 before, 1 after)."""
    return nn.Conv(features, (3, 3), strides=(stride, stride), padding="SAME",
                   kernel_init=default_init(init_scale))


def sinusoidal_embedding(t: Array, dim: int, max_period: float = 10_000.0) -> Array:
    """Transformer / DDPM positional embedding of a per-example noise level.

    Args:
      t: (B,) noise conditioning, e.g. a DDPM step index 0..999 (may be fractional).
      dim: embedding size E.
      max_period: the slowest of the E/2 geometric frequencies is 1 / max_period.

    Returns:
      (B, E): [sin(t w_0), ..., sin(t w_{E/2-1}), cos(t w_0), ...] with
      w_k = max_period^(-k / (E/2 - 1)) (DDPM's convention), zero-padded when E is odd.
    """
    t = jnp.asarray(t, jnp.promote_types(jnp.asarray(t).dtype, jnp.float32))
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=t.dtype) / max(half - 1, 1)
    angles = t[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim - 2 * half)))


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of a scalar noise level (Tancik et al. 2020; NCSN++, Song et al.
    2021), usually applied to log sigma: [sin(2 pi t W), cos(2 pi t W)], W ~ N(0, scale^2).

    W is drawn at initialisation and never trained, as in score_sde: a parameter "W" (E/2,)
    behind a stop-gradient, so it gets zero gradients (Adam then leaves it unchanged, its EMA
    equals it, and weight decay skips it: `UNTRAINED_MODULES`) and a score_sde checkpoint's
    frequencies load into it.

    Attributes:
      embed_dim: output size E (E/2 frequencies; zero-padded if E is odd).
      scale: standard deviation of the frequencies W (16 in NCSN++).
    """

    embed_dim: int = 256
    scale: float = 16.0

    @nn.compact
    def __call__(self, t: Array) -> Array:
        """t (B,) -> (B, embed_dim)."""
        half = self.embed_dim // 2
        w = self.param("W", nn.initializers.normal(self.scale), (half,), jnp.float32)
        w = jax.lax.stop_gradient(w)
        t = jnp.asarray(t, jnp.promote_types(jnp.asarray(t).dtype, jnp.float32))
        angles = 2.0 * math.pi * t[:, None] * jnp.asarray(w, t.dtype)[None, :]
        emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
        return jnp.pad(emb, ((0, 0), (0, self.embed_dim - 2 * half)))


def noise_embedding(kind: str, t: Array, dim: int, fourier_scale: float = 16.0) -> Array:
    """(B,) noise conditioning -> (B, dim) by `kind` ("sinusoidal" | "fourier").

    Call from inside a compact method: the Fourier branch creates a (parameter-free) submodule.
    """
    if kind == "sinusoidal":
        return sinusoidal_embedding(t, dim)
    if kind == "fourier":
        return GaussianFourierProjection(embed_dim=dim, scale=fourier_scale)(t)
    raise ValueError(f"Unknown embedding {kind!r}: must be one of {list(EMBEDDINGS)}.")


def label_embedding(y: Array | None, num_classes: int, dim: int, batch_size: int,
                    std: float = 1.0, name: str | None = None) -> Array:
    """(B,) int labels -> (B, dim) learned embedding with num_classes + 1 rows, initialised
    N(0, std^2) (PyTorch's nn.Embedding: 1; DiT: 0.02), as the submodule `name` (None: Embed_k).

    Label `num_classes` is the "null" label of classifier-free guidance; y=None means every
    example has the null label. Call from inside a compact method.
    """
    if y is None:
        y = jnp.full((batch_size,), num_classes, jnp.int32)
    return nn.Embed(num_classes + 1, dim, embedding_init=nn.initializers.normal(std),
                    name=name)(y)


class ResnetBlock(nn.Module):
    """DDPM residual block conditioned on a noise embedding.

    h = conv3x3(SiLU(GN(x))) + Dense(SiLU(temb)); h = conv3x3(dropout(SiLU(GN(h))));
    out = skip(x) + h, divided by sqrt(2) if `skip_rescale` (NCSN++). skip is a 1x1 conv when the
    channel count changes, else the identity.

    Attributes:
      out_ch: output channels (None: same as the input).
      dropout: dropout rate before the second conv; active only when train=True.
      skip_rescale: divide the sum by sqrt(2), keeping its variance as the blocks stack up.
      init_scale: initialiser scale of the second conv; 0 (DDPM) makes the block the identity.
    """

    out_ch: int | None = None
    dropout: float = 0.0
    skip_rescale: bool = False
    init_scale: float = 0.0

    @nn.compact
    def __call__(self, x: Array, temb: Array | None = None, train: bool = False) -> Array:
        """x (B, H, W, C), temb (B, E) or None -> (B, H, W, out_ch)."""
        out_ch = self.out_ch or x.shape[-1]
        h = conv3x3(out_ch)(nn.silu(group_norm(x)))
        if temb is not None:
            h = h + nn.Dense(out_ch, kernel_init=default_init())(nn.silu(temb))[:, None, None, :]
        h = nn.silu(group_norm(h))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = conv3x3(out_ch, init_scale=self.init_scale)(h)
        if x.shape[-1] != out_ch:
            x = nn.Conv(out_ch, (1, 1), kernel_init=default_init(), name="skip")(x)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection (DDPM).

    q, k, v and the output projection are 1x1 convolutions (Dense over channels; score_sde's NIN
    layers). q, k, v start at initialiser scale 0.1 (score_sde's NIN default) and the output
    projection at `init_scale` (0, the default: the block starts as the identity).
    """

    skip_rescale: bool = False
    init_scale: float = 0.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x (B, H, W, C) -> (B, H, W, C)."""
        b, height, width, c = x.shape
        h = group_norm(x).reshape(b, height * width, c)
        q, k, v = (nn.Dense(c, kernel_init=default_init(0.1), name=n)(h) for n in ("q", "k", "v"))
        # Logits and softmax in float32 even when the block computes in bfloat16.
        logits = jnp.einsum("bic,bjc->bij", q, k).astype(jnp.float32) / math.sqrt(c)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        h = jnp.einsum("bij,bjc->bic", weights, v)
        h = nn.Dense(c, kernel_init=default_init(self.init_scale), name="proj_out")(h)
        out = x + h.reshape(b, height, width, c)
        return out / math.sqrt(2.0) if self.skip_rescale else out


def naive_upsample(x: Array, factor: int = 2) -> Array:
    """Nearest-neighbour upsampling: (B, H, W, C) -> (B, factor H, factor W, C)."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def naive_downsample(x: Array, factor: int = 2) -> Array:
    """Average pooling over factor x factor blocks: (B, H, W, C) -> (B, H / factor, W / factor,
    C) (a remainder of H or W is dropped)."""
    return nn.avg_pool(x, (factor, factor), strides=(factor, factor))


class Downsample(nn.Module):
    """Halves H and W: 3x3 conv with stride 2 (`with_conv`) or 2x2 average pooling."""

    with_conv: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x (B, H, W, C), H and W even -> (B, H/2, W/2, C)."""
        if self.with_conv:
            return conv3x3(x.shape[-1], stride=2)(x)
        return naive_downsample(x)


class Upsample(nn.Module):
    """Doubles H and W: nearest-neighbour x2, then a 3x3 conv if `with_conv`."""

    with_conv: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x (B, H, W, C) -> (B, 2H, 2W, C)."""
        x = naive_upsample(x)
        return conv3x3(x.shape[-1])(x) if self.with_conv else x
