"""FIR resampling (StyleGAN2's upfirdn2d), as NCSN++ uses it: pure functions and `FIRConv`.

A separable FIR kernel k (default (1, 3, 3, 1), Karras et al. 2020 / Song et al. 2021's
`fir_kernel`) low-pass filters before down-sampling and after up-sampling; `FIRConv` fuses the
resampling with a 3x3 convolution as score_sde's `Conv2d` with up / down does. The naive
versions (nearest-neighbour repeat, average pooling), what NCSN++ uses without FIR, are
`layers.naive_upsample` / `naive_downsample`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion.models.layers import default_init

Array = jax.Array


def fir_kernel_2d(k) -> np.ndarray:
    """1-D taps (K,) -> normalised separable 2-D kernel (K, K) (outer product, sums to 1);
    a 2-D kernel is only normalised."""
    k = np.asarray(k, np.float32)
    if k.ndim == 1:
        k = np.outer(k, k)
    return k / np.sum(k)


def upfirdn2d(x: Array, k, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)) -> Array:
    """StyleGAN2's upfirdn2d on NHWC: upsample by zero insertion, pad, FIR-filter, downsample.

    Args:
      x: (B, H, W, C).
      k: (K, K) 2-D FIR kernel, applied to every channel (depthwise true convolution).
      up: zero-insertion factor (up - 1 zeros after every sample, as StyleGAN2).
      down: keep every down-th sample after filtering.
      pad: (before, after) padding of both spatial axes after upsampling; negative crops.

    Returns:
      (B, H', W', C) with H' = (H * up + pad[0] + pad[1] - K) // down + 1 (same for W).
    """
    b, height, width, c = x.shape
    k = jnp.asarray(k, x.dtype)
    if up > 1:
        x = x.reshape(b, height, 1, width, 1, c)
        x = jnp.pad(x, ((0, 0), (0, 0), (0, up - 1), (0, 0), (0, up - 1), (0, 0)))
        x = x.reshape(b, height * up, width * up, c)
    p0, p1 = pad
    x = jnp.pad(x, ((0, 0), (max(p0, 0), max(p1, 0)), (max(p0, 0), max(p1, 0)), (0, 0)))
    x = x[:, max(-p0, 0):x.shape[1] - max(-p1, 0), max(-p0, 0):x.shape[2] - max(-p1, 0), :]
    kernel = jnp.broadcast_to(jnp.flip(k)[:, :, None, None], (*k.shape, 1, c))
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(down, down), padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)


def fir_upsample(x: Array, k=(1, 3, 3, 1), factor: int = 2) -> Array:
    """FIR upsampling (StyleGAN2 upsample_2d): (B, H, W, C) -> (B, factor H, factor W, C).

    The kernel is scaled by factor^2, so a constant image stays constant (away from the border,
    where the zero padding is felt).
    """
    k2 = fir_kernel_2d(k) * factor ** 2
    p = k2.shape[0] - factor
    return upfirdn2d(x, k2, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def fir_downsample(x: Array, k=(1, 3, 3, 1), factor: int = 2) -> Array:
    """FIR anti-aliased downsampling (StyleGAN2 downsample_2d): (B, H, W, C) ->
    (B, H / factor, W / factor, C)."""
    k2 = fir_kernel_2d(k)
    p = k2.shape[0] - factor
    return upfirdn2d(x, k2, down=factor, pad=((p + 1) // 2, p // 2))


class FIRConv(nn.Module):
    """k x k convolution fused with FIR upsampling or downsampling by 2 (StyleGAN2's
    upsample_conv_2d / conv_downsample_2d), with a bias.

    up: transposed convolution with stride 2 (zero insertion + full convolution, (2H + k - 2)
    pixels), then the FIR filter (x4 gain) cropping back to 2H. down: the FIR filter, then a
    stride-2 "VALID" convolution, giving H / 2.
    """

    features: int
    kernel_size: int = 3
    up: bool = False
    down: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    init_scale: float = 1.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x (B, H, W, Cin) -> (B, H', W', features); H' = 2H (up), H / 2 (down) or H."""
        ks = self.kernel_size
        w = self.param("kernel", default_init(self.init_scale),
                       (ks, ks, x.shape[-1], self.features), jnp.float32)
        w = jnp.asarray(w, x.dtype)
        dn = ("NHWC", "HWIO", "NHWC")
        k2 = fir_kernel_2d(self.fir_kernel)
        if self.up:
            x = jax.lax.conv_general_dilated(x, w, (1, 1), ((ks - 1, ks - 1), (ks - 1, ks - 1)),
                                             lhs_dilation=(2, 2), dimension_numbers=dn)
            p = (k2.shape[0] - 2) - (ks - 1)
            x = upfirdn2d(x, k2 * 4, pad=((p + 1) // 2 + 1, p // 2 + 1))
        elif self.down:
            p = (k2.shape[0] - 2) + (ks - 1)
            x = upfirdn2d(x, k2, pad=((p + 1) // 2, p // 2))
            x = jax.lax.conv_general_dilated(x, w, (2, 2), "VALID", dimension_numbers=dn)
        else:
            pad = ((ks // 2, ks // 2), (ks // 2, ks // 2))
            x = jax.lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=dn)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        return x + jnp.asarray(bias, x.dtype)[None, None, None, :]
