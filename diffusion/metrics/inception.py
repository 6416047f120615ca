"""The FID Inception-v3 network in Flax: TensorFlow's "2015-12-05" graph, as published FIDs use.

FID (Heusel et al. 2017, TTUR), the Inception Score (Salimans et al. 2016) and KID (Binkowski et
al. 2018) are defined by one frozen network: the Inception-v3 graph `classify_image_graph_def.pb`
of 2015-12-05, with its own input pipeline. This module rebuilds that graph:

  1. images (N, H, W, 3) in [0, 255] (floats; grayscale (N, H, W, 1) is repeated to 3 channels);
  2. TF1's `ResizeBilinear` to 299 x 299 (align_corners=False, half_pixel_centers=False: source
     coordinate = output index * in / out, so the image is not centred; this differs from
     `jax.image.resize` and from PyTorch's interpolate, and changes FID by whole points);
  3. (x - 128) / 128;
  4. the Inception-v3 body (batch norm folded into the convolutions; note the graph's quirks:
     average pools exclude padding, and the last block's pool branch is a max pool);
  5. a global average pool -> the 2048-d `pool_3` features; the logits of the 1008-way
     classifier are `pool_3 @ W` without the bias, as the original Inception Score code has it.

The network only: fetching, converting and loading its weights is `inception_weights.py`.

    params = inception_weights.load_params(inception_weights.ensure_weights())
    pool, logits = inception.features(params, images)      # (N, 2048), (N, 1008) or None
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008


# --------------------------------------------------------------------------- preprocessing


def _tf1_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of TF1's legacy bilinear resize along one axis.

    Output index o samples the input at s = o * n_in / n_out (no half-pixel offset), between
    floor(s) and floor(s) + 1 clamped to the border.
    """
    s = np.arange(n_out, dtype=np.float64) * (n_in / n_out)
    lo = np.floor(s).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = s - lo
    m = np.zeros((n_out, n_in), np.float64)
    m[np.arange(n_out), lo] += 1.0 - frac
    m[np.arange(n_out), hi] += frac
    return m.astype(np.float32)


def tf1_resize_bilinear(images: Array, size: int = INPUT_SIZE) -> Array:
    """TF1 `ResizeBilinear` (align_corners=False, half_pixel_centers=False) of (N, H, W, C)."""
    _, h, w, _ = images.shape
    if (h, w) == (size, size):
        return images
    rows, cols = _tf1_resize_matrix(h, size), _tf1_resize_matrix(w, size)
    hp = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,nhwc->nowc", rows, images, precision=hp)
    return jnp.einsum("pw,nowc->nopc", cols, x, precision=hp)


def preprocess(images: Array) -> Array:
    """(N, H, W, 1 or 3) in [0, 255] -> the network's input (N, 299, 299, 3) in [-1, 127/128]."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"Inception features need images (N, H, W, 3) or (N, H, W, 1) in "
                         f"[0, 255]; got shape {images.shape}.")
    x = jnp.asarray(images, jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    x = tf1_resize_bilinear(x)
    return (x - 128.0) / 128.0


# --------------------------------------------------------------------------- the network


def _pad(p) -> tuple:
    ph, pw = (p, p) if isinstance(p, int) else p
    return ((ph, ph), (pw, pw))


class ConvBN(nn.Module):
    """Convolution (no bias) + batch norm (folded: a bias) + ReLU, as every layer of the graph."""

    features: int
    kernel: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: int | tuple[int, int] = 0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (*self.kernel, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        x = jax.lax.conv_general_dilated(
            x, kernel, (self.stride, self.stride), _pad(self.padding),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
        return nn.relu(x + bias[None, None, None, :])


def _max_pool(x, stride=2, padding=0):
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=_pad(padding))


def _avg_pool(x):
    """3x3, stride 1, SAME; TF divides by the number of real (unpadded) inputs."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=_pad(1), count_include_pad=False)


class Tower(nn.Module):
    """A chain of ConvBN layers named conv, conv_1, conv_2, ... (optionally after a 3x3 avg pool).

    layers: (features, kernel, stride, padding) per convolution.
    """

    layers: tuple
    pool_first: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.pool_first:
            x = _avg_pool(x)
        for i, (features, kernel, stride, padding) in enumerate(self.layers):
            x = ConvBN(features, kernel, stride, padding, name="conv" if i == 0 else f"conv_{i}")(x)
        return x


def _c(features, kernel=1, stride=1, padding=0):
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    return (features, kernel, stride, padding)


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        return jnp.concatenate([
            ConvBN(64, name="conv")(x),
            Tower((_c(48), _c(64, 5, padding=2)), name="tower")(x),
            Tower((_c(64), _c(96, 3, padding=1), _c(96, 3, padding=1)), name="tower_1")(x),
            Tower((_c(self.pool_features),), pool_first=True, name="tower_2")(x),
        ], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.concatenate([
            ConvBN(384, (3, 3), stride=2, name="conv")(x),
            Tower((_c(64), _c(96, 3, padding=1), _c(96, 3, stride=2)), name="tower")(x),
            _max_pool(x),
        ], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        row = {"kernel": (1, 7), "padding": (0, 3)}
        col = {"kernel": (7, 1), "padding": (3, 0)}
        return jnp.concatenate([
            ConvBN(192, name="conv")(x),
            Tower((_c(c), _c(c, **row), _c(192, **col)), name="tower")(x),
            Tower((_c(c), _c(c, **col), _c(c, **row), _c(c, **col), _c(192, **row)),
                  name="tower_1")(x),
            Tower((_c(192),), pool_first=True, name="tower_2")(x),
        ], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.concatenate([
            Tower((_c(192), _c(320, 3, stride=2)), name="tower")(x),
            Tower((_c(192), _c(192, (1, 7), padding=(0, 3)), _c(192, (7, 1), padding=(3, 0)),
                   _c(192, 3, stride=2)), name="tower_1")(x),
            _max_pool(x),
        ], axis=-1)


class InceptionE(nn.Module):
    """The 8x8 blocks. The graph's last one (mixed_10) pools its fourth branch with a max pool."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x):
        a = ConvBN(384, name="tower_conv")(x)
        b = ConvBN(448, name="tower_1_conv")(x)
        b = ConvBN(384, (3, 3), padding=1, name="tower_1_conv_1")(b)
        pooled = _max_pool(x, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return jnp.concatenate([
            ConvBN(320, name="conv")(x),
            ConvBN(384, (1, 3), padding=(0, 1), name="tower_mixed_conv")(a),
            ConvBN(384, (3, 1), padding=(1, 0), name="tower_mixed_conv_1")(a),
            ConvBN(384, (1, 3), padding=(0, 1), name="tower_1_mixed_conv")(b),
            ConvBN(384, (3, 1), padding=(1, 0), name="tower_1_mixed_conv_1")(b),
            ConvBN(192, name="tower_2_conv")(pooled),
        ], axis=-1)


class InceptionV3(nn.Module):
    """(N, 299, 299, 3) in [-1, 127/128] -> pool_3 features (N, 2048). Names follow the export."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = ConvBN(32, (3, 3), stride=2, name="conv")(x)          # 149
        x = ConvBN(32, (3, 3), name="conv_1")(x)                  # 147
        x = ConvBN(64, (3, 3), padding=1, name="conv_2")(x)
        x = _max_pool(x)                                          # 73
        x = ConvBN(80, name="conv_3")(x)
        x = ConvBN(192, (3, 3), name="conv_4")(x)                 # 71
        x = _max_pool(x)                                          # 35
        for i, pool_features in enumerate((32, 64, 64)):
            x = InceptionA(pool_features, name="mixed" if i == 0 else f"mixed_{i}")(x)
        x = InceptionB(name="mixed_3")(x)                         # 17
        for i, c in enumerate((128, 160, 160, 192)):
            x = InceptionC(c, name=f"mixed_{4 + i}")(x)
        x = InceptionD(name="mixed_8")(x)                         # 8
        x = InceptionE(name="mixed_9")(x)
        x = InceptionE(max_pool=True, name="mixed_10")(x)
        return jnp.mean(x, axis=(1, 2))                           # the graph's 8x8 average pool


# --------------------------------------------------------------------------- features


@jax.jit
def features(params: dict, images: Array) -> tuple[Array, Array | None]:
    """pool_3 features (N, 2048) and classifier logits (N, 1008; None without the classifier)
    of images (N, H, W, 1 or 3) in [0, 255]; params from `inception_weights.load_params`."""
    pool = InceptionV3().apply({"params": params["net"]}, preprocess(images))
    logits = None
    if "logits" in params:
        logits = jnp.dot(pool, params["logits"], precision=jax.lax.Precision.HIGHEST)
    return pool, logits
