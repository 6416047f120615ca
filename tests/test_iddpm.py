"""Improved DDPM from the config: learned variances, the hybrid / vlb losses and their importance
sampling in the train step, the bound as an evaluation, the DDPM sampler. The formulas are
tested against closed forms in test_chain.py; here, that the pieces are wired into training,
checkpoints, sampling and `--mode eval` as the config says."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from diffusion import chain, config_checks, experiment, importance, losses, models, train
from diffusion import sde as sde_lib
from diffusion.models import parameterization
from diffusion.parallel import data_mesh, put_batch
from diffusion.train_state import restore_latest
from experiments import digits, iddpm_cifar, toy_2d


def _vlb_setup(batch=16, levels=8):
    """A learned-variance MLP on 2-D points with the importance-sampled vlb loss."""
    net = models.MLP(hidden=32, n_layers=2, learn_sigma=True)
    sde = sde_lib.VPSDE(beta_max=5.0, N=levels)
    score_model = parameterization.make_score_model(net, sde, continuous=False,
                                                    learn_variance=True)
    loss_fn = losses.make_vlb_loss(sde, score_model, loss="vlb")
    tx = optax.adam(1e-3)
    x = jax.random.normal(jax.random.key(0), (1, batch, 2))
    state = train.create_train_state(jax.random.key(1), net, tx, x[0],
                                     loss_state=importance.init_history(levels))
    return loss_fn, tx, state, {"x": x}


def test_the_importance_sampled_step_keeps_the_same_history_on_1_and_4_devices():
    """The vlb loss's level history is updated with the whole global batch, in the order of the
    examples' global indices: one device and four give the same history (and parameters); its
    entries are the examples' unweighted N L_i at the levels their keys draw."""
    assert jax.device_count() == 4, "conftest sets 4 fake CPU devices"
    loss_fn, tx, state, batch = _vlb_setup()
    assert loss_fn.importance_sampled and loss_fn.num_levels == 8
    single = train.make_train_step(loss_fn, tx, 0.9, Mesh(np.asarray(jax.devices()[:1]), ("data",)))
    mapped = train.make_train_step(loss_fn, tx, 0.9, data_mesh())
    copy = lambda s: jax.tree.map(jnp.array, s)
    key = jax.random.key(3)
    s1, m1 = single(copy(state), batch, key)
    s4, m4 = mapped(copy(state), put_batch({"x": np.asarray(batch["x"])}, data_mesh()), key)
    counts = np.asarray(s1.loss_state["counts"])
    assert counts.sum() == 16
    np.testing.assert_array_equal(counts, np.asarray(s4.loss_state["counts"]))
    np.testing.assert_allclose(s1.loss_state["losses"], s4.loss_state["losses"], rtol=1e-5)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
    # The history holds each example's N L_i, recomputed here with uniform levels (the history
    # is still empty, so the step drew uniformly and weighted by 1).
    step_key = jax.random.fold_in(key, 0)
    keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(16))
    per_example = loss_fn(state.params, {"x": batch["x"][0]}, keys)
    levels = np.asarray(losses.draw_levels(keys, 16, 8))
    expected = np.zeros((8, 10), np.float32)
    seen = np.zeros(8, int)
    for i, value in zip(levels, np.asarray(per_example), strict=True):
        expected[i, seen[i]] = value
        seen[i] += 1
    np.testing.assert_array_equal(counts, seen)
    np.testing.assert_allclose(s1.loss_state["losses"], expected, rtol=1e-5, atol=1e-6)


def _discrete_toy(**changes):
    """toy_2d:smoke on the VP SDE's 25-level DDPM chain, sampled by the DDPM sampler."""
    config = toy_2d.get_config("smoke")
    config.training.continuous = False
    config.sde.N = 25
    config.sampling.method = "ddpm"
    config.eval.enable_bpd = False
    for key, value in changes.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def test_a_vlb_run_saves_its_level_history_with_the_checkpoint(tmp_path):
    """A learned-variance model of 2-D points trained by the importance-sampled vlb loss: the
    restored train state holds the history of every example trained on (n_iters x batch_size
    levels), so a resumed run keeps importance sampling where it was."""
    # 4 steps of 8 examples over 25 levels: no level reaches its history's 10 slots.
    config = _discrete_toy(**{"model.learn_variance": True, "training.loss": "vlb",
                              "training.batch_size": 8})
    workdir = str(tmp_path)
    train.train_and_evaluate(config, workdir)
    exp = experiment.build(config)
    state = restore_latest(exp, workdir, data_mesh())
    counts = np.asarray(state.loss_state["counts"])
    assert counts.shape == (config.sde.N,)
    assert counts.sum() == config.training.n_iters * config.training.batch_size
    history = np.asarray(state.loss_state["losses"])
    seen = np.arange(10)[None, :] < counts[:, None]
    # N L_i: KLs >= 0 at levels >= 1 (level 0 is the decoder's density of a point, of any
    # sign); unseen slots stay 0.
    assert np.all(np.isfinite(history[seen])) and np.all(history[1:][seen[1:]] >= 0)
    assert np.any(history[seen] != 0) and np.all(history[~seen] == 0)


@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory):
    """A learned-variance model of 2-D points trained by the hybrid loss (4 steps); the digits'
    U-Net version (digits:hybrid,smoke) runs with the slow set's smoke experiments."""
    config = _discrete_toy(**{"model.learn_variance": True, "training.loss": "hybrid"})
    workdir = str(tmp_path_factory.mktemp("hybrid"))
    train.train_and_evaluate(config, workdir)
    return config, workdir


@pytest.mark.parametrize("steps, spacing", [(5, "evenly"), (5, "quad")])
def test_the_ddpm_sampler_respaced_from_the_config(steps, spacing, hybrid_run):
    """A learned-variance model sampled by the DDPM sampler on 5 of its 25 levels (its learned
    variance rescaled to the respaced chain): NFE 5, finite samples of the data's shape."""
    config, workdir = hybrid_run
    config = config.copy_and_resolve_references()
    config.sampling.steps, config.sampling.spacing = steps, spacing
    path = train.sample(config, workdir)
    with np.load(path) as f:
        samples, nfe = f["samples"], int(f["nfe"])
    assert nfe == steps
    assert samples.shape == (config.sampling.num_samples, 2)
    assert np.all(np.isfinite(samples))


def test_a_fixed_variance_model_reports_the_bound_with_beta_and_beta_tilde(tmp_path):
    """A discrete-time (DDPM L_simple) model of 2-D points: `--mode eval` reports the bound in
    nats per point with Sigma = beta and beta~ from one pass, vlb_nll being sampling.variance's,
    each the prior + KL + decoder terms; beta~ (the smaller variance) is the worse bound for an
    untrained model, whose means are far off."""
    config = _discrete_toy()
    train.train_and_evaluate(config, str(tmp_path))
    record = train.evaluate(config, str(tmp_path))
    for key in ("vlb_nll", "vlb_nll_beta", "vlb_nll_beta_tilde", "vlb_prior_nll",
                "vlb_decoder_nll"):
        assert np.isfinite(record[key]), key
    assert record["vlb_nll"] == record["vlb_nll_beta"]
    assert record["vlb_nll_beta_tilde"] > record["vlb_nll_beta"]
    assert 0 < record["vlb_prior_nll"] < record["vlb_nll"]
    assert record["vlb_examples"] == min(config.eval.batch_size * config.eval.bpd_num_batches,
                                         record["eval_split_examples"])
    assert "bpd" not in record and "nll" not in record


# (config changes, what the one message must say)
BAD = [
    ({"training.loss": "hybrid", "training.continuous": False},
     r"training\.loss='hybrid' trains a learned variance: set model\.learn_variance=True"),
    ({"model.learn_variance": True},
     r"model\.learn_variance=True .* needs training\.continuous=False"),
    ({"model.learn_variance": True, "training.continuous": False},
     r"model\.learn_variance=True is trained by training\.loss 'hybrid' or 'vlb' "
     r"\(training\.loss='dsm' would leave the variance untrained\)"),
    ({"model.learn_variance": True, "training.continuous": False, "sde.name": "subvpsde"},
     r"sde\.name 'vpsde', 'cosine_vpsde' or 'vesde'"),
    ({"sampling.method": "ddpm", "sde.name": "subvpsde"},
     r"sampling\.method='ddpm' steps along a DDPM / SMLD chain; SDE 'subvpsde' has none"),
    ({"sampling.method": "ddpm", "sampling.spacing": "cubic"},
     r"sampling\.spacing='cubic' is not one of \['evenly', 'quad'\]"),
    ({"sampling.method": "ddpm", "sampling.steps": 2000},
     r"sampling\.steps=2000 of the DDPM sampler must be 0 .* or 2 \.\. sde\.N"),
    ({"training.vlb_weight": 0.01},
     r"training\.vlb_weight=0\.01 is set but not used by the DSM loss"),
]


@pytest.mark.parametrize("changes, message", BAD)
def test_a_config_that_cannot_run_on_the_chain_is_one_clear_error(changes, message):
    config = digits.get_config()
    with config.unlocked():
        for key, value in changes.items():
            section, field = key.split(".")
            config[section][field] = value
    with pytest.raises(ValueError, match=message):
        config_checks.check_config(config)


def test_a_network_without_a_variance_output_is_refused():
    with pytest.raises(ValueError, match="model.learn_variance=True \\(not the network field"):
        models.build_network("unet", {"learn_sigma": True})


def test_the_paper_config_is_improved_diffusions_cifar10_setting():
    """experiments/iddpm_cifar.py: the README flags of improved-diffusion's CIFAR-10 hybrid
    model (4,000 cosine steps, learned sigmas, dropout 0.3, 3 res blocks, 128 channels, lr 1e-4,
    batch 128, EMA 0.9999) and, with :vlb, L_vlb with importance-sampled levels."""
    config = iddpm_cifar.get_config()
    config_checks.check_config(config)
    exp = experiment.build(config, shape_only_data=True)
    assert isinstance(exp.sde, sde_lib.CosineVPSDE) and exp.sde.N == 4000 and exp.sde.s == 0.008
    assert exp.score_model.learn_variance and not exp.score_model.continuous
    net = exp.net
    assert (net.ch, net.num_res_blocks, net.dropout, net.ch_mult, net.attn_resolutions) == (
        128, 3, 0.3, (1, 2, 2, 2), (16, 8))
    assert config.optim.lr == 1e-4 and config.training.batch_size == 128
    assert config.model.ema_rate == 0.9999 and config.training.loss == "hybrid"
    assert not exp.loss_fn.importance_sampled
    vlb = iddpm_cifar.get_config("vlb")
    assert vlb.training.loss == "vlb"
    assert experiment.build(vlb, shape_only_data=True).loss_fn.importance_sampled
    # The chain the loss and the sampler use is the paper's cosine chain, betas clipped at 0.999.
    betas = chain.make_chain(exp.sde).beta
    assert betas.shape == (4000,) and np.isclose(betas.max(), 0.999)
