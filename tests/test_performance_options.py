"""Rematerialisation and bfloat16 mixed precision: the same network, less memory / cheaper math.

Reduced-width networks on 16x16x3 images with random parameters (the zero-initialised last
layers would otherwise make every output 0). NCSN++ (FIR, BigGAN blocks, Fourier embedding) and
the U-Net (DDPM blocks, sinusoidal embedding) between them use every block type; DDPM++ is
NCSN++'s class with a subset of those options.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion import losses, models, train
from diffusion import sde as sde_lib
from diffusion.models import DiT, NCSNpp, UNet, UViT, ncsnpp, parameterization
from tests.helpers import random_params

NETWORKS = {
    "ncsnpp": (NCSNpp, dict(ncsnpp.PRESETS["ncsnpp_cont"], nf=16, ch_mult=(1, 2),
                            num_res_blocks=1, attn_resolutions=(8,), dropout=0.1)),
    "unet": (UNet, dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                        dropout=0.1)),
    "dit": (DiT, dict(patch_size=2, hidden_size=32, depth=3, num_heads=2)),
    "uvit": (UViT, dict(patch_size=2, hidden_size=32, depth=3, num_heads=2)),
}


def _inputs(batch=2):
    x = jax.random.normal(jax.random.key(1), (batch, 16, 16, 3))
    t = jnp.linspace(0.05, 0.95, batch)
    return x, t


@pytest.mark.slow   # 17 s (U-Net) and more (NCSN++) on 2 cores, compiling both versions
@pytest.mark.parametrize("name", ["ncsnpp", "unet", "dit", "uvit"])
def test_remat_gives_the_same_parameters_outputs_and_gradients(name):
    cls, kwargs = NETWORKS[name]
    plain, remat = cls(**kwargs), cls(**kwargs, remat=True)
    x, t = _inputs()
    c_noise = 999.0 * t
    shapes = jax.eval_shape(plain.init, jax.random.key(0), x, c_noise)
    assert jax.tree.structure(shapes) == jax.tree.structure(
        jax.eval_shape(remat.init, jax.random.key(0), x, c_noise))   # same names: checkpoints load
    params = random_params(plain, x, c_noise, scale=0.05)
    param_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(params))

    def forward_backward(net):
        """Loss, gradients, and the bytes of activations the VJP keeps for the backward pass."""
        def forward(p):   # train=True: dropout must draw the same masks with or without remat
            return net.apply({"params": p}, x, c_noise, train=True,
                             rngs={"dropout": jax.random.key(7)})

        out, vjp = jax.vjp(jax.jit(forward), params)
        grads = jax.jit(lambda v, ct: v(ct)[0])(vjp, 2.0 * (out - x) / x.size)
        kept = sum(leaf.nbytes for leaf in jax.tree.leaves(vjp)) - param_bytes
        return jnp.mean((out - x) ** 2), grads, kept

    value, grads, kept = forward_backward(plain)
    value_r, grads_r, kept_r = forward_backward(remat)
    np.testing.assert_allclose(value_r, value, rtol=1e-6)
    for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r), strict=True):
        np.testing.assert_allclose(g_r, g, rtol=1e-4, atol=1e-6)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(grads)) > 0
    # What remat is for: the activations kept for the backward pass shrink to the blocks'
    # inputs (about 8x less here).
    assert kept_r < 0.25 * kept, (kept_r, kept)


def _conv_and_matmul_dtypes(jaxpr) -> collections.Counter:
    """Operand dtypes of every convolution and matmul in a (closed) jaxpr, nested ones included
    (a bfloat16 product may accumulate into float32, as attention's logits do)."""
    counts = collections.Counter()

    def walk(j):
        for eqn in j.eqns:
            if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
                counts.update({str(v.aval.dtype) for v in eqn.invars})
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", None)
                if inner is not None:
                    walk(getattr(inner, "jaxpr", inner))

    walk(jaxpr.jaxpr)
    return counts


# NCSN++ with -m slow (the U-Net runs the same mixed-precision path by default).
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "ncsnpp" else n
                                  for n in sorted(NETWORKS)])
def test_bfloat16_score_model_computes_in_bfloat16_and_stays_close(name):
    cls, kwargs = NETWORKS[name]
    net = cls(**kwargs)
    sde = sde_lib.VPSDE()
    x, t = _inputs(4)
    params = random_params(net, x, 999.0 * t, scale=0.05)
    full = parameterization.make_score_model(net, sde)
    mixed = parameterization.make_score_model(net, sde, compute_dtype="bfloat16")
    ref, out = jax.jit(full)(params, x, t), jax.jit(mixed)(params, x, t)
    assert out.dtype == jnp.float32 and out.shape == x.shape
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert 1e-5 < rel < 3e-2, rel       # bfloat16 has an 8-bit mantissa: close, not equal
    # Every convolution and matmul runs in bfloat16: nothing silently promoted to float32.
    counts = _conv_and_matmul_dtypes(jax.make_jaxpr(lambda p: mixed(p, x, t))(params))
    assert set(counts) == {"bfloat16"} and counts["bfloat16"] > 10, counts
    with pytest.raises(ValueError, match="Unknown compute dtype 'float16'"):
        parameterization.make_score_model(net, sde, compute_dtype="float16")


@pytest.mark.slow   # 18 s on 2 cores; the bfloat16 forward pass is tested by default above
def test_bfloat16_gradients_reach_float32_parameters():
    cls, kwargs = NETWORKS["unet"]
    net = cls(**kwargs)
    sde = sde_lib.VPSDE()
    x, t = _inputs(8)
    params = random_params(net, x, 999.0 * t, scale=0.05)
    keys = jax.random.split(jax.random.key(3), 8)
    grads = {}
    for dtype in ("float32", "bfloat16"):
        model = parameterization.make_score_model(net, sde, compute_dtype=dtype)
        loss_fn = losses.get_loss_fn(sde, model, reduce_mean=True)
        grads[dtype] = jax.jit(jax.grad(lambda p, fn=loss_fn: jnp.mean(
            fn(p, {"x": x}, keys))))(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads["bfloat16"]))
    flat32 = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads["float32"])])
    flat16 = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads["bfloat16"])])
    cosine = float(flat32 @ flat16 / (jnp.linalg.norm(flat32) * jnp.linalg.norm(flat16)))
    assert cosine > 0.99, cosine


@pytest.mark.slow   # 27 s on 2 cores; the bfloat16 forward and gradients are tested above
def test_mixed_precision_training_from_the_config(tmp_path):
    from experiments import digits

    config = digits.get_config("smoke")
    config.training.compute_dtype = "bfloat16"
    config.model.remat = True
    config.model.update(ch=8, num_res_blocks=1)     # the cheapest U-Net: this tests the wiring
    config.training.snapshot_sampling = False
    config.training.eval_freq = 0
    state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == config.training.n_iters
    for leaf in jax.tree.leaves((state.params, state.ema_params)):
        assert leaf.dtype == jnp.float32        # parameters, EMA and checkpoints stay float32
    config.training.compute_dtype = "float16"
    with pytest.raises(ValueError, match="training.compute_dtype must be one of"):
        train.build(config)


def test_untrained_fourier_frequencies_stay_float32_and_skip_weight_decay():
    """The Fourier frequencies W (x 2 pi log sigma, |W| ~ 16) would lose the phase in bfloat16,
    and AdamW would shrink them although they are never trained."""
    net = models.MLP(hidden=8, n_layers=1, embedding="fourier", embed_dim=8)
    x, t = jnp.ones((4, 2)), jnp.linspace(-2.0, 3.0, 4)
    params = net.init(jax.random.key(0), x, t)["params"]
    cast = parameterization.cast_floating(params, jnp.bfloat16)
    assert cast["GaussianFourierProjection_0"]["W"].dtype == jnp.float32
    assert {leaf.dtype for path, leaf in jax.tree_util.tree_leaves_with_path(cast)
            if "GaussianFourierProjection" not in jax.tree_util.keystr(path)} == {
        jnp.dtype(jnp.bfloat16)}

    # W's real gradient is zero (stop-gradient), so only weight decay could move it.
    grads = jax.grad(lambda p: jnp.sum(net.apply({"params": p}, x, t) ** 2))(params)
    np.testing.assert_array_equal(grads["GaussianFourierProjection_0"]["W"], 0.0)
    tx = train.create_optimizer(1e-2, weight_decay=0.1)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["GaussianFourierProjection_0"]["W"], 0.0)
    unmasked = optax.adamw(1e-2, weight_decay=0.1)
    updates, _ = unmasked.update(grads, unmasked.init(params), params)
    assert np.all(np.asarray(updates["GaussianFourierProjection_0"]["W"]) != 0.0)
