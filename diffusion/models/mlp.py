"""A small MLP score network for low-dimensional data (2-D toys, Gaussian mixtures)."""

from __future__ import annotations

import flax.linen as nn
import jax

from diffusion.models.layers import default_init, label_embedding, noise_embedding

Array = jax.Array


class MLP(nn.Module):
    """Residual-free MLP with the noise embedding added after every hidden Dense layer.

    emb = SiLU(Dense(embed(t)))  [+ label embedding]
    h_0 = x;  h_{l+1} = SiLU(Dense(h_l) + Dense_l(emb)),  l = 0 .. n_layers-1
    out = Dense(h) with a zero-initialised kernel, so the network starts at 0.

    Attributes:
      hidden: width of the hidden layers.
      n_layers: number of hidden layers.
      embedding: "sinusoidal" (for t = 999 * time) | "fourier" (for t = log sigma).
      embed_dim: size of the noise embedding before its projection.
      fourier_scale: std of the random Fourier frequencies.
      num_classes: if set, y (B,) int labels in [0, num_classes] (num_classes = null label) are
        embedded and added to the noise embedding; if None, y is ignored.
    """

    hidden: int = 256
    n_layers: int = 3
    embedding: str = "sinusoidal"
    embed_dim: int = 128
    fourier_scale: float = 16.0
    num_classes: int | None = None

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array | None = None, train: bool = False) -> Array:
        """x (B, D), t (B,) noise conditioning, y (B,) int labels or None -> (B, D).

        `train` is accepted for a uniform interface; the MLP has no dropout.
        """
        emb = noise_embedding(self.embedding, t, self.embed_dim, self.fourier_scale)
        emb = emb.astype(x.dtype)           # formed in float32, then the network's dtype
        emb = nn.silu(nn.Dense(self.hidden, kernel_init=default_init())(emb))
        if self.num_classes is not None:
            emb = emb + label_embedding(y, self.num_classes, self.hidden, x.shape[0])
        h = x
        for _ in range(self.n_layers):
            h = nn.Dense(self.hidden, kernel_init=default_init())(h)
            h = nn.silu(h + nn.Dense(self.hidden, kernel_init=default_init())(emb))
        return nn.Dense(x.shape[-1], kernel_init=default_init(0.0))(h)
