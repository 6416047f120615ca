"""Multistep consistency sampling (`sampling.consistency_sample`) against closed forms.

For Gaussian data x_0 ~ N(MU, S^2 I) the probability-flow ODE's flow map to the data is affine:
f(x_t, t) = MU + (x_t - a MU) S / sqrt(a^2 S^2 + s^2), with a, s = alpha(t), sigma(t) (it maps
the marginal N(a MU, a^2 S^2 + s^2) onto N(MU, S^2) monotonically, hence is the ODE's map). As a
score, (a f - x) / s^2, its denoiser is f itself, so the sampler's output law is known exactly:
every step is an affine map of a Gaussian plus fresh Gaussian noise.
"""

import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from helpers import random_params

from diffusion import consistency_losses, losses, models, rng, sampling, train
from diffusion import sde as sde_lib
from experiments import toy_2d

MU, S, DIM, N = 0.7, 0.5, 2, 20_000

PROCESSES = {"vp": sde_lib.VPSDE(), "ve": sde_lib.VESDE(sigma_min=0.01, sigma_max=20.0),
             "flow": sde_lib.RectifiedFlow()}


def coeffs(sde, t):
    a, s = sde.marginal_coeffs(np.asarray([t], np.float64))
    return float(np.asarray(a)[0]), float(np.asarray(s)[0])


def flow_map_score(sde):
    """The score whose denoiser is the exact flow map f of N(MU, S^2) data."""

    def score_fn(x, t):
        a, s = (c[:, None] for c in sde.marginal_coeffs(t))
        f = MU + (x - a * MU) * S / jnp.sqrt(a**2 * S**2 + s**2)
        return (a * f - x) / s**2

    return score_fn


def law_of_samples(sde, times):
    """Mean and variance (per dimension) of consistency_sample's output with the exact map: the
    prior N(0, p^2), then f, then for each further time re-noise and f again."""
    a_T, s_T = coeffs(sde, times[0])
    prior_var = {sde_lib.VPSDE: lambda: 1.0, sde_lib.VESDE: lambda: sde.sigma_max**2,
                 sde_lib.RectifiedFlow: lambda: sde.T**2}[type(sde)]()
    k = S / math.sqrt(a_T**2 * S**2 + s_T**2)
    mean, var = MU - k * a_T * MU, k**2 * prior_var
    for t in times[1:]:
        a, s = coeffs(sde, t)
        k = S / math.sqrt(a**2 * S**2 + s**2)
        mean, var = MU + k * (a * mean - a * MU), k**2 * (a**2 * var + s**2)
    return mean, var


@pytest.mark.parametrize("name", list(PROCESSES))
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_consistency_sampling_with_the_exact_flow_map(name, steps):
    """The samples' mean and variance equal the law of the algorithm (one affine map per step,
    fresh noise at each re-noising) within 4 standard errors, and that law is the data's
    N(MU, S^2) up to the prior's mismatch with the marginal at T (at most 0.013 in the mean: VE's
    N(0, sigma_max^2) prior against N(MU, S^2 + sigma_max^2); below 2e-3 in the variance after
    the first re-noising). nfe = number of times."""
    sde = PROCESSES[name]
    times = (sde.T, 0.5 * sde.T, 0.1 * sde.T)[:steps]
    x, nfe = jax.jit(lambda k: sampling.consistency_sample(k, sde, flow_map_score(sde),
                                                           (N, DIM), times=times))(
        jax.random.key(1))
    assert nfe == steps
    x = np.asarray(x, np.float64)
    mean, var = law_of_samples(sde, times)
    se_mean, se_var = math.sqrt(var / (N * DIM)), var * math.sqrt(2.0 / (N * DIM))
    assert abs(x.mean() - mean) < 4 * se_mean
    assert abs(x.var() - var) < 4 * se_var + 1e-6
    assert abs(mean - MU) < 0.02 and abs(var - S**2) < 0.01
    if steps > 1:
        assert abs(var - S**2) < 2e-3


def test_the_denoiser_of_a_diffusion_models_score_gives_the_posterior_mean():
    """With a diffusion model's score (Tweedie's denoiser), one step returns E[x_0 | x_T]: for
    N(MU, S^2) data under the VP SDE, nearly the constant MU (variance k^2 << S^2), which is why
    consistency sampling needs a consistency model."""
    sde = sde_lib.VPSDE()

    def score_fn(x, t):
        a, s = (c[:, None] for c in sde.marginal_coeffs(t))
        return -(x - a * MU) / (a**2 * S**2 + s**2)

    x, _ = sampling.consistency_sample(jax.random.key(0), sde, score_fn, (4000, DIM))
    a, s = coeffs(sde, sde.T)
    k = a * S**2 / (a**2 * S**2 + s**2)        # E[x_0 | x] = MU + k (x - a MU)
    np.testing.assert_allclose(np.var(np.asarray(x)), k**2, rtol=0.1)
    assert np.var(np.asarray(x)) < 1e-3 * S**2


def test_a_sample_depends_on_its_own_key_only():
    """Sample b's prior draw and re-noising come from its key: the first 4 samples of a batch
    of 8 equal a batch of 4 drawn with the same keys."""
    sde = PROCESSES["vp"]
    keys = jax.random.split(jax.random.key(3), 8)
    run = lambda k, n: sampling.consistency_sample(k, sde, flow_map_score(sde), (n, DIM),
                                                   times=(1.0, 0.4))[0]
    np.testing.assert_allclose(run(keys[:4], 4), run(keys, 8)[:4], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("times, message", [
    ((0.5,), r"starts from the prior at T = 1\.0"),
    ((1.0, 0.5, 0.6), r"decrease strictly and stay above 0"),
    ((1.0, 0.0), r"decrease strictly and stay above 0"),
])
def test_bad_times_are_one_clear_error(times, message):
    sde = PROCESSES["vp"]
    with pytest.raises(ValueError, match=message):
        sampling.consistency_sample(jax.random.key(0), sde, flow_map_score(sde), (2, DIM),
                                    times=times)


def test_consistency_sampling_from_the_config(smoke_run):
    """sampling.method="consistency" with sampling.times="1.0,0.3": two evaluations, finite
    samples of the data's shape (toy_2d:smoke, a diffusion model: the sampler runs on any)."""
    config, workdir = smoke_run("toy_2d")
    config.sampling.method, config.sampling.times = "consistency", "1.0,0.3"
    path = train.sample(config, workdir)
    with np.load(path) as f:
        samples, nfe = f["samples"], int(f["nfe"])
    assert nfe == 2 and samples.shape == (config.sampling.num_samples, 2)
    assert np.all(np.isfinite(samples))


# --------------------------------------------------------------------------- consistency training


def test_the_curriculum_is_icts_doubling_formula():
    """N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = floor(K / (log2(s1 / s0) + 1)): for
    K = 400k, s0 = 10, s1 = 1280, K' = 50k and N runs 11, 21, ..., 1281 (reached at 350k)."""
    k = np.asarray([0, 49_999, 50_000, 100_000, 299_999, 300_000, 350_000, 399_999])
    got = np.asarray(consistency_losses.curriculum(k, 400_000))
    np.testing.assert_array_equal(got, [11, 11, 21, 41, 321, 641, 1281, 1281])
    expected = [min(10 * 2 ** (int(s) // 50_000), 1280) + 1 for s in range(0, 400_000, 997)]
    got = np.asarray(consistency_losses.curriculum(np.arange(0, 400_000, 997), 400_000))
    np.testing.assert_array_equal(got, expected)


def test_levels_and_their_lognormal_probabilities():
    """Karras levels from sigma_min to sigma_max (rho 7) for the first n entries; the pair
    probabilities are the N(P_mean, P_std^2) mass of ln sigma between neighbours, normalised,
    zero past the last pair."""
    n, size = 11, 16
    sigmas = np.asarray(consistency_losses.karras_levels(0.002, 80.0, jnp.int32(n), size))
    i = np.arange(n)
    expected = (0.002 ** (1 / 7) + i / (n - 1) * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    np.testing.assert_allclose(sigmas[:n], expected, rtol=1e-5)
    probs = np.asarray(consistency_losses.lognormal_pair_probs(jnp.asarray(sigmas), n))
    cdf = scipy.stats.norm.cdf(np.log(expected), -1.1, 2.0)
    np.testing.assert_allclose(probs[:n - 1], np.diff(cdf) / np.sum(np.diff(cdf)), rtol=1e-4)
    assert np.all(probs[n - 1:] == 0) and probs.shape == (size - 1,)


def test_pseudo_huber_is_the_closed_form():
    diff = np.random.default_rng(0).normal(size=(5, 3, 4)).astype(np.float32)
    c = 0.00054 * math.sqrt(12)
    expected = np.sqrt(np.sum(diff.reshape(5, -1).astype(np.float64) ** 2, 1) + c**2) - c
    np.testing.assert_allclose(consistency_losses.pseudo_huber(jnp.asarray(diff), c), expected,
                               rtol=1e-6)


def _consistency_model(sde, boundary_time=1e-3):
    net = models.MLP(hidden=16, n_layers=2)
    x = jax.random.normal(jax.random.key(0), (8, DIM))
    params = random_params(net, x, jnp.ones((8,)))
    model = models.make_score_model(net, sde, "consistency", boundary_time=boundary_time)
    return model, params, x


@pytest.mark.parametrize("name", ["vp", "ve", "flow", "cosine"])
def test_the_boundary_condition_holds_exactly_in_float32(name):
    """f(x, b) = x to the last bit at the boundary time b (c_skip (alpha_b / alpha) = 1 and
    c_out = 0 exactly there), for a network whose output is far from 0; just above b, f moves."""
    sde = PROCESSES.get(name) or sde_lib.CosineVPSDE()
    model, params, x = _consistency_model(sde)
    f = model.consistency_function(params, x, jnp.full((8,), 1e-3, jnp.float32))
    np.testing.assert_array_equal(np.asarray(f), np.asarray(x))
    f_later = model.consistency_function(params, x, jnp.full((8,), 0.1, jnp.float32))
    assert np.max(np.abs(np.asarray(f_later) - np.asarray(x))) > 1e-3
    # As a score it is the data prediction f: (x + sigma^2 score) / alpha = f.
    t = jnp.full((8,), 0.3, jnp.float32)
    alpha, sigma = (c[:, None] for c in sde.marginal_coeffs(t))
    np.testing.assert_allclose((x + sigma**2 * model(params, x, t)) / alpha,
                               model.consistency_function(params, x, t), rtol=2e-4, atol=2e-5)


def test_the_target_gets_no_gradient():
    """Consistency training's target f(x_i, t_i) is the online network with a stop-gradient: the
    loss's gradient equals that of the same loss with the target's parameters held constant."""
    sde = PROCESSES["vp"]
    model, params, _ = _consistency_model(sde, boundary_time=1e-5)
    loss_fn = losses.get_loss_fn(sde, model, loss="consistency_training", total_steps=100)
    batch = {"x": jax.random.normal(jax.random.key(2), (16, DIM))}
    key = jax.random.key(3)
    grad = jax.grad(lambda p: jnp.mean(loss_fn(p, batch, key, step=40)))(params)

    class ConstantTarget:   # calls alternate online, target: the target sees fixed params
        parameterization, boundary_time = "consistency", model.boundary_time
        calls = 0

        def consistency_function(self, p, x, t, **kw):
            ConstantTarget.calls += 1
            return model.consistency_function(p if self.calls % 2 else params, x, t, **kw)

    split_loss = consistency_losses.make_consistency_training_loss(sde, ConstantTarget(),
                                                                   total_steps=100)

    def manual(p):
        return jnp.mean(split_loss(p, batch, key, step=40))

    expected = jax.grad(manual)(params)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grad)) > 1e-4


def test_consistency_training_resumes_mid_curriculum_as_uninterrupted(tmp_path):
    """toy_2d:smoke as a consistency model (4 steps: N = 11, 21, 41, 81): training to 4, and
    training to 4 after losing the last checkpoint (resuming at 2), give the same parameters."""
    config = toy_2d.get_config("smoke")
    config.model.parameterization = "consistency"
    config.training.loss = "consistency_training"
    config.training.reduce_mean = False          # the pseudo-Huber distance is per example
    config.sampling.method, config.sampling.times = "consistency", "1.0,0.5"
    config.training.snapshot_sampling = False
    config.training.n_iters, config.training.snapshot_freq = 4, 2
    assert list(np.asarray(consistency_losses.curriculum(np.arange(4), 4))) == [11, 21, 41, 81]
    full = train.train_and_evaluate(config, str(tmp_path / "full"))
    again = tmp_path / "again"
    train.train_and_evaluate(config, str(again))
    shutil.rmtree(again / "checkpoints" / "4")
    resumed = train.train_and_evaluate(config, str(again))
    assert int(resumed.step) == 4
    for a, b in zip(jax.tree.leaves(jax.device_get(full.params)),
                    jax.tree.leaves(jax.device_get(resumed.params)), strict=True):
        np.testing.assert_array_equal(a, b)
    path = train.sample(config, str(again))
    with np.load(path) as f:
        assert int(f["nfe"]) == 2 and np.all(np.isfinite(f["samples"]))


# ------------------------------------------------------------------------ consistency distillation


def exact_score(sde):
    def score_fn(x, t):
        a, s = (c[:, None] for c in sde.marginal_coeffs(t))
        return -(x - a * MU) / (a**2 * S**2 + s**2)

    return score_fn


def exact_ode_step(sde, x, t_from, t_to):
    """The probability-flow ODE of N(MU, S^2) data in closed form: affine in x."""
    (a0, s0), (a1, s1) = (tuple(c[:, None] for c in sde.marginal_coeffs(t))
                          for t in (t_from, t_to))
    return a1 * MU + (x - a0 * MU) * jnp.sqrt((a1**2 * S**2 + s1**2) / (a0**2 * S**2 + s0**2))


@pytest.mark.parametrize("name", ["vp", "ve", "flow"])
def test_the_teacher_step_is_a_third_order_local_step(name):
    """Heun's and DPM-Solver++(2S)'s steps of the exact score's ODE against the closed-form
    solution: the local error falls about 8x (order 3; at least 6x here) when the step halves;
    Euler's 4x."""
    sde = PROCESSES[name]
    x = jax.random.normal(jax.random.key(0), (64, DIM))
    t_from = jnp.full((64,), 0.6 * sde.T)

    def error(solver, dt):
        t_to = t_from - dt
        (af, sf), (at, st) = sde.marginal_coeffs(t_from), sde.marginal_coeffs(t_to)
        step = consistency_losses.teacher_step(sde, exact_score(sde), x, t_from, t_to, sf / af,
                                               st / at, solver)
        return float(jnp.max(jnp.abs(step - exact_ode_step(sde, x, t_from, t_to))))

    dt = 0.1 * sde.T
    heun = [error("heun", dt), error("heun", dt / 2)]
    dpm = [error("dpm_solver", dt), error("dpm_solver", dt / 2)]
    euler = [error("euler", dt), error("euler", dt / 2)]
    assert heun[0] / heun[1] > 6 and heun[0] < euler[0]
    assert dpm[0] / dpm[1] > 6 and dpm[0] < euler[0]
    assert 3 < euler[0] / euler[1] < 5


class ExactFlowMap:
    """A 'consistency' model whose f is the exact flow map of N(MU, S^2) data, times
    (1 + params) (params 0: exact; a perturbation otherwise)."""

    parameterization, boundary_time = "consistency", 1e-3

    def __init__(self, sde):
        self.sde = sde

    def consistency_function(self, params, x, t, **kwargs):
        a, s = (c[:, None] for c in self.sde.marginal_coeffs(t))
        return (1.0 + params) * (MU + (x - a * MU) * S / jnp.sqrt(a**2 * S**2 + s**2))


@pytest.mark.parametrize("name", ["vp", "ve", "flow"])
def test_the_distillation_loss_with_the_exact_teacher_is_the_teacher_steps_error(name):
    """With the exact teacher score and the exact flow map as student and target, the CD loss is
    the flow map's image of the teacher step's error alone, k_i^2 |x^_i - x_i(exact)|^2
    (k = S / sqrt(a^2 S^2 + s^2) at t_i), recomputed here from the same draws: near 0; a
    perturbed student (f scaled by 1.05) has a loss orders of magnitude above it."""
    sde = PROCESSES[name]
    model = ExactFlowMap(sde)
    teacher = lambda params, x, t, y=None: exact_score(sde)(x, t)   # noqa: E731
    loss_fn = consistency_losses.make_consistency_distillation_loss(sde, model, teacher,
                                                                    num_levels=18)
    x0 = MU + S * jax.random.normal(jax.random.key(4), (256, DIM))
    key = jax.random.key(5)
    state = {"target": 0.0, "teacher": None}
    loss = np.asarray(loss_fn(0.0, {"x": x0}, key, state))
    # The same draws, by hand.
    b = model.boundary_time
    a_end, s_end = sde.marginal_coeffs(jnp.asarray([b, sde.T]))
    sigmas = consistency_losses.karras_levels(float(s_end[0] / a_end[0]),
                                              float(s_end[1] / a_end[1]), jnp.int32(18), 18)
    inner = sde.t_of_log_snr(-jnp.log(sigmas[1:-1]), t_min=b)
    times = jnp.concatenate([jnp.asarray([b]), inner, jnp.asarray([sde.T])])
    keys = rng.per_example(key, 256)
    z = rng.normal(rng.fold_in(keys, rng.NOISE), x0.shape, x0.dtype)
    u = jax.vmap(jax.random.uniform)(rng.fold_in(keys, rng.TIME))
    i = jnp.minimum(jnp.floor(u * 17), 16).astype(jnp.int32)
    a, s = (c[:, None] for c in sde.marginal_coeffs(times[i + 1]))
    x_hi = a * x0 + s * z
    x_hat = consistency_losses.teacher_step(sde, exact_score(sde), x_hi, times[i + 1], times[i],
                                            sigmas[i + 1], sigmas[i], "heun")
    x_true = exact_ode_step(sde, x_hi, times[i + 1], times[i])
    a_lo, s_lo = (c[:, None] for c in sde.marginal_coeffs(times[i]))
    k = S / jnp.sqrt(a_lo**2 * S**2 + s_lo**2)
    expected = np.asarray(jnp.mean((k * (x_hat - x_true)) ** 2, axis=1))
    np.testing.assert_allclose(loss, expected, rtol=1e-3, atol=1e-9)
    assert loss.mean() < 1e-4
    perturbed = np.asarray(loss_fn(0.05, {"x": x0}, key, state))
    assert perturbed.mean() > 100 * loss.mean() + 1e-5


def test_distillation_keeps_the_teacher_and_an_ema_target(smoke_run, tmp_path):
    """toy_2d:smoke distilled into a consistency model (the same MLP): the student starts from
    the teacher, the loss state holds the teacher's EMA weights unchanged and the target
    network mu target + (1 - mu) params after the step (one step: mu teacher + (1 - mu) params)."""
    from diffusion import experiment
    from diffusion.parallel import data_mesh
    from diffusion.train_state import restore_latest

    teacher_config, teacher_dir = smoke_run("toy_2d")
    config = toy_2d.get_config("smoke")
    config.model.parameterization = "consistency"
    config.training.loss = "consistency_distillation"
    config.training.teacher_workdir = teacher_dir
    config.training.reduce_mean = False
    config.training.snapshot_sampling = False
    config.sampling.method = "consistency"
    config.training.n_iters = config.training.snapshot_freq = 1
    config.training.log_freq = config.training.eval_freq = 1
    config.optim.warmup, config.optim.lr = 0, 1e-2     # a step that moves the student
    state = train.train_and_evaluate(config, str(tmp_path))
    teacher = restore_latest(experiment.build(teacher_config), teacher_dir, data_mesh())
    mu = config.training.target_ema
    leaves = lambda tree: jax.tree.leaves(jax.device_get(tree))   # noqa: E731
    for t, got in zip(leaves(teacher.ema_params), leaves(state.loss_state["teacher"]),
                      strict=True):
        np.testing.assert_array_equal(t, got)
    for t, p, target in zip(leaves(teacher.ema_params), leaves(state.params),
                            leaves(state.loss_state["target"]), strict=True):
        np.testing.assert_allclose(target, mu * t + (1 - mu) * p, rtol=1e-6, atol=1e-7)
    assert any(np.max(np.abs(t - p)) > 1e-3
               for t, p in zip(leaves(teacher.ema_params), leaves(state.params), strict=True))


def test_the_cifar10_configs_carry_the_papers_settings():
    """experiments/cd_cifar.py: configs/cifar10_ve_cd.py of openai/consistency_models_cifar10
    (N 18, Heun, mu 0, RAdam lr 4e-4, 10M-image warmup at batch 512, no clipping, 800k steps,
    EMA 0.9999, dropout 0) on EDM's process; experiments/ict_cifar.py: iCT's (s0 10, s1 1280,
    P_mean -1.1, P_std 2.0, dropout 0.3, batch 1024, lr 1e-4, 400k steps, EMA 0.99993)."""
    from diffusion import config_checks
    from experiments import cd_cifar, ict_cifar

    cd = cd_cifar.get_config()
    config_checks.check_config(cd)     # raises if the config is invalid
    t = cd.training
    assert (t.loss, t.cd_levels, t.cd_solver, t.target_ema, t.batch_size, t.n_iters) == (
        "consistency_distillation", 18, "heun", 0.0, 512, 800_001)
    assert (cd.optim.optimizer, cd.optim.lr, cd.optim.warmup, cd.optim.grad_clip) == (
        "radam", 4e-4, 19_531, 0.0)
    assert (cd.model.parameterization, cd.model.ema_rate, cd.model.dropout) == (
        "consistency", 0.9999, 0.0)
    assert (cd.sde.name, cd.sde.sigma_min, cd.sde.sigma_max, cd.data.sigma_data) == (
        "vesde", 0.002, 80.0, 0.5)
    ict = ict_cifar.get_config()
    config_checks.check_config(ict)
    t = ict.training
    assert (t.loss, t.ct_s0, t.ct_s1, t.ct_p_mean, t.ct_p_std, t.batch_size, t.n_iters) == (
        "consistency_training", 10, 1280, -1.1, 2.0, 1024, 400_000)
    assert (ict.model.dropout, ict.model.ema_rate, ict.optim.lr) == (0.3, 0.99993, 1e-4)
    # sigma = 0.821, the two-step samplers' middle level, is t = 0.5678 on this VE SDE.
    sde = sde_lib.VESDE(sigma_min=0.002, sigma_max=80.0)
    assert abs(float(sde.marginal_coeffs(np.asarray([0.5678]))[1][0]) - 0.821) < 1e-3


def _train_on_gaussian_data(loss_name, steps=500, seed=0):
    """A small consistency MLP trained by CD (exact teacher) or CT on 1-D N(MU, S^2) data under
    the VP SDE; returns the RMS distance of its f to the exact flow map, in units of S, over
    x_t drawn from the marginals at a few times."""
    import optax

    sde = sde_lib.VPSDE()
    net = models.MLP(hidden=64, n_layers=2)
    model = models.make_score_model(net, sde, "consistency", boundary_time=1e-3, sigma_data=S)
    params = net.init(jax.random.key(seed), jnp.zeros((1, 1)), jnp.zeros((1,)))["params"]
    if loss_name == "cd":
        teacher = lambda p, x, t, y=None: exact_score(sde)(x, t)   # noqa: E731
        loss_fn = consistency_losses.make_consistency_distillation_loss(
            sde, model, teacher, num_levels=18, target_ema=0.0)
        state = loss_fn.init_state(params, None)
    else:
        loss_fn = consistency_losses.make_consistency_training_loss(sde, model,
                                                                    total_steps=steps)
        state = None
    tx = optax.adam(optax.cosine_decay_schedule(3e-3, steps))
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, state, k, i):
        x0 = MU + S * jax.random.normal(jax.random.fold_in(k, 0), (512, 1))
        keys = jax.random.split(jax.random.fold_in(k, 1), 512)
        if loss_name == "cd":
            f = lambda p: jnp.mean(loss_fn(p, {"x": x0}, keys, state))   # noqa: E731
        else:
            f = lambda p: jnp.mean(loss_fn(p, {"x": x0}, keys, step=i))   # noqa: E731
        grads = jax.grad(f)(params)
        updates, opt = tx.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
        if loss_name == "cd":
            state = loss_fn.update_state(state, params)
        return params, opt, state

    key = jax.random.key(seed + 10)
    for i in range(steps):
        params, opt, state = step(params, opt, state, jax.random.fold_in(key, i), i)
    errors = []
    for t in (0.2, 0.5, 1.0):
        tt = jnp.full((4000,), t)
        a, s = (float(c[0]) for c in sde.marginal_coeffs(tt[:1]))
        x = a * MU + math.sqrt(a**2 * S**2 + s**2) * jax.random.normal(jax.random.key(7),
                                                                        (4000, 1))
        exact = MU + (x - a * MU) * S / math.sqrt(a**2 * S**2 + s**2)
        got = model.consistency_function(params, x, tt)
        errors.append(float(jnp.sqrt(jnp.mean((got - exact) ** 2))) / S)
    return errors


@pytest.mark.slow   # 10-15 s each (500 training steps); the losses are tested above in closed form
@pytest.mark.parametrize("loss_name", ["cd", "ct"])
def test_a_small_mlp_learns_the_exact_flow_map(loss_name):
    """Trained by CD (the exact teacher, target mu = 0 as the CIFAR-10 config) or CT for 500
    steps on 1-D Gaussian data, the consistency function is within 0.15 S (RMS over the
    marginal) of the exact flow map at t = 0.2, 0.5 and 1. Measured: CD 0.05 / 0.09 / 0.09,
    CT 0.03 / 0.08 / 0.09; untrained 1.0 / 1.6 / 1.7."""
    errors = _train_on_gaussian_data(loss_name)
    assert max(errors) < 0.15, errors


@pytest.mark.parametrize("changes, message", [
    ({"training.loss": "consistency_training"},
     r"training\.loss='consistency_training' trains a consistency function: set "
     r"model\.parameterization='consistency'"),
    ({"training.loss": "consistency_distillation", "model.parameterization": "consistency",
      "training.reduce_mean": False},
     r"needs training\.teacher_workdir, the workdir of a trained diffusion model"),
    ({"sampling.method": "consistency", "sampling.times": "0.5,1.0"},
     r"sampling\.times='0\.5,1\.0' must start at T = 1\.0 and decrease strictly above 0"),
])
def test_a_consistency_config_that_cannot_run_is_one_clear_error(changes, message):
    from diffusion import config_checks
    from experiments import digits

    config = digits.get_config()
    for key, value in changes.items():
        section, field = key.split(".")
        config[section][field] = value
    with pytest.raises(ValueError, match=message):
        config_checks.check_config(config)


def test_inpainting_with_consistency_sampling():
    """Their Alg. 4 through guidance's replacement of the denoiser: with the exact flow map of
    independent N(MU, S^2) coordinates, the known coordinate is returned exactly and the unknown
    one has the law of plain consistency sampling (it does not depend on the known one); two
    evaluations for two times."""
    from diffusion import guidance

    sde = PROCESSES["vp"]
    known = jnp.stack([jnp.full((N,), 1.3), jnp.zeros((N,))], axis=1)
    mask = jnp.asarray([[1.0, 0.0]])
    times = (1.0, 0.5)
    x, nfe = jax.jit(lambda k: guidance.inpaint_sample(
        k, sde, flow_map_score(sde), known, mask, None, sampler="consistency", times=times))(
        jax.random.key(2))
    assert nfe == 2
    np.testing.assert_array_equal(np.asarray(x[:, 0]), np.full((N,), 1.3, np.float32))
    free = np.asarray(x[:, 1], np.float64)
    mean, var = law_of_samples(sde, times)
    assert abs(free.mean() - mean) < 4 * math.sqrt(var / N)
    assert abs(free.var() - var) < 4 * var * math.sqrt(2.0 / N)
