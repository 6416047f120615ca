"""Tests of diffusion/models/ncsnpp.py: the NCSN++ / DDPM++ networks and FIR resampling.

Full-size networks are only traced (`jax.eval_shape`) except in the slow tests; behaviour is
checked at reduced width (nf=16, ch_mult=(1, 2), one block per level, attention at 8x8 on
16x16x3 images) with random parameters, since the zero-initialised last layers make the
output exactly 0 at init.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion import models
from diffusion.models import layers, ncsnpp
from diffusion.models.ncsnpp import NCSNpp
from tests.helpers import random_params

TINY = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)

# Sizes of the paper's CIFAR-10 models. Neither score_sde's README table nor the paper (Song et
# al. 2021, Tables 2-3 and appendix H) gives parameter counts; these are the counts of score_sde's
# own network (its models/ncsnpp.py at commit 0acb9e0, built from its configs
# vp/cifar10_ddpmpp[_deep]_continuous.py and ve/cifar10_ncsnpp[_deep]_continuous.py, params of
# `jax.eval_shape(init)`): 61.80M, 106.63M, 62.76M and 107.59M. Both count the 128 Fourier
# frequencies W, a stop-gradient parameter in each.
SCORE_SDE_PARAMS = {"ddpmpp_cont": 61_804_419, "ddpmpp_deep_cont": 106_632_579,
                    "ncsnpp_cont": 62_758_915, "ncsnpp_deep_cont": 107_587_075}


def _count(tree) -> int:
    return sum(p.size for p in jax.tree.leaves(tree))


def _inputs(shape, key=0):
    kx, kt = jax.random.split(jax.random.key(key))
    return jax.random.normal(kx, shape), jax.random.uniform(kt, (shape[0],), minval=-2.0,
                                                            maxval=3.0)


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("preset", sorted(ncsnpp.PRESETS))
def test_parameter_count_matches_score_sde(preset):
    net = NCSNpp(**ncsnpp.PRESETS[preset])
    shapes = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                            jnp.ones((1,)))
    assert _count(shapes["params"]) == SCORE_SDE_PARAMS[preset]


def test_ddpm_config_has_the_published_size():
    """Ho et al. 2020's CIFAR-10 U-Net (experiments/ddpm_cifar.py): 35.7M parameters (their
    appendix B: "Our CIFAR10 model has 35.7 million parameters")."""
    from experiments import ddpm_cifar

    net = models.get_model(ddpm_cifar.get_config())
    shapes = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                            jnp.ones((1,)))
    n = _count(shapes["params"])
    assert n == 35_746_307 and abs(n / 35.7e6 - 1) < 0.005


def test_get_model_builds_ncsnpp_and_ddpmpp():
    for name, preset in (("ddpmpp", "ddpmpp_cont"), ("ncsnpp", "ncsnpp_cont")):
        cfg = dict(ncsnpp.PRESETS[preset], name=name, ema_rate=0.9999)
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
        net = models.get_model(ml_collections.ConfigDict({"model": cfg}))
        assert isinstance(net, NCSNpp)
        assert net.fir == ncsnpp.PRESETS[preset]["fir"]
        assert net.ch_mult == (1, 2, 2, 2)


# ----------------------------------------------------------------------------- forward


# Between them these use every option value: both block types, FIR and plain resampling, the
# three output and three input pyramids, both combine methods and both embeddings. ddpm blocks
# with plain resampling and no pyramids are the network of the class-conditioning test.
VARIANTS = [
    # resblock, fir, progressive, progressive_input, combine, embedding
    ("ddpm", True, "output_skip", "input_skip", "sum", "fourier"),
    ("biggan", True, "none", "residual", "sum", "fourier"),       # NCSN++ (CIFAR-10)
    ("biggan", True, "residual", "input_skip", "cat", "positional"),
    ("biggan", False, "none", "none", "sum", "positional"),       # DDPM++
]


def _tiny(resblock, fir, progressive, progressive_input, combine, embedding, **kwargs):
    return NCSNpp(**dict(TINY, **kwargs), resblock_type=resblock, fir=fir, progressive=progressive,
                  progressive_input=progressive_input, progressive_combine=combine,
                  embedding_type=embedding)


# Eager (op-by-op) execution compiles every primitive separately, which costs seconds on CPU:
# jit == eager is checked on the variant that uses every FIR layer (upfirdn2d up and down,
# FIRConv up and down) and both skip pyramids, with -m slow (18 s on 2 cores; the FIR layers
# are also checked against score_sde's score on its checkpoints, test_score_sde_compat.py).
EAGER = {0}


@pytest.mark.parametrize("index", [pytest.param(i, marks=pytest.mark.slow) if i in EAGER else i
                                   for i in range(len(VARIANTS))],
                         ids=["-".join(map(str, v)) for v in VARIANTS])
def test_forward_shape_finite_and_jit_matches_eager(index):
    net = _tiny(*VARIANTS[index])
    x, t = _inputs((2, 16, 16, 3))
    params = random_params(net, x, t)
    out = jax.jit(net.apply)({"params": params}, x, t)
    assert out.shape == x.shape
    assert bool(jnp.all(jnp.isfinite(out)))
    assert float(jnp.std(out)) > 0
    if index in EAGER:
        np.testing.assert_allclose(net.apply({"params": params}, x, t), out, rtol=2e-4,
                                   atol=2e-4)


def test_invalid_options_and_sizes_raise():
    net = _tiny(*VARIANTS[1])
    x, t = _inputs((2, 16, 16, 3))
    with pytest.raises(ValueError, match="progressive"):
        jax.eval_shape(NCSNpp(**TINY, progressive="bogus").init, jax.random.key(0), x, t)
    with pytest.raises(ValueError, match="divisible"):
        jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 9, 9, 3)), t[:1])


def test_class_conditioning_and_unconditional():
    net = NCSNpp(**TINY, resblock_type="ddpm", num_classes=10, conditional=False)
    x, t = _inputs((2, 16, 16, 3))
    y = jnp.array([1, 7])
    params = random_params(net, x, t, y)
    apply = jax.jit(net.apply)
    out_y = apply({"params": params}, x, t, y)
    assert out_y.shape == x.shape
    assert not np.allclose(apply({"params": params}, x, t, y[::-1]), out_y)
    # conditional=False: t is ignored.
    np.testing.assert_array_equal(apply({"params": params}, x, t + 1.0, y), out_y)


@pytest.mark.slow   # 8 s on 2 cores; NCSN++ gradients also run in the slow CIFAR smoke runs
def test_backward_finite_and_dropout_only_in_train_mode():
    """Gradients of a training-mode loss (dropout on) are finite; dropout acts only in train."""
    net = _tiny(*VARIANTS[1], dropout=0.5)
    x, t = _inputs((2, 16, 16, 3))
    params = random_params(net, x, t, scale=0.1)

    def loss(p, key):
        out = net.apply({"params": p}, x, t, train=True, rngs={"dropout": key})
        return jnp.sum(out ** 2), out

    grad_fn = jax.jit(jax.grad(loss, has_aux=True))
    grads, out_a = grad_fn(params, jax.random.key(1, impl="rbg"))  # rbg: fast to compile
    leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]  # numpy: no per-shape compiles
    assert all(np.isfinite(g).all() for g in leaves)
    assert sum(np.abs(g).sum() for g in leaves) > 0
    _, out_b = grad_fn(params, jax.random.key(2, impl="rbg"))
    assert not np.allclose(out_a, out_b)

    apply = jax.jit(net.apply)  # train=False: deterministic, no dropout rng needed
    eval_out = apply({"params": params}, x, t)
    np.testing.assert_array_equal(apply({"params": params}, x, t), eval_out)
    assert not np.allclose(out_a, eval_out)


def test_resampling_layers_keep_score_sde_parameter_names():
    """FIRUpsample / FIRDownsample are named Upsample_<i> / Downsample_<i> in call order, the
    parameterless ones (FIR without conv) counted too, as in score_sde's checkpoints, which
    compat/score_sde.py maps onto these names one to one."""
    net = _tiny(*VARIANTS[0], ch_mult=(1, 2, 2))   # ddpm blocks: conv + plain FIR, interleaved
    x, t = _inputs((1, 16, 16, 3))
    params = jax.eval_shape(net.init, jax.random.key(0), x, t)["params"]
    resampling = {name: params[name]["FIRConv_0"]["kernel"].shape for name in params
                  if "sample" in name}
    assert resampling == {"Downsample_0": (3, 3, 16, 16), "Downsample_2": (3, 3, 32, 32),
                          "Upsample_0": (3, 3, 32, 32), "Upsample_2": (3, 3, 32, 32)}


# ----------------------------------------------------------------------------- FIR


def test_naive_resampling_is_nearest_neighbour_and_block_mean():
    """Without FIR, NCSN++ resamples with layers.naive_upsample / naive_downsample (used by
    guidance's super-resolution too): each pixel repeated into a factor x
    factor block, and each such block averaged; down(up(x)) = x."""
    x = np.random.default_rng(0).standard_normal((2, 4, 6, 3)).astype(np.float32)
    for factor in (2, 3):
        up = layers.naive_upsample(jnp.asarray(x), factor)
        np.testing.assert_array_equal(up, np.repeat(np.repeat(x, factor, 1), factor, 2))
        np.testing.assert_allclose(layers.naive_downsample(up, factor), x, rtol=1e-6)
    down = layers.naive_downsample(jnp.asarray(x), 2)
    np.testing.assert_allclose(down, x.reshape(2, 2, 2, 3, 2, 3).mean(axis=(2, 4)), rtol=1e-6)


def test_fir_kernel_is_normalised_outer_product():
    k = ncsnpp.fir_kernel_2d((1, 3, 3, 1))
    np.testing.assert_allclose(k, np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0)


def test_fir_resampling_keeps_constants():
    x = jnp.full((1, 16, 16, 2), 3.0)
    up, down = ncsnpp.fir_upsample(x), ncsnpp.fir_downsample(x)
    assert up.shape == (1, 32, 32, 2) and down.shape == (1, 8, 8, 2)
    # Zero padding is felt only at the border.
    np.testing.assert_allclose(up[:, 2:-2, 2:-2], 3.0, rtol=1e-6)
    np.testing.assert_allclose(down[:, 1:-1, 1:-1], 3.0, rtol=1e-6)
    for layer in (ncsnpp.FIRUpsample(fir=True), ncsnpp.FIRDownsample(fir=True)):
        assert jax.tree.leaves(layer.init(jax.random.key(0), x)) == []


def test_fir_down_then_up_of_smooth_image_is_close():
    grid = np.arange(32) / 32.0
    img = np.sin(2 * np.pi * grid)[:, None] * np.cos(2 * np.pi * grid)[None, :]
    x = jnp.asarray(img, jnp.float32)[None, :, :, None]
    back = ncsnpp.fir_upsample(ncsnpp.fir_downsample(x))
    assert back.shape == x.shape
    interior = (slice(None), slice(4, -4), slice(4, -4))
    err = float(jnp.max(jnp.abs(back[interior] - x[interior])))
    assert err < 0.1, err  # the filters are low-pass: a slow wave survives, slightly damped
    np.testing.assert_allclose(back[interior], x[interior], atol=0.1)


@pytest.mark.parametrize("direction", ["up", "down"])
def test_fir_conv_with_identity_kernel_is_plain_fir_resampling(direction):
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 2))
    conv = ncsnpp.FIRConv(2, up=direction == "up", down=direction == "down")
    w = np.zeros((3, 3, 2, 2), np.float32)
    w[1, 1] = np.eye(2)
    out = conv.apply({"params": {"kernel": w, "bias": np.zeros(2, np.float32)}}, x)
    ref = ncsnpp.fir_upsample(x) if direction == "up" else ncsnpp.fir_downsample(x)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- slow


def _paper_network(name):
    """(network, input shape, expected parameter count) of each paper-size network."""
    if name in ncsnpp.PRESETS:
        return NCSNpp(**ncsnpp.PRESETS[name]), (2, 32, 32, 3), SCORE_SDE_PARAMS[name]
    from experiments import ddpm_cifar, ve_celebahq256

    if name == "ddpm":
        return models.get_model(ddpm_cifar.get_config()), (2, 32, 32, 3), 35_746_307
    # score_sde's NCSNpp from its configs/ve/celebahq_256_ncsnpp_continuous.py has 65_574_549
    # parameters (counted as SCORE_SDE_PARAMS), its 128 Fourier frequencies W included.
    return models.get_model(ve_celebahq256.get_config()), (1, 256, 256, 3), 65_574_549


@pytest.mark.slow
@pytest.mark.parametrize("name", [*sorted(ncsnpp.PRESETS), "ddpm", "ncsnpp_256"])
def test_full_size_forward_backward(name):
    net, shape, n_params = _paper_network(name)
    x, _ = _inputs(shape)
    t = jnp.linspace(10.0, 900.0, shape[0])
    variables = jax.jit(net.init)(jax.random.key(0), x, t)
    assert _count(variables["params"]) == n_params

    def loss(p):
        out = net.apply({"params": p}, x, t, train=True, rngs={"dropout": jax.random.key(1)})
        return jnp.mean((out - x) ** 2), out

    (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    assert out.shape == x.shape
    assert np.isfinite(float(value))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    # The zero-initialised output layers get a gradient, so training can start.
    assert sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(grads)) > 0
