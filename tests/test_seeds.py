"""A seed means the same samples and likelihoods on any hardware and at any batch size.

Every random draw of sample n comes from fold_in(key, n) (`diffusion.rng`), and every adaptive
ODE solve takes its own steps per example, so `--mode sample` writes the same samples, and
`--mode eval` the same bits/dim, for 1 or 4 devices and for any `sampling.batch_size` /
`eval.batch_size`. The exception is score_sde's Langevin step size
(`sampling.corrector_norm="batch"`): one for the whole batch, averaged over every device, so it
does not depend on the devices, only on the batch size.

"The same" is up to float rounding, which differs between batch sizes (XLA picks other kernels):
1e-5 in data units for the fixed-step samplers. An adaptive solver turns a rounding difference
into another accepted step now and then, so the ODE sampler and the likelihood agree to the
solver's accuracy instead; in float64 (the tests on the exact mixture score) all agree to 1e-9,
which shows that nothing couples the examples of a batch.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from diffusion import checkpointing, evaluate, generate, guidance, likelihood, rng, sampling
from diffusion import gaussian_mixture as gm_lib
from diffusion import sde as sde_lib
from diffusion.parallel import DATA_AXIS, data_mesh
from diffusion.train import build, init_train_state

TOL = 1e-5   # data units
LIKELIHOOD_RTOL = 1e-4   # the adaptive solve at rtol = 1e-5, as the ODE sampler


# --------------------------------------------------------------------------- the samplers


def _batch_invariance(sampler, n=8, m=4, **kwargs):
    """max |sample_b(batch of n) - sample_b(batch of m)| over the first m samples of one key."""
    key = jax.random.key(3)
    sampler = jax.jit(functools.partial(sampler, **kwargs), static_argnums=1)   # 3x faster
    a, _ = sampler(key, (n, DIM))
    b, _ = sampler(key, (m, DIM))
    return float(jnp.max(jnp.abs(a[:m] - b)))


DIM = 3
VP = sde_lib.VPSDE(N=40)
MASK = jnp.asarray([1.0, 0.0, 1.0])


def _mixture():
    """The exact score of a random 3-D mixture under VP and 8 of its samples, in the dtype of
    the test (float64 under the x64 fixture)."""
    gm = gm_lib.GaussianMixture.random(jax.random.key(0), DIM, 3)
    return gm.score_fn(VP), gm.sample(jax.random.key(1), 8)


# name -> sampler(key, shape, score, x) -> (samples, nfe)
SAMPLERS = {
    "pc_langevin_example": lambda k, s, f, x: sampling.pc_sample(
        k, VP, f, s, predictor="reverse_diffusion", corrector="langevin",
        corrector_norm="example"),
    "pc_ald": lambda k, s, f, x: sampling.pc_sample(k, VP, f, s, corrector="ald"),
    "ode": lambda k, s, f, x: sampling.ode_sample(k, VP, f, s, denoise=True),
    "ddim_eta1": lambda k, s, f, x: sampling.ddim_sample(k, VP, f, s, steps=10, eta=1.0),
    "dpm_solver": lambda k, s, f, x: sampling.dpm_solver_sample(k, VP, f, s, steps=10),
    "edm_churn": lambda k, s, f, x: sampling.edm_sample(k, VP, f, s, steps=8, s_churn=10.0),
    "inpaint_pc": lambda k, s, f, x: guidance.inpaint_sample(
        k, VP, f, x[:s[0]], MASK, steps=40, corrector_norm="example"),
    "inpaint_repaint": lambda k, s, f, x: guidance.inpaint_sample(
        k, VP, f, x[:s[0]], MASK, steps=40, resample=2, corrector_norm="example"),
    "inpaint_ddim": lambda k, s, f, x: guidance.inpaint_sample(
        k, VP, f, x[:s[0]], MASK, steps=10, sampler="ddim", eta=1.0),
}


# Two in the default suite (the PC sampler with a corrector, the adaptive ODE); every sampler,
# guided tasks included, with the slow set.
@pytest.mark.parametrize("name", [
    pytest.param(name, marks=() if name in ("pc_langevin_example", "ode") else pytest.mark.slow)
    for name in sorted(SAMPLERS)])
def test_a_sample_does_not_depend_on_its_batch(name, x64):
    score, x = _mixture()
    assert _batch_invariance(lambda k, s: SAMPLERS[name](k, s, score, x)) <= 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pc_langevin_example", "ddim_eta1", "edm_churn"])
def test_a_float32_sample_does_not_depend_on_its_batch(name):
    score, x = _mixture()
    assert _batch_invariance(lambda k, s: SAMPLERS[name](k, s, score, x)) <= TOL


def test_scores_sde_batch_norm_is_a_batch_statistic(x64):
    """The "batch" Langevin norm (score_sde's) couples the samples of a batch: the guarantee
    needs corrector_norm="example". (Also shows the test above can fail.)"""
    score, _ = _mixture()
    batch_norm = lambda k, s: sampling.pc_sample(k, VP, score, s, corrector="langevin")  # noqa
    assert _batch_invariance(batch_norm) > 1e-3


def test_a_log_likelihood_does_not_depend_on_its_batch(x64):
    """The Hutchinson probes' keys and the adaptive solve are per example: the first four and
    the last four of eight (given their keys) equal the eight."""
    score, x = _mixture()
    key = jax.random.key(4)
    bpd = jax.jit(lambda k, x: likelihood.log_likelihood(k, VP, score, x,
                                                         divergence="hutchinson_rademacher")[0])
    a = bpd(key, x)
    keys = rng.per_example(key, 8)
    b, c = bpd(keys[:4], x[:4]), bpd(keys[4:], x[4:])
    np.testing.assert_allclose(a, jnp.concatenate([b, c]), atol=1e-9, rtol=0)


def test_the_batch_norm_is_averaged_over_the_devices_of_the_mesh():
    """corrector_norm="batch" on 4 devices (mapped, pmean over the axis) equals one device."""
    score, _ = _mixture()
    shape = (8, DIM)
    key = jax.random.key(5)
    one, _ = jax.jit(lambda k: sampling.pc_sample(k, VP, score, shape, corrector="langevin"))(key)
    mesh = Mesh(np.asarray(jax.devices()[:4]), (DATA_AXIS,))
    spec = jax.sharding.PartitionSpec(DATA_AXIS)

    def device(keys):
        return sampling.pc_sample(keys, VP, score, (2, DIM), corrector="langevin",
                                  axis_name=DATA_AXIS)[0]

    mapped = jax.jit(jax.shard_map(device, mesh=mesh, in_specs=spec, out_specs=spec,
                                   check_vma=False))
    four = mapped(rng.per_example(key, 8))
    assert float(jnp.max(jnp.abs(one - four))) <= TOL


# --------------------------------------------------------------------------- sample files


def _perturbed_run(tmp_path_factory, name: str, variant: str = "smoke"):
    """A checkpoint of experiments/<name>.py:<variant>'s network, its initial weights perturbed by
    N(0, 0.05^2) (the initial network's output is ~0, which would hide a sampler that ignores
    the score), predicting x_0, so that samples stay on the data's scale; (config, workdir)."""
    import importlib

    config = importlib.import_module(f"experiments.{name}").get_config(variant)
    config.model.parameterization = "x0"
    config.sampling.num_samples = 8
    workdir = str(tmp_path_factory.mktemp(f"perturbed_{name}"))
    exp = build(config)
    state = init_train_state(exp, data_mesh())
    draw = np.random.default_rng(0)
    params = jax.tree.map(
        lambda p: p + jnp.asarray(0.05 * draw.standard_normal(p.shape), p.dtype), state.params)
    state = dataclasses.replace(state, params=params, ema_params=params)
    manager = checkpointing.make_manager(workdir)
    checkpointing.save(manager, 0, state)
    checkpointing.finish(manager)
    return config, workdir


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """The 2-D toy's MLP (cheap to compile: the default suite's sample-file tests)."""
    return _perturbed_run(tmp_path_factory, "toy_2d")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """The digits U-Net (8 x 8 images, for the image tasks; with the slow set)."""
    return _perturbed_run(tmp_path_factory, "digits")


def _written_samples(config, workdir, monkeypatch, batch_size: int, devices: int):
    config = config.copy_and_resolve_references()
    config.sampling.batch_size = batch_size
    mesh = Mesh(np.asarray(jax.devices()[:devices]), (DATA_AXIS,))
    monkeypatch.setattr(generate, "data_mesh", lambda: mesh)
    with np.load(generate.sample(config, workdir)) as f:
        return f["samples"]


def _check_same_samples(config, workdir, monkeypatch, tol):
    """Batch 8 on 4 devices, batch 4 on 4 devices and batch 8 on 1 device write the same file."""
    reference = _written_samples(config, workdir, monkeypatch, batch_size=8, devices=4)
    assert len(reference) == 8 and np.all(np.isfinite(reference))
    assert np.std(reference) > 0.01   # a non-trivial sample
    for batch_size, devices in ((4, 4), (8, 1)):
        other = _written_samples(config, workdir, monkeypatch, batch_size, devices)
        assert np.max(np.abs(other - reference)) <= tol, (batch_size, devices)


FAMILIES = {
    "pc_langevin": dict(method="pc", predictor="reverse_diffusion", corrector="langevin",
                        corrector_norm="example"),
    "pc_ald": dict(method="pc", predictor="ancestral", corrector="ald"),
    "ode": dict(method="ode"),
    "ddim": dict(method="ddim", steps=5, eta=1.0),
    "dpm_solver": dict(method="dpm_solver", steps=5),
    "edm": dict(method="edm", steps=4, s_churn=10.0),
}
# The adaptive ODE agrees to its accuracy (rtol = atol = 1e-5, the default): rounding tips a
# step now and then, and the random network's flow amplifies it (measured 1.5e-3, 1,208 NFE).
ODE_TOL = 5e-3


@pytest.mark.parametrize("family", [
    pytest.param(f, marks=() if f == "pc_langevin" else pytest.mark.slow) for f in FAMILIES])
def test_sample_files_equal_for_1_or_4_devices_and_any_batch_size(family, toy_run, monkeypatch):
    """The MLP's samples: measured 1.4e-6 (pc), 3e-8 (ddim), 1.9e-6 (edm) apart."""
    config, workdir = toy_run
    config = config.copy_and_resolve_references()
    config.sampling.update(FAMILIES[family])
    _check_same_samples(config, workdir, monkeypatch, ODE_TOL if family == "ode" else TOL)


@pytest.mark.slow
@pytest.mark.parametrize("task", [
    dict(method="pc", task="inpaint", predictor="reverse_diffusion", corrector="langevin",
         corrector_norm="example"),
    dict(method="ddim", steps=5, eta=1.0, task="super_resolve", sr_factor=2),
    dict(method="edm", steps=4, s_churn=10.0, task="inpaint", mask="center")])
def test_image_task_files_equal_for_1_or_4_devices_and_any_batch_size(task, digits_run,
                                                                      monkeypatch):
    """The U-Net's float rounding differs between batch sizes more than the MLP's: measured up
    to 1.1e-5 after the pc sampler's 80 evaluations."""
    config, workdir = digits_run
    config = config.copy_and_resolve_references()
    config.sampling.update(task)
    _check_same_samples(config, workdir, monkeypatch, 5e-5)


@pytest.mark.slow
def test_score_sdes_batch_norm_is_the_same_on_1_or_4_devices(toy_run, monkeypatch):
    config, workdir = toy_run
    config = config.copy_and_resolve_references()
    config.sampling.update(method="pc", predictor="reverse_diffusion", corrector="langevin")
    a = _written_samples(config, workdir, monkeypatch, batch_size=8, devices=4)
    b = _written_samples(config, workdir, monkeypatch, batch_size=8, devices=1)
    assert np.max(np.abs(a - b)) <= TOL


@pytest.mark.slow   # a likelihood for any batch: test_a_log_likelihood_does_not_depend_on_its_batch
def test_likelihood_equal_for_any_eval_batch_size(toy_run):
    """The toy's nats per example (exact divergence) for eval batches of 16 and 8."""
    config, workdir = toy_run
    exp = build(config)
    mesh = data_mesh()
    state = evaluate.restore_latest(exp, workdir, mesh)
    records = []
    for batch_size in (16, 8):   # the same 32 eval examples
        e = dataclasses.replace(exp.eval, batch_size=batch_size, bpd_num_batches=32 // batch_size)
        records.append(evaluate.eval_likelihood(dataclasses.replace(exp, eval=e, cache={}),
                                                state.ema_params, mesh))
    assert records[0]["likelihood_examples"] == records[1]["likelihood_examples"] == 32
    for name in ("nll", "nll_std_err"):   # the random network's nll is ~2e6 nats
        assert abs(records[0][name] / records[1][name] - 1.0) <= LIKELIHOOD_RTOL, name
