"""Tests of diffusion/models: embeddings, blocks, MLP, UNet and get_model.

Networks start with zero-initialised last layers (their output is exactly 0 at init), so tests
that look at outputs first replace the parameters by random ones.
"""

import dataclasses
import functools
import glob
import importlib
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion import models
from diffusion.models import layers
from tests.helpers import random_params

TINY_UNET = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)


def _init(net, *args, **kwargs):
    """Jitted init with an "rbg" key, which compiles several times faster than threefry."""
    key = jax.random.key(0, impl="rbg")
    return jax.jit(net.init, static_argnames="train")(key, *args, **kwargs)


def _apply(net, use_jit):
    return jax.jit(net.apply, static_argnames="train") if use_jit else net.apply


def _count(params) -> int:
    return sum(p.size for p in jax.tree.leaves(params))


def _inputs(shape, key=0):
    kx, kt = jax.random.split(jax.random.key(key))
    return jax.random.normal(kx, shape), 999.0 * jax.random.uniform(kt, (shape[0],))


# ----------------------------------------------------------------------------- layers


def test_sinusoidal_embedding_values():
    t = jnp.array([0.0, 3.0])
    emb = layers.sinusoidal_embedding(t, 4)
    # dim 4: frequencies 1 and 1/10000 (DDPM: 10000^(-k / (dim/2 - 1))).
    expected = [[0, 0, 1, 1], [math.sin(3), math.sin(3e-4), math.cos(3), math.cos(3e-4)]]
    np.testing.assert_allclose(emb, expected, rtol=1e-6, atol=1e-7)
    odd = layers.sinusoidal_embedding(t, 7)
    assert odd.shape == (2, 7)
    np.testing.assert_array_equal(odd[:, -1], 0.0)


def test_fourier_projection_frequencies_are_an_untrained_parameter():
    """score_sde's layout: W (E/2,) ~ N(0, scale^2) is a parameter "W" (so a checkpoint's
    frequencies load) behind a stop-gradient (so training never changes it)."""
    proj = layers.GaussianFourierProjection(embed_dim=6, scale=16.0)
    t = jnp.array([0.5, -1.0])
    variables = proj.init(jax.random.key(0), t)
    w = np.asarray(variables["params"]["W"])
    assert w.shape == (3,)
    angles = 2 * np.pi * np.asarray(t)[:, None] * w[None, :]
    np.testing.assert_allclose(proj.apply(variables, t),
                               np.concatenate([np.sin(angles), np.cos(angles)], -1), rtol=1e-5)
    grads = jax.grad(lambda p: jnp.sum(proj.apply({"params": p}, t)))(variables["params"])
    np.testing.assert_array_equal(grads["W"], 0.0)
    many = layers.GaussianFourierProjection(embed_dim=20_000, scale=16.0)
    draws = np.asarray(many.init(jax.random.key(1), t)["params"]["W"])
    assert abs(draws.std() - 16.0) < 0.5 and abs(draws.mean()) < 0.5


def test_attention_projections_start_at_score_sde_scales():
    """q, k, v at variance_scaling(0.1, fan_avg, uniform) (score_sde's NIN default), the output
    projection at init_scale (0: variance scale 1e-10, as score_sde's default_init(0))."""
    block = layers.AttnBlock()
    x = jnp.zeros((1, 8, 8, 64))
    params = block.init(jax.random.key(0), x)["params"]
    bound = np.sqrt(3 * 0.1 / 64)              # uniform(-b, b) with b^2 / 3 = 0.1 / fan_avg
    for name in ("q", "k", "v"):
        kernel = np.asarray(params[name]["kernel"])
        assert np.abs(kernel).max() <= bound
        assert abs(kernel.std() - bound / np.sqrt(3)) < 0.05 * bound
    out = np.asarray(params["proj_out"]["kernel"])
    assert 0 < np.abs(out).max() <= np.sqrt(3 * 1e-10 / 64)


@pytest.mark.parametrize("channels", [1, 3, 8, 24, 64, 96, 192, 256, 384, 640])
def test_num_groups_divides_channels(channels):
    groups = layers.num_groups(channels)
    assert channels % groups == 0 and 1 <= groups <= 32


@pytest.mark.parametrize("resamp_with_conv", [True, False])
def test_blocks_shapes(resamp_with_conv):
    x = jnp.ones((2, 8, 8, 4))
    temb = jnp.ones((2, 16))

    def out_shape(module, *args):
        run = lambda: module.apply(module.init(jax.random.key(0), *args), *args)
        return jax.eval_shape(run).shape

    assert out_shape(layers.ResnetBlock(out_ch=6, skip_rescale=True), x, temb) == (2, 8, 8, 6)
    assert out_shape(layers.AttnBlock(), x) == x.shape
    assert out_shape(layers.Downsample(resamp_with_conv), x) == (2, 4, 4, 4)
    assert out_shape(layers.Upsample(resamp_with_conv), x) == (2, 16, 16, 4)


def test_residual_blocks_start_as_identity():
    """DDPM "zero"-initialises the last layer of each residual branch: variance scale 1e-10, as
    DDPM's and score_sde's default_init(0), so weights of order 1e-5, not exact zeros (which
    would differ from the authors' initial networks)."""
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    for block in (layers.ResnetBlock(), layers.AttnBlock()):
        variables = block.init(jax.random.key(1), x)
        out = jax.jit(lambda x, v=variables, block=block: block.apply(v, x))(x)
        np.testing.assert_allclose(out, x, atol=1e-3)
        assert np.any(np.asarray(out) != np.asarray(x))
    kernel = layers.default_init(0.0)(jax.random.key(2), (3, 3, 64, 64))
    bound = np.sqrt(3 * 1e-10 / 576)          # variance_scaling(1e-10, fan_avg, uniform)
    assert 0.5 * bound < float(np.max(np.abs(kernel))) <= bound


# ----------------------------------------------------------------------------- MLP


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("embedding", ["sinusoidal", "fourier"])
def test_mlp_shape_and_finite(use_jit, embedding):
    net = models.MLP(hidden=16, n_layers=2, embedding=embedding, embed_dim=8)
    x, t = _inputs((5, 3))
    params = random_params(net, x, t)
    out = _apply(net, use_jit)({"params": params}, x, t, train=True)
    assert out.shape == x.shape
    assert np.all(np.isfinite(out)) and np.std(out) > 0


def test_mlp_parameter_count_by_hand():
    d, hidden, n_layers, embed_dim = 3, 16, 2, 8
    net = models.MLP(hidden=hidden, n_layers=n_layers, embed_dim=embed_dim)
    params = _init(net, *_inputs((2, d)))["params"]
    dense = lambda i, o: i * o + o
    expected = (dense(embed_dim, hidden)                            # noise embedding projection
                + dense(d, hidden) + dense(hidden, hidden)          # layer 0 + its embedding
                + (n_layers - 1) * 2 * dense(hidden, hidden)        # later layers
                + dense(hidden, d))                                 # output
    assert _count(params) == expected


def test_mlp_input_embedding_parameter_count_by_hand():
    """embed_at="input": [x, embed(t)] -> hidden x n_layers -> d; at hidden 256, 3 layers and a
    16-dim embedding, 137k parameters (the size benchmarks/peers.py compares)."""
    dense = lambda i, o: i * o + o
    for d, hidden, n_layers, embed_dim in [(3, 16, 2, 8), (2, 256, 3, 16)]:
        net = models.MLP(hidden=hidden, n_layers=n_layers, embed_dim=embed_dim,
                         embed_at="input", activation="relu")
        params = _init(net, *_inputs((2, d)))["params"]
        expected = (dense(d + embed_dim, hidden) + (n_layers - 1) * dense(hidden, hidden)
                    + dense(hidden, d))
        assert _count(params) == expected
    assert expected == 136_962


def test_mlp_embedding_projections_are_initialised_as_separate_layers():
    """The n_layers projections of the embedding are one (hidden, n_layers * hidden) kernel;
    each block is drawn as a (hidden, hidden) Dense kernel: uniform with limit sqrt(3 / hidden)
    (fan_avg of one layer), not sqrt(3 / (2 hidden)) as for one wide layer."""
    hidden, n_layers = 64, 3
    net = models.MLP(hidden=hidden, n_layers=n_layers, embed_dim=8)
    kernel = _init(net, *_inputs((2, 2)))["params"]["Dense_emb"]["kernel"]
    assert kernel.shape == (hidden, n_layers * hidden)
    limit = np.sqrt(3.0 / hidden)
    for block in np.split(np.asarray(kernel), n_layers, axis=1):
        assert 0.95 * limit < np.max(np.abs(block)) <= limit
        np.testing.assert_allclose(np.var(block), limit**2 / 3, rtol=0.1)
    blocks = np.split(np.asarray(kernel), n_layers, axis=1)
    assert not np.allclose(blocks[0], blocks[1])       # independent draws


def test_mlp_rejects_unknown_options():
    x, t = _inputs((2, 2))
    with pytest.raises(ValueError, match=r"Unknown embed_at 'output'.*'every_layer', 'input'"):
        _init(models.MLP(embed_at="output"), x, t)
    with pytest.raises(ValueError, match=r"Unknown activation 'gelu'.*\['relu', 'silu'\]"):
        _init(models.MLP(activation="gelu"), x, t)


@pytest.mark.parametrize("embed_at", ["every_layer", "input"])
def test_mlp_class_conditional(embed_at):
    net = models.MLP(hidden=16, n_layers=1, embed_dim=8, num_classes=4, embed_at=embed_at)
    x, t = _inputs((3, 2))
    y = jnp.array([0, 1, 4])  # 4 is the null label
    params = random_params(net, x, t, y=y)
    assert params["Embed_0"]["embedding"].shape == (5, 16 if embed_at == "every_layer" else 8)
    out = net.apply({"params": params}, x, t, y=y)
    assert out.shape == x.shape
    assert not np.allclose(out, net.apply({"params": params}, x, t, y=jnp.array([2, 3, 0])))
    # y=None means the null label.
    np.testing.assert_array_equal(net.apply({"params": params}, x, t),
                                  net.apply({"params": params}, x, t, y=jnp.full((3,), 4)))


# ----------------------------------------------------------------------------- UNet


@pytest.fixture(scope="module")
def tiny_unet():
    """The tiny 8x8x1 UNet and randomised parameters, shared by several tests."""
    net = models.UNet(**{**TINY_UNET, "dropout": 0.5})
    x, t = _inputs((4, 8, 8, 1))
    return net, random_params(net, x, t), x, t


@pytest.mark.slow   # 11 s on 2 cores (the eager U-Net); the jitted shapes are tested below
def test_unet_8x8_shape_finite_and_jit_equals_eager(tiny_unet):
    net, params, x, t = tiny_unet
    rngs = {"dropout": jax.random.key(2)}
    out = net.apply({"params": params}, x, t, train=True, rngs=rngs)
    assert out.shape == x.shape
    assert np.all(np.isfinite(out)) and np.std(out) > 0
    jitted = jax.jit(net.apply, static_argnames="train")
    np.testing.assert_allclose(jitted({"params": params}, x, t, train=True, rngs=rngs), out,
                               rtol=1e-4, atol=1e-4)
    # Unconditional networks ignore labels (the training loop passes the dataset's labels).
    np.testing.assert_array_equal(net.apply({"params": params}, x, t, y=jnp.arange(4)),
                                  net.apply({"params": params}, x, t))


def test_unet_near_zero_output_at_init():
    """The last conv at DDPM's "zero" init (variance scale 1e-10): outputs of order 1e-5."""
    net = models.UNet(**TINY_UNET)
    x, t = _inputs((2, 8, 8, 1))
    key = jax.random.key(0, impl="rbg")
    out = np.asarray(jax.jit(lambda x, t: net.apply(net.init(key, x, t), x, t))(x, t))
    assert 0 < np.abs(out).max() < 1e-3


def test_unet_dropout_only_in_train_mode(tiny_unet):
    net, params, x, t = tiny_unet
    apply = jax.jit(lambda key, train: net.apply({"params": params}, x, t, train=train,
                                                 rngs={"dropout": key}), static_argnums=1)
    key_a, key_b = jax.random.key(3), jax.random.key(4)
    assert not np.allclose(apply(key_a, True), apply(key_b, True))
    np.testing.assert_array_equal(apply(key_a, False), apply(key_b, False))


def test_unet_16x16x3_class_conditional():
    net = models.UNet(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
                      dropout=0.1, embedding="fourier", num_classes=3, skip_rescale=True,
                      resamp_with_conv=False)
    x, t = _inputs((2, 16, 16, 3))
    t = jnp.log(t / 999.0)  # Fourier features expect log sigma
    y = jnp.array([0, 3])  # 3 is the null label
    shapes = jax.eval_shape(net.init, jax.random.key(0), x, t, y=y)["params"]
    assert shapes["Embed_0"]["embedding"].shape == (4, 32)
    params = random_params(net, x, t, y=y)
    apply = jax.jit(net.apply, static_argnames="train")
    out = apply({"params": params}, x, t, y=y, train=False)
    assert out.shape == x.shape
    assert np.all(np.isfinite(out)) and np.std(out) > 0
    other = apply({"params": params}, x, t, y=jnp.array([1, 2]), train=False)
    assert not np.allclose(out, other)
    np.testing.assert_array_equal(apply({"params": params}, x, t, train=False),
                                  apply({"params": params}, x, t, y=jnp.full((2,), 3), train=False))


def test_unet_parameter_count_by_hand():
    """TINY_UNET on 8x8x1, counted layer by layer from the DDPM layout."""
    conv = lambda k, i, o: k * k * i * o + o
    dense = lambda i, o: i * o + o
    norm = lambda c: 2 * c
    emb = 32  # 4 * ch

    def resnet(i, o):
        skip = conv(1, i, o) if i != o else 0
        return norm(i) + conv(3, i, o) + dense(emb, o) + norm(o) + conv(3, o, o) + skip

    attn = lambda c: norm(c) + 4 * dense(c, c)
    expected = (
        dense(8, emb) + dense(emb, emb)                       # noise embedding
        + conv(3, 1, 8)                                       # input conv     skips: 8
        + resnet(8, 8)                                        # 8x8, level 0   skips: 8, 8
        + conv(3, 8, 8)                                       # downsample     skips: 8, 8, 8
        + resnet(8, 16) + attn(16)                            # 4x4, level 1   skips: ..., 16
        + resnet(16, 16) + attn(16) + resnet(16, 16)          # middle
        + resnet(16 + 16, 16) + attn(16)                      # up, level 1
        + resnet(16 + 8, 16) + attn(16)
        + conv(3, 16, 16)                                     # upsample
        + resnet(16 + 8, 8) + resnet(8 + 8, 8)                # up, level 0
        + norm(8) + conv(3, 8, 1)                             # output
    )
    net = models.UNet(**TINY_UNET)
    shapes = jax.eval_shape(net.init, jax.random.key(0), *_inputs((1, 8, 8, 1)))
    assert _count(shapes["params"]) == expected


def test_unet_ddpm_cifar10_parameter_count():
    """The DDPM CIFAR-10 network (Ho et al. 2020: 35.7M parameters).

    Golden number: update it only when the architecture is meant to change (e.g. a different
    GroupNorm or attention layout), never to make an accidental change pass.
    """
    net = models.UNet(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,))
    shapes = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.ones(1))
    assert _count(shapes["params"]) == 35_746_307


def test_unet_rejects_bad_image_size():
    net = models.UNet(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=())
    with pytest.raises(ValueError, match="divisible by 4; got 6x6"):
        net.init(jax.random.key(0), *_inputs((1, 6, 6, 1)))
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        net.init(jax.random.key(0), *_inputs((1, 6)))


def test_unknown_embedding():
    net = models.MLP(embedding="learned")
    with pytest.raises(ValueError, match="Unknown embedding 'learned'.*sinusoidal"):
        net.init(jax.random.key(0), *_inputs((1, 2)))


# ----------------------------------------------------------------------------- get_model


def _config(**model):
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(
        {"ema_rate": 0.999, "parameterization": "epsilon", "noise_input": "time",
         "scale_input": True, "num_classes": None, **model})
    return config


def test_get_model_passes_only_fields_and_tuples():
    net = models.get_model(_config(name="unet", ch=8, ch_mult=[1, 2], num_res_blocks=1,
                                   attn_resolutions=[4], dropout=0.0))
    assert isinstance(net, models.UNet)
    assert net.ch_mult == (1, 2) and net.attn_resolutions == (4,) and net.ch == 8
    assert net.num_classes is None
    x, t = _inputs((2, 8, 8, 1))
    key = jax.random.key(0)
    run = lambda: net.apply(net.init(key, x, t, train=False), x, t, train=True,
                            rngs={"dropout": key})
    assert jax.eval_shape(run).shape == x.shape
    mlp = models.get_model(_config(name="mlp", hidden=32, n_layers=2))
    assert isinstance(mlp, models.MLP) and mlp.hidden == 32 and mlp.n_layers == 2


def test_get_model_unknown_name():
    with pytest.raises(ValueError, match=r"Unknown model 'resnet': config.model.name must be one "
                                         r"of \['classifier', 'ddpmpp', 'dit', 'mlp', "
                                         r"'ncsnpp', 'unet', 'uvit'\]"):
        models.get_model(_config(name="resnet"))


@functools.cache
def _smoke_configs_by_network() -> dict:
    """model.name -> the smoke config of an experiments/*.py that uses it (the one with the
    smallest data, so that tracing it is cheap)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = {}
    for path in sorted(glob.glob(os.path.join(root, "experiments", "*.py"))):
        module = os.path.basename(path)[:-3]
        if module in ("__init__", "default"):
            continue
        config = importlib.import_module(f"experiments.{module}").get_config("smoke")
        size = config.data.image_size or 0
        name = config.model.name
        if name not in found or size < (found[name].data.image_size or 0):
            found[name] = config
    return found


def _smoke_config(name: str) -> ml_collections.ConfigDict:
    """A fresh copy of the smoke config of an experiment whose network is `name`."""
    configs = _smoke_configs_by_network()
    assert name in configs, (f"no experiments/*.py uses model.name={name!r}: add an experiment "
                             f"(with a smoke variant) for the network")
    return configs[name].copy_and_resolve_references()


@pytest.mark.parametrize("name", sorted(models.NETWORKS))
def test_every_network_builds_from_an_experiment_config_and_fits_its_data(name):
    """Each name of models.NETWORKS is used by an experiment, whose smoke config builds the
    network through get_model; a score network's output is shaped like its input, a
    classifier's is (B, num_classes). A name mapped to the wrong class fails here: its
    experiment's keys are not that class's fields."""
    config = _smoke_config(name)
    net = models.get_model(config)
    d = config.data
    shape = (2, d.image_size, d.image_size, d.num_channels) if d.image_size else (2, 2)
    x, t = jnp.zeros(shape), jnp.full((2,), 0.5)
    y = jnp.zeros((2,), jnp.int32) if config.model.num_classes is not None else None
    out = jax.eval_shape(lambda: net.apply(net.init(jax.random.key(0), x, t, y=y, train=False),
                                           x, t, y=y, train=False))
    want = (2, config.model.num_classes) if name in models.CLASSIFIERS else shape
    if config.model.get("learn_variance"):     # dit_cifar: the variance's C channels too
        want = (*shape[:-1], 2 * shape[-1])
    assert out.shape == want and out.dtype == jnp.float32, (out, want)


@pytest.mark.parametrize("name", sorted(models.NETWORKS))
def test_get_model_refuses_a_field_of_another_network(name):
    """config.model holds the keys of one network: a field that only other networks have (set
    to their default) is an error naming it and the network, never silently dropped."""
    cls = models.NETWORKS[name]
    shared = {*models.SHARED_KEYS, *models.OPTIONAL_FIELDS}
    foreign = {f.name: 1 if f.default is dataclasses.MISSING else f.default
               for other in models.NETWORKS.values()
               for f in dataclasses.fields(other)
               if f.name not in models.network_fields(cls) | shared | {"parent", "name"}}
    assert foreign, "every network has a field the others do not"
    for field, default in sorted(foreign.items()):
        config = _smoke_config(name)
        with config.unlocked():
            config.model[field] = default
        with pytest.raises(ValueError, match=(rf"network '{name}' \({cls.__name__}\) does not "
                                              rf"take: \['{field}'\]")):
            models.get_model(config)
