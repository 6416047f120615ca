"""benchmarks/peers.py: its closed forms (what every library's accuracy is measured against), the
same-accuracy matching of the table, and one task of this codebase end to end."""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import peers
from diffusion import sde as sde_lib


def test_closed_forms_match_the_vp_sde():
    """_marginal is the VP SDE's p_t of N(MU, diag S^2); exact_score its gradient."""
    sde = sde_lib.VPSDE(peers.BETA_MIN, peers.BETA_MAX)
    t = jnp.array([0.01, 0.3, 1.0])
    alpha, sigma = sde.marginal_coeffs(t)
    mean, std = peers._marginal(t)
    np.testing.assert_allclose(mean, alpha[:, None] * jnp.asarray(peers.MU)[None], rtol=1e-6)
    np.testing.assert_allclose(std**2, alpha[:, None] ** 2 * jnp.asarray(peers.S)[None] ** 2
                               + sigma[:, None] ** 2, rtol=1e-6)
    x = jax.random.normal(jax.random.key(0), (3, 2))
    grad = jax.vmap(jax.grad(lambda x, t: peers.exact_log_density(x[None], t)[0]))(x, t)
    np.testing.assert_allclose(peers.exact_score(x, t), grad, rtol=1e-5, atol=1e-6)


def test_exact_flow_solves_the_probability_flow_ode(x64):
    """d/dt exact_flow(z, t) = f(x, t) - g(t)^2 / 2 score(x, t) at x = exact_flow(z, t), and it
    starts at z at T = 1."""
    sde = sde_lib.VPSDE(peers.BETA_MIN, peers.BETA_MAX)
    z = jax.random.normal(jax.random.key(1), (4, 2), jnp.float64)
    np.testing.assert_allclose(peers.exact_flow(z, 1.0), z, atol=1e-12)
    for t in (0.05, 0.5, 0.9):
        x = peers.exact_flow(z, t)
        dxdt = jax.jvp(lambda s: peers.exact_flow(z, s), (jnp.float64(t),),
                       (jnp.float64(1.0),))[1]
        drift, _ = sde.reverse(peers.exact_score, probability_flow=True).sde(
            x, jnp.full((4,), t, jnp.float64))
        np.testing.assert_allclose(dxdt, drift, rtol=1e-8, atol=1e-10)


def test_likelihood_reference_is_the_exact_solve_with_a_standard_normal_prior(x64):
    """An accurate solve of ours with the N(0, I) prior lands on _likelihood_errors' reference."""
    from diffusion import likelihood

    sde = sde_lib.VPSDE(peers.BETA_MIN, peers.BETA_MAX)
    x = peers.gaussian_points(jax.random.key(2), 64).astype(jnp.float64)
    logp, nfe = jax.jit(lambda x: likelihood.log_likelihood(
        jax.random.key(0), sde, peers.exact_score, x, divergence="exact", rtol=1e-10,
        atol=1e-10, eps=peers.LIKELIHOOD_EPS))(x)
    report = peers._likelihood_errors(x, logp, nfe)
    assert report["error"] < 1e-7, report
    # ... and the true density differs from it by the prior mismatch (about 5e-3 nats).
    gap = float(jnp.mean(jnp.abs(logp - peers.exact_log_density(x, peers.LIKELIHOOD_EPS))))
    assert 1e-3 < gap < 2e-2, gap


def test_the_table_compares_at_the_peer_accuracy():
    ours = {"seconds": 0.004, "error": 2e-5, "nfe": 67, "tolerance": 1e-5,
            "settings": [{"seconds": 0.004, "error": 2e-5, "nfe": 67, "tolerance": 1e-5},
                         {"seconds": 0.006, "error": 5e-7, "nfe": 121, "tolerance": 1e-7},
                         {"seconds": 0.013, "error": 3e-7, "nfe": 217, "tolerance": 1e-8}]}
    peer = {"seconds": 0.08, "error": 5.2e-7, "nfe": 601}
    assert peers._matched(ours, peer)["tolerance"] == 1e-7
    assert peers._ratio(ours, peer).startswith("13.33x (ours at 0.006 s (121 NFE")
    # No setting of ours as accurate as the peer: our most accurate one, named.
    assert peers._matched(ours, {**peer, "error": 1e-8})["tolerance"] == 1e-8
    train = {"steps_per_s": 300.0, "params": 136_962}
    table = peers.table({"ours": {"train_mlp": train},
                         "sbgm": {"train_mlp": {"steps_per_s": 150.0, "params": 133_634}},
                         "diffusionjax": {"train_mlp": {"missing": "not importable"}}},
                        ["train_mlp"])
    assert "| train_mlp | 300.0 steps/s (137k params) | 150.0 steps/s (134k params) | " \
           "not importable | 2.00x | - |" in table


def test_euler_maruyama_task_of_this_codebase_runs(monkeypatch):
    """The `ours` worker end to end on a smaller problem (the timing itself is the benchmark's)."""
    monkeypatch.setattr(peers, "N_POINTS", 64)
    monkeypatch.setattr(peers, "EM_STEPS", 20)
    record = peers.ours("em", 0)
    assert record["nfe"] == 20 and record["seconds"] > 0
