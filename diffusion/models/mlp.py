"""A small MLP score network for low-dimensional data (2-D toys, Gaussian mixtures)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion.models.layers import default_init, label_embedding, noise_embedding

Array = jax.Array


class MLP(nn.Module):
    """Residual-free MLP conditioned on the noise level (and optionally a class label).

    embed_at="every_layer" (the default): the embedding is added after every hidden Dense layer,

      emb = act(Dense(embed(t)))  [+ label embedding]
      h_0 = x;  h_{l+1} = act(Dense(h_l) + E_l emb),  l = 0 .. n_layers-1

    with the n_layers projections E_l computed as one Dense layer of width n_layers * hidden,
    sliced per layer (one matrix product instead of n_layers narrow ones; each (hidden, hidden)
    block of its kernel is initialised as its own Dense layer would be).

    embed_at="input": the embedding (and label embedding) is concatenated to x once,
    h_0 = [x, embed(t)], h_{l+1} = act(Dense(h_l)) -- the conditioning of the small MLPs of
    diffusionjax and sbgm, with fewer parameters per hidden width: at 133k parameters it has
    3 hidden layers of 256 instead of 150, and wide matrix products run on every CPU core
    (XLA:CPU splits a 256-wide product over threads and a 150-wide one not; benchmarks/peers.py).

    In both, out = Dense(h) with a zero-initialised kernel, so the network starts at 0.

    Attributes:
      hidden: width of the hidden layers.
      n_layers: number of hidden layers.
      embedding: "sinusoidal" (for t = 999 * time) | "fourier" (for t = log sigma).
      embed_dim: size of the noise embedding before its projection.
      fourier_scale: std of the random Fourier frequencies.
      embed_at: "every_layer" | "input" (above).
      activation: "silu" | "relu".
      num_classes: if set, y (B,) int labels in [0, num_classes] (num_classes = null label) are
        embedded and added to (every_layer) or concatenated with (input) the noise embedding;
        if None, y is ignored.
      learn_sigma: output 2D values, the second D a learned variance (`ScoreModel`).
    """

    hidden: int = 256
    n_layers: int = 3
    embedding: str = "sinusoidal"
    embed_dim: int = 128
    fourier_scale: float = 16.0
    embed_at: str = "every_layer"
    activation: str = "silu"
    num_classes: int | None = None
    learn_sigma: bool = False

    @nn.compact
    def __call__(self, x: Array, t: Array, y: Array | None = None, train: bool = False) -> Array:
        """x (B, D), t (B,) noise conditioning, y (B,) int labels or None -> (B, D)
        ((B, 2D) with learn_sigma).

        `train` is accepted for a uniform interface; the MLP has no dropout.
        """
        if self.embed_at not in EMBED_AT:
            raise ValueError(f"Unknown embed_at {self.embed_at!r}: must be one of {EMBED_AT}.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"Unknown activation {self.activation!r}: must be one of "
                             f"{sorted(ACTIVATIONS)}.")
        act = ACTIVATIONS[self.activation]
        out_dim = x.shape[-1] * (2 if self.learn_sigma else 1)
        emb = noise_embedding(self.embedding, t, self.embed_dim, self.fourier_scale)
        emb = emb.astype(x.dtype)           # formed in float32, then the network's dtype
        if self.embed_at == "input":
            parts = [x, emb]
            if self.num_classes is not None:
                parts.append(label_embedding(y, self.num_classes, self.embed_dim, x.shape[0]))
            h = jnp.concatenate(parts, axis=-1)
            for _ in range(self.n_layers):
                h = act(nn.Dense(self.hidden, kernel_init=default_init())(h))
            return nn.Dense(out_dim, kernel_init=default_init(0.0))(h)
        emb = act(nn.Dense(self.hidden, kernel_init=default_init())(emb))
        if self.num_classes is not None:
            emb = emb + label_embedding(y, self.num_classes, self.hidden, x.shape[0])
        cond = nn.Dense(self.hidden * self.n_layers, kernel_init=_blockwise(self.n_layers),
                        name="Dense_emb")(emb)
        h = x
        for layer in range(self.n_layers):
            h = nn.Dense(self.hidden, kernel_init=default_init())(h)
            h = act(h + cond[:, layer * self.hidden:(layer + 1) * self.hidden])
        return nn.Dense(out_dim, kernel_init=default_init(0.0))(h)


EMBED_AT = ("every_layer", "input")
ACTIVATIONS = {"silu": nn.silu, "relu": nn.relu}


def _blockwise(n_blocks: int) -> nn.initializers.Initializer:
    """default_init for a kernel (d, n_blocks * h) made of n_blocks (d, h) blocks, each drawn
    as a (d, h) Dense kernel (fan_avg counts h outputs, not n_blocks * h)."""
    def init(key, shape, dtype=jnp.float32):
        d, width = shape
        keys = jax.random.split(key, n_blocks)
        blocks = [default_init()(k, (d, width // n_blocks), dtype) for k in keys]
        return jnp.concatenate(blocks, axis=1)

    return init
