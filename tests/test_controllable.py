"""Controllable generation end to end: label dropout, the noise-conditional classifier and its
loss, the guidance and task settings, and `scripts/run.py --mode sample` with labels, guidance
and tasks. (The guided scores and conditional samplers against closed forms:
tests/test_guidance.py.)"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import (
    config_checks,
    guide_settings,
    losses,
    task_inputs,
    train,
)
from diffusion import sde as sde_lib
from diffusion.gaussian_mixture import GaussianMixture
from experiments import digits, digits_classifier, digits_cond

# --------------------------------------------------------------------------- label dropout


def _label_spy_loss(params, batch, key):
    """A 'loss' that returns the labels it was given, and checks it gets per-example keys."""
    del params
    assert key.shape == (batch["x"].shape[0],)
    return batch["label"].astype(jnp.float32)


def test_label_dropout_replaces_labels_by_the_null_label_at_rate_p():
    labels = jnp.arange(4000) % 10
    batch = {"x": jnp.zeros((4000, 2)), "label": labels}
    key = jax.random.key(0)
    assert losses.with_label_dropout(_label_spy_loss, 0.0, 10) is _label_spy_loss
    seen = np.asarray(losses.with_label_dropout(_label_spy_loss, 0.2, 10)(None, batch, key))
    dropped = seen == 10
    assert abs(dropped.mean() - 0.2) < 4 * np.sqrt(0.2 * 0.8 / 4000)
    np.testing.assert_array_equal(seen[~dropped], np.asarray(labels)[~dropped])
    again = np.asarray(losses.with_label_dropout(_label_spy_loss, 0.2, 10)(None, batch, key))
    np.testing.assert_array_equal(seen, again)        # decided by the example's key
    everything = losses.with_label_dropout(_label_spy_loss, 0.999999, 10)(None, batch, key)
    assert np.all(np.asarray(everything) == 10)


def test_label_dropout_needs_classes_and_a_rate_below_one():
    config = digits.get_config("smoke")
    config.model.label_dropout = 0.1
    with pytest.raises(ValueError, match=r"model\.label_dropout > 0 drops labels of a "
                                         r"class-conditional model: set model\.num_classes"):
        config_checks.check_config(config)
    config.model.num_classes, config.model.label_dropout = 10, 1.0
    with pytest.raises(ValueError, match=r"model\.label_dropout must be in \[0, 1\), got 1\.0"):
        config_checks.check_config(config)


# --------------------------------------------------------------------------- classifier loss


class _BayesClassifier(nn.Module):
    """The exact log p_t(y | x) of a mixture whose components are the classes, for 1x1x2
    'images'; t comes in as the network's 999 t."""

    means: tuple
    std: float
    sde: sde_lib.SDE
    sureness: float = 1.0    # logits scaled by this (1: the Bayes classifier)

    @nn.compact
    def __call__(self, x, c_noise, y=None, train=False):
        t = c_noise / 999.0
        x = x.reshape(x.shape[0], -1)
        logps = []
        for mean in self.means:
            one = GaussianMixture.isotropic(jnp.ones(1), jnp.asarray([mean]), self.std)
            logps.append(one.log_prob(x, t, self.sde))
        return self.sureness * jax.nn.log_softmax(jnp.stack(logps, -1), -1)


def test_classifier_loss_at_the_bayes_classifier_is_the_conditional_entropy():
    """E[-log p_t(y | x_t)] over t ~ U(eps, 1) and the perturbed data, from the loss, equals a
    Monte Carlo estimate of the same conditional entropy computed independently; a classifier
    that is less sure of itself (logits scaled by 0.5) scores worse."""
    sde = sde_lib.VPSDE()
    means, std = ((-1.0, 0.0), (1.0, 0.5)), 0.4
    n = 20_000
    labels = jnp.arange(n) % 2
    x0 = jnp.asarray(means)[labels] + std * jax.random.normal(jax.random.key(1), (n, 2))
    batch = {"x": x0.reshape(n, 1, 1, 2), "label": labels}
    net = _BayesClassifier(means, std, sde)
    loss = float(jnp.mean(jax.jit(losses.make_classifier_loss(sde, net))({}, batch,
                                                                       jax.random.key(2))))

    t = jax.random.uniform(jax.random.key(3), (n,), minval=1e-5, maxval=1.0)
    alpha, sigma = sde.marginal_coeffs(t)
    xt = alpha[:, None] * x0 + sigma[:, None] * jax.random.normal(jax.random.key(4), x0.shape)
    logp = jax.jit(net.apply)({}, xt, 999.0 * t)
    reference = -jnp.take_along_axis(logp, labels[:, None], -1)[:, 0]
    err = 4 * float(jnp.std(reference)) / np.sqrt(n)
    assert abs(loss - float(jnp.mean(reference))) < 2 * err

    unsure = _BayesClassifier(means, std, sde, sureness=0.5)
    worse = float(jnp.mean(jax.jit(losses.make_classifier_loss(sde, unsure))(
        {}, batch, jax.random.key(2))))
    assert worse > loss + 0.01


def test_a_clean_classifier_trains_at_t_zero():
    """noise_conditional=False: the loss sees the data itself (the logits of x_0)."""
    seen = []

    class Spy(nn.Module):
        noise_conditional: bool = False

        @nn.compact
        def __call__(self, x, c_noise, y=None, train=False):
            seen.append((x, c_noise))
            return jnp.zeros((x.shape[0], 3))

    x0 = jax.random.normal(jax.random.key(0), (5, 2, 2, 1))
    loss = losses.make_classifier_loss(sde_lib.VPSDE(), Spy())(
        {}, {"x": x0, "label": jnp.zeros(5, jnp.int32)}, jax.random.key(1))
    np.testing.assert_allclose(loss, np.log(3.0), rtol=1e-6)
    np.testing.assert_array_equal(seen[0][0], x0)
    np.testing.assert_array_equal(seen[0][1], 0.0)


# --------------------------------------------------------------------------- settings


def test_guidance_settings_are_checked_before_anything_runs():
    config = digits.get_config("smoke")
    config.sampling.guidance = "cfg"
    config.sampling.task = "colorize"
    config.sampling.labels = "3,x"
    with pytest.raises(ValueError) as info:
        config_checks.check_config(config)
    message = str(info.value)
    assert "sampling.guidance='cfg' needs a class-conditional model" in message
    assert "sampling.task='colorize' needs colour images (data.num_channels=3)" in message
    assert "sampling.labels='3,x' needs a class-conditional model" in message
    config = digits_cond.get_config("smoke")
    config.sampling.labels, config.sampling.sr_factor = "3,12", 3
    config.sampling.task = "super_resolve"
    with pytest.raises(ValueError) as info:
        config_checks.check_config(config)
    assert "sampling.labels has [12], outside the classes 0..9" in str(info.value)
    assert "sampling.sr_factor=3 must be >= 2 and divide data.image_size=8" in str(info.value)
    config = digits.get_config("smoke")
    config.sampling.guidance = "classifier"
    with pytest.raises(ValueError, match="needs sampling.classifier_workdir"):
        config_checks.check_config(config)
    # An unconditional model guided by a classifier: labels "all" are the data's classes (the
    # check once listed range(10**9) for a model without num_classes, and ran out of memory).
    config.sampling.update(classifier_workdir="runs/clf", labels="all")
    assert config_checks.check_config(config) == []


def test_labels_tags_and_masks():
    assert guide_settings.parse_labels("3,3,7", 10) == [3, 3, 7]
    assert guide_settings.parse_labels("all", 4) == [0, 1, 2, 3]
    assert guide_settings.parse_labels("", 10) is None
    g = guide_settings.GuideSettings(guidance="cfg", weight=3.0)
    assert g.tag == "cfg_w3_"
    sr = guide_settings.GuideSettings(task="super_resolve", sr_factor=4)
    assert sr.tag == "super_resolve_x4_"
    assert guide_settings.GuideSettings().tag == ""
    key = jax.random.key(0)
    right = task_inputs.inpaint_mask("right_half", 4, 6, key)[..., 0]
    np.testing.assert_array_equal(right, np.repeat([[1, 1, 1, 0, 0, 0]], 4, 0))
    center = task_inputs.inpaint_mask("center", 8, 8, key)[..., 0]
    assert center[2:6, 2:6].sum() == 0 and center.sum() == 64 - 16
    assert task_inputs.inpaint_mask("bottom_half", 4, 4, key)[2:].sum() == 0


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_cfg_and_tasks_from_the_command_line_path(smoke_run, tmp_path):
    """A class-conditional smoke model: CFG samples with the labels asked for, and each task
    keeps its measurement exactly (inpainting the known pixels, super-resolution the block
    means), written with the conditioning beside the results."""
    import shutil

    config, workdir = smoke_run("digits_cond")
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    config.sampling.update(guidance="cfg", guidance_weight=2.0, labels="3,7", method="ddim",
                           steps=4)
    path = train.sample(config, copy)
    assert os.path.basename(path).startswith("cfg_w2_step_")
    with np.load(path) as f:
        assert f["samples"].shape == (8, 8, 8, 1) and np.all(np.isfinite(f["samples"]))
        np.testing.assert_array_equal(f["labels"], [3, 7] * 4)
    assert os.path.exists(path[:-4] + ".png")

    config.sampling.update(guidance="none", labels="", task="inpaint", mask="right_half")
    path = train.sample(config, copy)
    with np.load(path) as f:
        known = f["originals"][:, :, :4]
        np.testing.assert_allclose(f["samples"][:, :, :4], known, atol=1e-6)
        np.testing.assert_array_equal(f["cond"], f["originals"])

    config.sampling.update(task="super_resolve", sr_factor=2, method="pc",
                           predictor="euler_maruyama")
    path = train.sample(config, copy)
    with np.load(path) as f:
        blocks = f["samples"].reshape(8, 4, 2, 4, 2, 1).mean(axis=(2, 4))
        np.testing.assert_allclose(blocks, f["cond"], atol=1e-5)
        assert f["cond"].shape == (8, 4, 4, 1)
    assert sorted(p for p in os.listdir(os.path.join(copy, "samples")) if p.endswith(".png")
                  )[:3] == ["cfg_w2_step_4.png", "inpaint_step_4.png",
                            "super_resolve_x2_step_4.png"]


@pytest.mark.slow
def test_classifier_trains_evaluates_and_guides(smoke_run, tmp_path):
    """The classifier experiment trains through the same loop, evaluates to accuracies, refuses
    to sample, and guides the conditional model's null-label score from its workdir."""
    config, workdir = smoke_run("digits_classifier")
    record = train.evaluate(config, workdir)
    assert {"accuracy_t0", "accuracy_t0.1", "accuracy_t0.25", "accuracy_t0.5"} <= set(record)
    assert all(0.0 <= record[k] <= 1.0 for k in record if k.startswith("accuracy"))
    with pytest.raises(ValueError, match="classifier experiment: it has nothing to sample"):
        train.sample(config, workdir)

    cond_config, cond_workdir = smoke_run("digits_cond")
    cond_config.sampling.update(guidance="classifier", guidance_weight=1.0,
                                classifier_workdir=workdir, labels="all", method="ddim", steps=4)
    path = train.sample(cond_config, cond_workdir)
    with np.load(path) as f:
        assert f["samples"].shape == (8, 8, 8, 1) and np.all(np.isfinite(f["samples"]))
        np.testing.assert_array_equal(f["labels"], np.arange(8))
    os.remove(path)
    clean = digits_classifier.get_config("clean_smoke")
    assert clean.model.noise_conditional is False


def test_task_inputs_from_the_eval_split_an_npz_or_a_png(tmp_path):
    """Conditioning read from each source, in data space ([-1, 1] for the digits), cycled over
    the samples; a file of the wrong size is one clear error."""
    from PIL import Image

    config = digits.get_config("smoke")
    config.sampling.update(task="super_resolve", sr_factor=2)
    exp = train.build(config)
    cond, originals = task_inputs.task_inputs(exp, 5)
    np.testing.assert_allclose(cond["cond"], originals.reshape(5, 4, 2, 4, 2, 1).mean((2, 4)),
                               atol=1e-6)

    low = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 1), dtype=np.uint8)
    np.savez(tmp_path / "low.npz", images=low)
    config.sampling.task_input = str(tmp_path / "low.npz")
    cond, originals = task_inputs.task_inputs(train.build(config), 5)
    assert originals is None
    np.testing.assert_allclose(cond["cond"], (low[[0, 1, 2, 0, 1]] / 255.0) * 2 - 1, atol=1e-6)

    Image.fromarray(low[1, ..., 0]).save(tmp_path / "one.png")
    config.sampling.task_input = str(tmp_path / "one.png")
    cond, _ = task_inputs.task_inputs(train.build(config), 2)
    np.testing.assert_allclose(cond["cond"], np.stack([low[1], low[1]]) / 255.0 * 2 - 1,
                               atol=1e-6)

    config.sampling.update(task="inpaint", mask="center")
    with pytest.raises(ValueError, match=r"holds images of shape \(4, 4, 1\); "
                                         r"sampling.task='inpaint' needs 8x8 with 1 channel"):
        task_inputs.task_inputs(train.build(config), 2)
    config.sampling.task_input = str(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        task_inputs.task_inputs(train.build(config), 2)


@pytest.mark.slow
def test_colorize_a_tfds_colour_model_from_the_eval_split(smoke_run, tmp_path):
    """Colorization end to end on the CIFAR-10 smoke model (mock tfds data): the samples'
    channel means are the grey images of the eval split, exactly."""
    import shutil

    from tests.helpers import data_context

    config, workdir = smoke_run("vp_cifar")
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    config.sampling.update(task="colorize", method="ddim", steps=3)
    with data_context(config):
        path = train.sample(config, copy)
    with np.load(path) as f:
        assert f["samples"].shape[-1] == 3 and f["cond"].shape[-1] == 1
        # exact up to float32 rounding of the (untrained model's, large) samples
        tol = 1e-6 * (1.0 + np.abs(f["samples"]).max())
        np.testing.assert_allclose(f["samples"].mean(-1, keepdims=True), f["cond"], atol=tol)
        np.testing.assert_allclose(f["cond"], f["originals"].mean(-1, keepdims=True), atol=1e-6)
    assert os.path.basename(path).startswith("colorize_step_")
