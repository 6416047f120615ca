"""The transformer backbones (diffusion/models/dit.py, uvit.py, transformer.py): the papers' sizes
computed from the architecture, DiT's adaLN-Zero start at exactly 0, patches, the position and
timestep embeddings against their formulas, the null label, and tiny models that fit one batch of
digits and run through every sampler and the likelihood."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

from diffusion import likelihood, losses, sampling
from diffusion import sde as sde_lib
from diffusion.models import dit, parameterization, transformer, uvit
from tests.helpers import random_params


def _param_count(net, x, **kwargs) -> int:
    shapes = jax.eval_shape(net.init, jax.random.key(0), x, jnp.ones(x.shape[0]), **kwargs)
    return sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))


def dit_count(d, depth, p, c, classes, learn_sigma, mlp_ratio=4.0, freqs=256):
    """DiT's trainable parameters, written out from its architecture (Peebles & Xie 2023)."""
    hidden = int(d * mlp_ratio)
    c_out = 2 * c if learn_sigma else c
    block = ((d * 3 * d + 3 * d) + (d * d + d)                 # attention: qkv, proj
             + (d * hidden + hidden) + (hidden * d + d)        # MLP
             + (d * 6 * d + 6 * d))                            # adaLN: 6 modulations
    return ((p * p * c * d + d)                                # patch embedding
            + (freqs * d + d) + (d * d + d)                    # timestep MLP
            + ((classes + 1) * d if classes else 0)            # label table + null row
            + depth * block
            + (d * 2 * d + 2 * d) + (d * p * p * c_out + p * p * c_out))   # final layer


# The paper's Table 4 (params, in millions, of the class-conditional ImageNet 256 models: 32x32x4
# latents, 1000 classes, learned sigma); the patch size changes only the embedding and output.
DIT_PAPER_MILLIONS = {"S": 33, "B": 130, "L": 458, "XL": 675}


# The largest and the smallest by default; every preset with -m slow.
DEFAULT_PRESETS = ("DiT-XL/2", "DiT-S/8", "U-ViT-S/2", "U-ViT-H/2")


def _presets(names):
    return [n if n in DEFAULT_PRESETS else pytest.param(n, marks=pytest.mark.slow)
            for n in sorted(names)]


@pytest.mark.parametrize("name", _presets(dit.PRESETS))
def test_dit_presets_have_the_papers_parameter_counts(name):
    cfg = dit.PRESETS[name]
    net = dit.DiT(**cfg, num_classes=1000, learn_sigma=True)
    x = jnp.zeros((1, 32, 32, 4))
    count = _param_count(net, x, y=jnp.zeros(1, jnp.int32))
    d, p = cfg["hidden_size"], cfg["patch_size"]
    assert count == dit_count(d, cfg["depth"], p, 4, 1000, True)
    size = name.split("-")[1].split("/")[0]
    # The table gives one count per size (the /2 model's); /4 and /8 differ by < 0.2%.
    assert abs(count / 1e6 / DIT_PAPER_MILLIONS[size] - 1) < 0.01, count
    if name == "DiT-XL/2":   # DiT's train.py also counts the frozen position table (256 x D)
        assert count + (32 // p) ** 2 * d == 675_129_632


def uvit_count(d, depth, p, c, classes, tokens, conv=True, mlp_ratio=4.0):
    """U-ViT's parameters, written out from its architecture (Bao et al. 2023)."""
    hidden = int(d * mlp_ratio)
    block = (d * 3 * d + (d * d + d)                            # attention (no qkv bias)
             + (d * hidden + hidden) + (hidden * d + d) + 4 * d)  # MLP, 2 LayerNorms
    skips = (depth // 2) * (2 * d * d + d)
    extras = 1 + (1 if classes else 0)
    return ((p * p * c * d + d) + ((classes + 1) * d if classes else 0)
            + (extras + tokens) * d + depth * block + skips + 2 * d
            + (d * p * p * c + p * p * c) + ((9 * c * c + c) if conv else 0))


# (image side, channels, classes) of each preset's use; the paper's Table 1 / their configs.
UVIT_USES = {"U-ViT-S/2": (32, 3, None, 44), "U-ViT-S/4": (64, 3, None, 44),
             "U-ViT-S-Deep/2": (32, 3, None, 58), "U-ViT-M/4": (64, 3, 1000, 131),
             "U-ViT-L/4": (64, 3, 1000, 287), "U-ViT-H/2": (32, 4, 1000, 501)}


@pytest.mark.parametrize("name", _presets(uvit.PRESETS))
def test_uvit_presets_have_the_papers_parameter_counts(name):
    cfg = uvit.PRESETS[name]
    side, c, classes, millions = UVIT_USES[name]
    net = uvit.UViT(**cfg, num_classes=classes)
    count = _param_count(net, jnp.zeros((1, side, side, c)),
                         y=None if classes is None else jnp.zeros(1, jnp.int32))
    p = cfg["patch_size"]
    assert count == uvit_count(cfg["hidden_size"], cfg["depth"], p, c, classes,
                               (side // p) ** 2, conv=cfg.get("conv", True))
    assert round(count / 1e6) == millions, count


@pytest.mark.parametrize("learn_sigma, classes", [
    (False, None), pytest.param(False, 0, marks=pytest.mark.slow), (True, 10)])
def test_dit_output_is_exactly_zero_at_initialisation(learn_sigma, classes):
    net = dit.DiT(patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=classes,
                  learn_sigma=learn_sigma)
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 3))
    t = jnp.array([1.0, 500.0, 999.0])
    y = None if not classes else jnp.array([0, 3, 10])    # 0 classes: unconditional
    variables = jax.jit(net.init)(jax.random.key(1), x, t, y=y)
    out = jax.jit(net.apply)(variables, x, t, y=y)
    assert out.shape == (3, 8, 8, 6 if learn_sigma else 3)
    np.testing.assert_array_equal(out, 0.0)
    # adaLN-Zero: only the modulation regressions and the output layer start at zero.
    params = variables["params"]
    assert not np.any(params["blocks_0"]["adaLN_modulation"]["kernel"])
    assert np.any(params["blocks_0"]["attn"]["qkv"]["kernel"])
    assert not np.any(params["final_linear"]["kernel"])
    # ... and the gradient reaches the output layer, so training starts.
    grads = jax.jit(jax.grad(lambda p: jnp.sum(net.apply({"params": p}, x, t, y=y))))(params)
    assert np.any(grads["final_linear"]["kernel"])


@pytest.mark.parametrize("p", [1, 2, 4])
def test_patchify_and_unpatchify_are_inverse_and_cut_row_major_patches(p):
    x = jax.random.normal(jax.random.key(0), (2, 8, 12, 3))
    tokens = transformer.patchify(x, p)
    assert tokens.shape == (2, (8 // p) * (12 // p), p * p * 3)
    np.testing.assert_array_equal(transformer.unpatchify(tokens, p, 8, 12), x)
    i, j = 1, 2            # patch (i, j) is token i W / p + j, flattened in (p, p, C) order
    np.testing.assert_array_equal(tokens[:, i * (12 // p) + j],
                                  x[:, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(2, -1))


def test_position_embedding_is_the_2d_sincos_formula():
    d, gh, gw = 16, 3, 5
    pos = transformer.sincos_2d(d, gh, gw)
    assert pos.shape == (gh * gw, d)
    for i in range(gh):
        for j in range(gw):
            for k in range(d // 4):
                w = 10_000.0 ** (-k / (d // 4))      # 10000^(-2k / (D/2))
                row = pos[i * gw + j]
                np.testing.assert_allclose(
                    [row[k], row[d // 4 + k], row[d // 2 + k], row[3 * d // 4 + k]],
                    [math.sin(j * w), math.cos(j * w), math.sin(i * w), math.cos(i * w)],
                    atol=1e-12)
    # The DiT adds it to the patch embedding (bias 0 at init): an all-zero image enters the
    # first block as the position table itself, and leaves it unchanged (adaLN-Zero's gates).
    net = dit.DiT(patch_size=2, hidden_size=16, depth=1, num_heads=2)
    x = jnp.zeros((1, 2 * gh, 2 * gw, 1))

    def first_block_output(key):
        variables = net.init(key, x, jnp.ones(1))
        _, seen = net.apply(variables, x, jnp.ones(1), capture_intermediates=lambda m, _: (
            isinstance(m, dit.DiTBlock)))
        return seen["intermediates"]["blocks_0"]["__call__"][0]

    np.testing.assert_allclose(jax.jit(first_block_output)(jax.random.key(0))[0], pos,
                               atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        transformer.sincos_2d(18, 2, 2)


def test_timestep_embedding_is_dits_cos_sin_formula():
    t = jnp.array([0.0, 3.0, 250.5])
    emb = transformer.timestep_embedding(t, 6)
    w = [10_000.0 ** (-k / 3) for k in range(3)]
    expected = [[math.cos(s * wk) for wk in w] + [math.sin(s * wk) for wk in w] for s in t]
    np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-5)
    assert transformer.timestep_embedding(t, 7).shape == (3, 7)
    np.testing.assert_array_equal(transformer.timestep_embedding(t, 7)[:, -1], 0.0)


@pytest.mark.parametrize("cls", [dit.DiT, pytest.param(uvit.UViT, marks=pytest.mark.slow)])
def test_label_dropout_uses_the_null_row(cls):
    """Labels dropped by the training loss (`losses.with_label_dropout`) become the null label
    num_classes, the last row of the label table, which is also what y=None means."""
    net = cls(patch_size=2, hidden_size=16, depth=1, num_heads=2, num_classes=4)
    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 1))
    t = jnp.array([10.0, 400.0, 900.0])
    y = jnp.array([0, 2, 3])
    params = random_params(net, x, t, y=y, scale=0.2)
    table = [v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
             if "Embed" in jax.tree_util.keystr(k) or "y_embedder" in jax.tree_util.keystr(k)]
    assert len(table) == 1 and table[0].shape == (5, 16)      # 4 classes + the null row
    apply = jax.jit(lambda p, y: net.apply({"params": p}, x, t, y=y))
    null = apply(params, jnp.full(3, 4))
    np.testing.assert_allclose(apply(params, None), null, rtol=1e-6)
    assert not np.allclose(apply(params, y), null, atol=1e-3)

    sde = sde_lib.VPSDE()
    score_model = parameterization.make_score_model(net, sde)
    loss_fn = losses.get_loss_fn(sde, score_model, reduce_mean=True)
    batch = {"x": x, "label": y}
    key = jax.random.key(3)
    dropped = jax.jit(losses.with_label_dropout(loss_fn, 1.0, null_label=4))(params, batch, key)
    # The same per-example keys (from `key`), all labels null and none dropped:
    kept = jax.jit(losses.with_label_dropout(loss_fn, 1e-9, null_label=4))(
        params, dict(batch, label=jnp.full(3, 4)), key)
    np.testing.assert_allclose(dropped, kept, rtol=1e-6)


def _digits(n=16):
    return jnp.asarray(load_digits().images[:n, :, :, None] / 8.0 - 1.0, jnp.float32)


def _fit_one_batch(net, x, steps, lr=3e-3):
    """Adam on the DSM loss (epsilon prediction, VP SDE) of one fixed batch; the loss over 8
    fixed noise draws before and after, and the trained score model and parameters."""
    sde = sde_lib.VPSDE()
    score_model = parameterization.make_score_model(net, sde)
    loss_fn = losses.get_loss_fn(sde, score_model, reduce_mean=True)
    params = net.init(jax.random.key(0), x, jnp.ones(x.shape[0]))["params"]
    tx = optax.adam(lr)
    eval_keys = jax.random.split(jax.random.key(1), 8)
    evaluate = jax.jit(lambda p: jnp.mean(jax.vmap(
        lambda k: jnp.mean(loss_fn(p, {"x": x}, k)))(eval_keys)))

    def step(carry, key):
        p, o = carry
        g = jax.grad(lambda p: jnp.mean(loss_fn(p, {"x": x}, key)))(p)
        u, o = tx.update(g, o, p)
        return (optax.apply_updates(p, u), o), None

    before = evaluate(params)
    keys = jax.random.split(jax.random.key(2), steps)
    (params, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, keys))((params, tx.init(params)))
    return float(before), float(evaluate(params)), sde, score_model, params


SAMPLERS = [("pc", dict(n_steps=10)), ("ode", dict(rtol=1e-3, atol=1e-3)),
            ("ddim", dict(steps=5)), ("dpm_solver", dict(steps=5)), ("edm", dict(steps=5)),
            ("ddpm", dict(steps=5)), ("consistency", dict(times=(1.0, 0.5)))]


# With -m slow (20-40 s each on 2 cores: 300 steps and 8 compiled samplers); the default suite
# trains, samples and evaluates the digits DiT end to end (test_experiments.py, digits:dit).
@pytest.mark.slow
@pytest.mark.parametrize("cls, depth", [(dit.DiT, 2), (uvit.UViT, 3)])
def test_tiny_transformer_fits_a_batch_and_samples_with_every_sampler(cls, depth):
    x = _digits()
    net = cls(patch_size=2, hidden_size=32, depth=depth, num_heads=2)
    before, after, sde, score_model, params = _fit_one_batch(net, x, steps=300)
    # An untrained epsilon model's loss is about E[z^2] = 1; 300 steps on 16 digits bring it
    # below 0.2 (measured 0.13 for the DiT and 0.15 for the U-ViT at 400 steps).
    assert before > 0.9 and after < 0.2, (before, after)
    score_fn = parameterization.score_fn_from_model(score_model, params)
    shape = (4, 8, 8, 1)
    # DDPM's sampler walks the discrete chain down to its level 0 at t = 0: a discrete-time
    # view of the same network (VP: conditioned on the level i, where this one saw 999 t).
    discrete = parameterization.score_fn_from_model(
        dataclasses.replace(score_model, continuous=False), params)
    for name, kwargs in SAMPLERS:
        fn = discrete if name == "ddpm" else score_fn
        out, nfe = jax.jit(lambda k, kw=kwargs, n=name, f=fn: sampling.get_sampler(n)(
            k, sde, f, shape, **kw))(jax.random.key(5))
        assert out.shape == shape and np.all(np.isfinite(out)) and int(nfe) > 0, name
    logp, nfe = likelihood.log_likelihood(jax.random.key(6), sde, score_fn, x[:4], rtol=1e-3,
                                          atol=1e-3)
    bpd = likelihood.bits_per_dim(logp, x.shape[1:])
    assert np.all(np.isfinite(bpd)) and np.all(bpd > 0), bpd


def test_bad_shapes_get_one_clear_error():
    with pytest.raises(ValueError, match="divisible by 3"):
        dit.DiT(patch_size=3, hidden_size=16, depth=1, num_heads=2).init(
            jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.ones(1))
    with pytest.raises(ValueError, match="depth counts .* so it is odd"):
        uvit.UViT(patch_size=2, hidden_size=16, depth=4, num_heads=2).init(
            jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.ones(1))
    with pytest.raises(ValueError, match="expects images shaped"):
        dit.DiT(patch_size=2, hidden_size=16, depth=1, num_heads=2).init(
            jax.random.key(0), jnp.zeros((2, 64)), jnp.ones(2))


# With -m slow (each compiles its loss: ~5 s); the default suite runs the DiT end to end on the
# VP SDE (test_experiments.py, digits:dit).
@pytest.mark.slow
@pytest.mark.parametrize("process", ["hybrid", "flow", "v", "edm", "ct"])
def test_dit_trains_under_every_process_and_parameterisation(process):
    """The DiT is a network like the U-Net: each digits variant (rectified flow with v, VP with
    v, EDM, the discrete chain with a learned variance, consistency training) builds with it and
    its loss has finite values and gradients."""
    from diffusion import experiment
    from experiments import digits

    config = digits.get_config(f"dit,{process},smoke")
    exp = experiment.build(config)
    x = _digits(4)
    params = exp.net.init(jax.random.key(0), x, jnp.ones(4))["params"]
    options = {"step": 0} if getattr(exp.loss_fn, "needs_step", False) else {}

    def loss(p):
        return jnp.mean(exp.loss_fn(p, {"x": x}, jax.random.key(1), **options))

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(value) and value > 0
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert any(np.any(g) for g in jax.tree.leaves(grads))
