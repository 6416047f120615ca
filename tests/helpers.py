"""Helpers shared by the tests."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np


def random_params(net, *args, seed=0, scale=0.3, **kwargs):
    """Parameters of `net` with every leaf drawn from N(0, scale^2), so no layer is zero (the
    zero-initialised last layers would otherwise make every output 0).

    Shapes come from `jax.eval_shape` and values from numpy: compiling a U-Net's init (threefry
    draws for every layer) costs seconds on CPU.
    """
    shapes = jax.eval_shape(net.init, jax.random.key(0), *args, **kwargs)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype),
                        shapes)


def data_context(config):
    """tfds.testing.mock_data (16 examples) for a config whose dataset is not embedded."""
    from diffusion import data as data_lib

    if config.data.dataset not in data_lib.EMBEDDED_DATASETS:
        import tensorflow_datasets as tfds

        return tfds.testing.mock_data(num_examples=16)
    return contextlib.nullcontext()
