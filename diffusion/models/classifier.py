"""A noise-conditional image classifier p_t(y | x_t), for classifier guidance.

Song et al. (2021, sec. 5 and app. I.1) guide an unconditional score model towards a class with
the gradient of a classifier trained on perturbed data x_t = alpha(t) x_0 + sigma(t) z and told
the noise level (score_sde used a Wide-ResNet conditioned on the VE noise scale; Dhariwal &
Nichol 2021 the encoder half of their U-Net). This one is the encoder half of `unet.UNet`:
the same ResNet blocks with the same noise embedding (of t, as the score networks get it),
global average pooling and a linear layer to the logits.

Trained with `losses.make_classifier_loss` (cross-entropy at t ~ U(eps, T), or at t = 0 for a
classifier of clean data), from `experiments/digits_classifier.py`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion.models.layers import (
    Downsample,
    ResnetBlock,
    check_image_input,
    conv3x3,
    default_init,
    group_norm,
    noise_embedding,
)

Array = jax.Array


class NoiseConditionalClassifier(nn.Module):
    """Logits (B, num_classes) of p_t(y | x) for images x (B, H, W, C) at noise conditioning t.

    Attributes:
      num_classes: the number of classes.
      ch, ch_mult, num_res_blocks, dropout: as `unet.UNet`'s down path.
      noise_conditional: False for a classifier of clean data (t is then ignored and the loss
        trains at t = 0): the judge of class-conditional samples, not a guide.
    """

    num_classes: int = 10
    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 2
    dropout: float = 0.1
    noise_conditional: bool = True

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array | None = None, train: bool = False) -> Array:
        """x (B, H, W, C), t (B,) noise conditioning (999 t, as the score networks) -> logits.

        y is ignored (the signature matches the score networks', for initialisation).
        """
        del y
        check_image_input("NoiseConditionalClassifier", x, self.ch_mult)
        temb = None
        if self.noise_conditional:
            temb = noise_embedding("sinusoidal", t, self.ch).astype(x.dtype)
            temb = nn.Dense(4 * self.ch, kernel_init=default_init())(temb)
            temb = nn.Dense(4 * self.ch, kernel_init=default_init())(nn.silu(temb))
        h = conv3x3(self.ch)(x)
        for level, mult in enumerate(self.ch_mult):
            for _ in range(self.num_res_blocks):
                h = ResnetBlock(self.ch * mult, dropout=self.dropout)(h, temb, train)
            if level != len(self.ch_mult) - 1:
                h = Downsample(True)(h)
        h = jnp.mean(nn.silu(group_norm(h)), axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=default_init())(h)
