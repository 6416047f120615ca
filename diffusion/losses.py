"""Training objectives: denoising score matching, flow matching and EDM's loss in continuous time,
and the discrete DDPM / SMLD losses.

The continuous losses are one objective with different weightings and noise-level densities
(Kingma & Gao 2023, "Understanding Diffusion Objectives"): with eps-MSE = || sigma s + z ||^2 the
error of the model's noise prediction at x_t = alpha(t) x_0 + sigma(t) z,

  loss                   weight on eps-MSE                 density of the noise level
  DSM (default)          1                                 t ~ U(eps, T)
  DSM, likelihood w.     g(t)^2 / sigma^2                  t ~ U(eps, T)
  flow matching          sigma^2 lambda'(t)^2 (rectified   t ~ U(eps, T) or logit-normal
  (velocity error)       flow: 1 / (1 - t)^2)
  EDM (weighted          (sigma~^2 + s_d^2) / s_d^2        ln sigma~ ~ N(P_mean, P_std^2)
  denoiser error)

with lambda = log(alpha / sigma) the log-SNR and sigma~ = sigma / alpha. Each is minimised by the
exact score whatever the network's parameterisation (diffusion/models/parameterization.py).

Every loss is built by a `make_*_loss` factory from the SDE and a score model
`score_model(params, x, t, *, y=None, train=False, rng=None) -> score` (see
`diffusion.models.parameterization.make_score_model`) and has one signature:

    loss_fn(params, batch, key) -> per-example losses (B,)

with batch = {"x": (B, ...) data, "label": (B,) ints} and key a (B,) array of per-example PRNG
keys: the noise level and the noise an example gets depend only on its key, never on how the
batch is split over devices (dropout, drawn for the whole batch, is the one exception). A single
key is also accepted: example b then uses fold_in(key, b) (`diffusion.rng`). The caller
reduces over the batch. The discrete losses (DDPM, SMLD) condition the network on a level of
the SDE's chain rather than a time, so they take a `ScoreModel` built with continuous=False and
call its `at_level`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffusion import chain as chain_lib
from diffusion import rng
from diffusion.models.parameterization import time_conditioning
from diffusion.sde import SDE, VESDE, batch_broadcast, data_prediction

Array = jax.Array
LossFn = Callable[[dict, dict, Array], Array]
LOSSES = ("dsm", "flow_matching", "edm", "hybrid", "vlb", "consistency_training",
          "consistency_distillation")
T_SAMPLINGS = ("uniform", "logit_normal")


def _reduce(sq: Array, reduce_mean: bool) -> Array:
    """Per-example reduction over non-batch dims: mean, or 1/2 sum as in score_sde."""
    axes = tuple(range(1, sq.ndim))
    return jnp.mean(sq, axis=axes) if reduce_mean else 0.5 * jnp.sum(sq, axis=axes)


def _draw(key: Array, x0: Array) -> tuple[Array, Array, Array]:
    """Per-example noise z ~ N(0, I) like x0 and u ~ U[0, 1) (B,), plus one dropout key.

    Each example's (z, u) comes from its own key (purposes `rng.NOISE`, `rng.TIME`), so it does
    not depend on the batch layout; the dropout key is the first example's, for `rng.DROPOUT`.
    """
    keys = rng.per_example(key, x0.shape[0])
    z = rng.normal(rng.fold_in(keys, rng.NOISE), x0.shape, x0.dtype)
    u = jax.vmap(jax.random.uniform)(rng.fold_in(keys, rng.TIME))
    return z, u, jax.random.fold_in(keys[0], rng.DROPOUT)


def make_dsm_loss(sde: SDE, score_model: Callable, *, reduce_mean: bool = True,
                  likelihood_weighting: bool = False, eps: float = 1e-5) -> LossFn:
    """Continuous denoising score matching (Song et al. 2021, eq. 7).

    t ~ U(eps, T), x_t = alpha(t) x_0 + sigma(t) z, and the per-example loss is
      lambda(t) || s(x_t, t) + z / sigma(t) ||^2, reduced over dimensions,
    with lambda(t) = sigma(t)^2 (the default: the loss is || sigma s + z ||^2, the epsilon-MSE)
    or lambda(t) = g(t)^2 (`likelihood_weighting`, Song et al. 2021b, which bounds the NLL).
    `reduce_mean` takes the mean over dimensions, else half the sum (score_sde's convention).
    """

    def loss_fn(params, batch, key):
        x0 = batch["x"]
        z, u, dropout_rng = _draw(key, x0)
        t = eps + u * (sde.T - eps)
        mean, std = sde.marginal_prob(x0, t)
        xt = mean + batch_broadcast(std, x0) * z
        score = score_model(params, xt, t, y=batch.get("label"), train=True,
                            rng=dropout_rng)
        if likelihood_weighting:
            g2 = sde.sde(jnp.zeros_like(x0), t)[1] ** 2
            return _reduce((score + z / batch_broadcast(std, x0)) ** 2, reduce_mean) * g2
        return _reduce((batch_broadcast(std, x0) * score + z) ** 2, reduce_mean)

    return loss_fn


def velocity_from_score(sde: SDE, score: Array, x: Array, t: Array) -> Array:
    """The velocity E[alpha' x_0 + sigma' z | x_t] = alpha' D + sigma' E[z | x_t] of a score,
    with D its data prediction (`sde.data_prediction`) and E[z | x_t] = -sigma score;
    x (B, ...), t (B,)."""
    alpha, sigma, d_alpha, d_sigma = (batch_broadcast(c, x) for c in sde.marginal_rates(t))
    return d_alpha * data_prediction(x, score, alpha, sigma) - d_sigma * sigma * score


def make_flow_matching_loss(sde: SDE, score_model: Callable, *, t_sampling: str = "uniform",
                            logit_mean: float = 0.0, logit_std: float = 1.0,
                            reduce_mean: bool = True, eps: float = 1e-5) -> LossFn:
    """Conditional flow matching: regression of the velocity of x_t = alpha x_0 + sigma z.

    The per-example loss is || v(x_t, t) - (alpha'(t) x_0 + sigma'(t) z) ||^2, reduced over
    dimensions, with v the model's velocity (`velocity_from_score`; for a "v" model its output
    times c_v). For the rectified flow (alpha = 1 - t, sigma = t) the target is z - x_0 and this
    is the loss of Lipman et al. 2023 (eq. 23 with sigma_min = 0), Liu et al. 2023 and Esser et
    al. 2024 (SD3). As score matching it is DSM with the weighting in the module docstring.

    t_sampling: "uniform" (t ~ U(eps, T)) or "logit_normal" (SD3, sec. 3.1: t = sigmoid(m + s n),
    n ~ N(0, 1), with m = logit_mean, s = logit_std; mapped linearly from (0, 1) onto
    (eps, T)). `reduce_mean` takes the mean over dimensions, else half the sum.
    """
    if t_sampling not in T_SAMPLINGS:
        raise ValueError(f"Unknown t sampling {t_sampling!r}: training.t_sampling must be one of "
                         f"{list(T_SAMPLINGS)}.")
    if logit_std <= 0:
        raise ValueError(f"training.logit_std must be positive, got {logit_std}.")

    def loss_fn(params, batch, key):
        x0 = batch["x"]
        z, u, dropout_rng = _draw(key, x0)
        if t_sampling == "logit_normal":
            u = jax.nn.sigmoid(logit_mean + logit_std * jax.scipy.special.ndtri(u))
        t = eps + u * (sde.T - eps)
        alpha, sigma, d_alpha, d_sigma = (batch_broadcast(c, x0) for c in sde.marginal_rates(t))
        xt = alpha * x0 + sigma * z
        score = score_model(params, xt, t, y=batch.get("label"), train=True, rng=dropout_rng)
        target = d_alpha * x0 + d_sigma * z
        return _reduce((velocity_from_score(sde, score, xt, t) - target) ** 2, reduce_mean)

    return loss_fn


def make_edm_loss(sde: SDE, score_model: Callable, *, p_mean: float = -1.2, p_std: float = 1.2,
                  sigma_data: float = 0.5, reduce_mean: bool = True, eps: float = 1e-5) -> LossFn:
    """EDM's loss (Karras et al. 2022, eq. 8 and Table 1), written for any process.

    In the scaled variables x~ = x_t / alpha = x_0 + sigma~ z with sigma~ = sigma / alpha, the
    noise level is log-normal, ln sigma~ ~ N(p_mean, p_std^2) (EDM: -1.2, 1.2), and the loss is
    lambda(sigma~) || D(x_t) - x_0 ||^2 with lambda = (sigma~^2 + s_d^2) / (sigma~ s_d)^2 and
    D = (x_t + sigma^2 score) / alpha the model's denoiser. The time of each sigma~ is
    `sde.t_of_log_snr(-ln sigma~)`, clipped to [eps, T] (so sigma~ beyond the process's range
    is drawn at its end). EDM sums over pixels; `reduce_mean` takes the mean (else half the sum),
    which Adam's updates do not see apart from its eps.
    """
    if p_std <= 0 or sigma_data <= 0:
        raise ValueError(f"training.p_std and data.sigma_data must be positive, got {p_std} and "
                         f"{sigma_data}.")

    def loss_fn(params, batch, key):
        x0 = batch["x"]
        z, u, dropout_rng = _draw(key, x0)
        log_sigma = p_mean + p_std * jax.scipy.special.ndtri(u)
        t = sde.t_of_log_snr(-log_sigma, t_min=eps)
        alpha, sigma = (batch_broadcast(c, x0) for c in sde.marginal_coeffs(t))
        xt = alpha * x0 + sigma * z
        score = score_model(params, xt, t, y=batch.get("label"), train=True, rng=dropout_rng)
        sigma_tilde = sigma / alpha
        weight = (sigma_tilde**2 + sigma_data**2) / (sigma_tilde * sigma_data) ** 2
        d = data_prediction(xt, score, alpha, sigma)
        return _reduce(weight * (d - x0) ** 2, reduce_mean)

    return loss_fn


def _draw_level(key: Array, x0: Array, num_levels: int) -> tuple[Array, Array, Array]:
    """Per-example noise z like x0 and a level i ~ U{0, ..., num_levels - 1} (B,), plus one
    dropout key; as `_draw`, each example's draws come from its own key."""
    z, u, dropout_rng = _draw(key, x0)
    return z, level_of(u, num_levels), dropout_rng


def level_of(u: Array, num_levels: int, probs: Array | None = None) -> Array:
    """The level (B,) int32 of uniforms u (B,): uniform on 0 .. N - 1, or distributed as `probs`
    (N,) by the inverse CDF (importance sampling; `diffusion.importance`)."""
    if probs is None:
        return jnp.minimum(jnp.floor(u * num_levels), num_levels - 1).astype(jnp.int32)
    cdf = jnp.cumsum(probs)
    return jnp.minimum(jnp.searchsorted(cdf, u * cdf[-1], side="right"),
                       num_levels - 1).astype(jnp.int32)


def _check_discrete_model(score_model, loss: str) -> None:
    if not hasattr(score_model, "at_level"):
        raise ValueError(f"The {loss} loss conditions the network on discrete levels: it needs a "
                         f"score model with `at_level` (diffusion.models.ScoreModel built with "
                         f"continuous=False, i.e. training.continuous=False).")


def make_ddpm_loss(sde: SDE, score_model: Callable, *, reduce_mean: bool = True) -> LossFn:
    """DDPM's L_simple on the discrete chain of a VP-type SDE (Ho et al. 2020, eq. 14).

    i ~ U{0, ..., N-1}, x_i = sqrt(bar-alpha_i) x_0 + sqrt(1 - bar-alpha_i) z, and the loss is
    || eps_theta(x_i, i) - z ||^2 with eps_theta = -sqrt(1 - bar-alpha_i) s(x_i, i), the network's
    epsilon (for an "epsilon" model its output itself, up to rounding), conditioned on level i as
    score_sde's DDPM loss conditions it (`ScoreModel.at_level`). Level 0 has
    sqrt(1 - bar-alpha_0) = sqrt(beta_0), 0.01 for the defaults: every level is finite.
    """
    if not hasattr(sde, "alphas_cumprod"):
        raise ValueError(f"The DDPM loss needs a VP-type SDE with a discrete chain; got "
                         f"{type(sde).__name__}. Use config.sde.name='vpsde' or 'cosine_vpsde', "
                         f"or training.continuous=True.")
    _check_discrete_model(score_model, "DDPM")

    def loss_fn(params, batch, key):
        x0 = batch["x"]
        z, i, dropout_rng = _draw_level(key, x0, sde.N)
        alpha, sigma = (batch_broadcast(c, x0) for c in sde.discrete_coeffs(i))
        score = score_model.at_level(params, alpha * x0 + sigma * z, i, y=batch.get("label"),
                                     train=True, rng=dropout_rng)
        return _reduce((sigma * score + z) ** 2, reduce_mean)

    return loss_fn


def make_smld_loss(sde: SDE, score_model: Callable, *, reduce_mean: bool = False) -> LossFn:
    """The SMLD / NCSN loss on VESDE's discrete noise levels (Song & Ermon 2019, eq. 5-6).

    i ~ U{0, ..., N-1}, x = x_0 + sigma_i z, and the loss is
    sigma_i^2 || s(x, i) + z / sigma_i ||^2 (the lambda(sigma) = sigma^2 weighting), with the
    network conditioned on level i as score_sde's SMLD loss conditions it (`ScoreModel.at_level`).
    """
    if not isinstance(sde, VESDE):
        raise ValueError(f"The SMLD loss is defined for the VE SDE; got {type(sde).__name__}. Use "
                         f"config.sde.name='vesde' or training.continuous=True.")
    _check_discrete_model(score_model, "SMLD")

    def loss_fn(params, batch, key):
        x0 = batch["x"]
        z, i, dropout_rng = _draw_level(key, x0, sde.N)
        sigma = batch_broadcast(sde.discrete_coeffs(i)[1], x0)
        score = score_model.at_level(params, x0 + sigma * z, i, y=batch.get("label"),
                                     train=True, rng=dropout_rng)
        return _reduce((sigma * score + z) ** 2, reduce_mean)

    return loss_fn


def draw_levels(key: Array, batch: int, num_levels: int, probs: Array | None = None) -> Array:
    """The (B,) levels the discrete losses draw from per-example keys (or one key): uniform on
    0 .. N - 1, or from `probs` (N,) by the inverse CDF of the example's u (importance
    sampling; `diffusion.importance`)."""
    keys = rng.per_example(key, batch)
    return level_of(jax.vmap(jax.random.uniform)(rng.fold_in(keys, rng.TIME)), num_levels, probs)


def make_vlb_loss(sde: SDE, score_model: Callable, *, loss: str = "hybrid",
                  reduce_mean: bool = True, decoder: chain_lib.Decoder | None = None,
                  vlb_weight: float = 0.001, importance_sampling: bool = True) -> LossFn:
    """Improved DDPM's losses (Nichol & Dhariwal 2021) on the discrete chain of a VP, cosine or
    VE SDE, for a model with a learned variance (`ScoreModel.learn_variance`).

    i ~ U{0 .. N-1}, x_i = a_i x_0 + s_i z, and with L_i the bound's term at level i in bits
    (`chain.vlb_term`: a KL for i >= 1, the decoder's NLL for i = 0), reduced over dimensions
    (mean: bits/dim, else half the sum):
      "hybrid"  L_simple + vlb_weight N L_i  (their eq. 16 with lambda = 0.001: L_simple is
                || s_i score + z ||^2, the epsilon MSE; L_i sees the mean with a stop-gradient,
                so it trains the variance only, sec. 3.1)
      "vlb"     N L_i, an unbiased estimate of the whole bound but the prior term; with
                `importance_sampling` the train step passes level_probs (N,) (`importance`) and
                the estimate is weighted by 1 / (N p_i) (sec. 3.3), still unbiased.
    The loss function takes an optional `level_probs=None` (uniform levels) and carries
    `importance_sampled` and `num_levels` attributes for the train step.
    """
    if loss not in ("hybrid", "vlb"):
        raise ValueError(f"make_vlb_loss makes 'hybrid' or 'vlb', got {loss!r}.")
    chain = chain_lib.make_chain(sde)
    decoder = decoder or chain_lib.Decoder()
    _check_discrete_model(score_model, loss)
    if not getattr(score_model, "learn_variance", False):
        raise ValueError(f"training.loss={loss!r} trains the reverse kernel's variance: set "
                         f"model.learn_variance=True (or use training.loss='dsm' with "
                         f"training.continuous=False, DDPM's L_simple).")
    n = len(chain)

    def loss_fn(params, batch, key, level_probs=None):
        x0 = batch["x"]
        z, u, dropout_rng = _draw(key, x0)
        i = level_of(u, n, level_probs)
        alpha, sigma = (batch_broadcast(chain.table(c)[i], x0) for c in ("alpha", "sigma"))
        xt = alpha * x0 + sigma * z
        score, v = score_model.at_level_with_variance(params, xt, i, y=batch.get("label"),
                                                      train=True, rng=dropout_rng)
        mean_score = jax.lax.stop_gradient(score) if loss == "hybrid" else score
        mean = chain.reverse_mean(xt, mean_score, i)
        bits = chain_lib.vlb_term(chain, decoder, x0, xt, i, mean,
                                  chain.log_variance(i, v)) / math.log(2.0)
        term = n * _reduce(bits, reduce_mean)
        if loss == "hybrid":
            return _reduce((sigma * score + z) ** 2, reduce_mean) + vlb_weight * term
        if level_probs is not None:
            term = term / (n * level_probs[i])
        return term

    loss_fn.importance_sampled = loss == "vlb" and importance_sampling
    loss_fn.num_levels = n
    return loss_fn


def with_label_dropout(loss_fn: LossFn, p: float, null_label: int) -> LossFn:
    """Training for classifier-free guidance (Ho & Salimans 2022): each example's label is
    replaced by the null label (`null_label` = model.num_classes) with probability p, so that one
    network learns the conditional and the unconditional score. The decision comes from the
    example's own key (purpose `rng.LABEL_DROPOUT`), independent of its noise and noise level."""
    if p == 0:
        return loss_fn

    def dropped(params, batch, key, **options):
        keys = rng.per_example(key, batch["x"].shape[0])
        drop = jax.vmap(lambda k: jax.random.bernoulli(k, p))(rng.fold_in(keys, rng.LABEL_DROPOUT))
        labels = jnp.where(drop, null_label, batch["label"]).astype(batch["label"].dtype)
        return loss_fn(params, dict(batch, label=labels), keys, **options)

    dropped.__dict__.update(getattr(loss_fn, "__dict__", {}))   # importance_sampled, num_levels
    return dropped


def make_classifier_loss(sde: SDE, net, *, eps: float = 1e-5) -> LossFn:
    """Cross-entropy of a noise-conditional classifier on perturbed data (Song et al. 2021,
    app. I.1): x_t = alpha(t) x_0 + sigma(t) z with t ~ U(eps, T), the network told 999 t
    (`parameterization.time_conditioning`, as the continuous score networks). A network with
    noise_conditional=False is trained on clean data (t = 0). Per-example losses (B,);
    batch["label"] holds the classes."""
    noisy = getattr(net, "noise_conditional", True)

    def loss_fn(params, batch, key):
        x0, labels = batch["x"], batch["label"]
        z, u, dropout_rng = _draw(key, x0)
        t = eps + u * (sde.T - eps) if noisy else jnp.zeros_like(u)
        alpha, sigma = sde.marginal_coeffs(t)
        xt = batch_broadcast(alpha, x0) * x0 + batch_broadcast(sigma, x0) * z
        logits = net.apply({"params": params}, xt, time_conditioning(t), train=True,
                           rngs={"dropout": dropout_rng})
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]

    return loss_fn


def classifier_log_prob_fn(net, params) -> Callable[[Array, Array], Array]:
    """log p_t(y | x) of a classifier trained by `make_classifier_loss`: (x, t) -> (B, K)."""

    def log_prob(x, t):
        c_noise = time_conditioning(t)
        return jax.nn.log_softmax(net.apply({"params": params}, x, c_noise, train=False), -1)

    return log_prob


def get_loss_fn(sde: SDE, score_model: Callable, *, loss: str = "dsm", continuous: bool = True,
                reduce_mean: bool = True, likelihood_weighting: bool = False,
                eps: float = 1e-5, **options) -> LossFn:
    """The loss called `loss` (one of LOSSES). "dsm" is the loss score_sde would train with:
    DSM if `continuous`, else DDPM (VP) or SMLD (VE). "hybrid" and "vlb" are Improved DDPM's
    (`make_vlb_loss`; discrete, learned variance). `options` are those of
    `make_flow_matching_loss` (t_sampling, logit_mean, logit_std), `make_edm_loss` (p_mean,
    p_std, sigma_data), `make_vlb_loss` (decoder, vlb_weight, importance_sampling) or
    `consistency_losses.make_consistency_training_loss` (total_steps and ct_s0, ct_s1,
    ct_p_mean, ct_p_std, its s0, s1, p_mean, p_std) or
    `make_consistency_distillation_loss` (teacher_model, cd_levels, cd_solver, cd_distance,
    target_ema); an option of another loss is ignored."""
    if loss not in LOSSES:
        raise ValueError(f"Unknown loss {loss!r}: training.loss must be one of {list(LOSSES)}.")
    if loss.startswith("consistency") and not continuous:
        raise ValueError(f"training.loss={loss!r} needs training.continuous=True.")
    if loss == "consistency_distillation":
        from diffusion.consistency_losses import make_consistency_distillation_loss

        names = {"cd_levels": "num_levels", "cd_solver": "solver", "cd_distance": "distance",
                 "target_ema": "target_ema"}
        if options.get("teacher_model") is None:
            raise ValueError("training.loss='consistency_distillation' needs a teacher: set "
                             "training.teacher_workdir to a trained run's workdir.")
        return make_consistency_distillation_loss(
            sde, score_model, options["teacher_model"],
            **{names[k]: v for k, v in options.items() if k in names})
    if loss == "consistency_training":
        from diffusion.consistency_losses import make_consistency_training_loss

        names = {"total_steps": "total_steps", "ct_s0": "s0", "ct_s1": "s1",
                 "ct_p_mean": "p_mean", "ct_p_std": "p_std"}
        return make_consistency_training_loss(
            sde, score_model, **{names[k]: v for k, v in options.items() if k in names})
    if loss in ("hybrid", "vlb"):
        if continuous:
            raise ValueError(f"training.loss={loss!r} is a loss of the discrete chain: set "
                             f"training.continuous=False.")
        keys = ("decoder", "vlb_weight", "importance_sampling")
        return make_vlb_loss(sde, score_model, loss=loss, reduce_mean=reduce_mean,
                             **{k: v for k, v in options.items() if k in keys})
    if loss != "dsm" or likelihood_weighting:
        if not continuous:
            what = f"training.loss={loss!r}" if loss != "dsm" else "training.likelihood_weighting"
            raise ValueError(f"{what} needs training.continuous=True.")
    if loss == "flow_matching":
        keys = ("t_sampling", "logit_mean", "logit_std")
        return make_flow_matching_loss(sde, score_model, reduce_mean=reduce_mean, eps=eps,
                                       **{k: v for k, v in options.items() if k in keys})
    if loss == "edm":
        keys = ("p_mean", "p_std", "sigma_data")
        return make_edm_loss(sde, score_model, reduce_mean=reduce_mean, eps=eps,
                             **{k: v for k, v in options.items() if k in keys})
    if continuous:
        return make_dsm_loss(sde, score_model, reduce_mean=reduce_mean,
                             likelihood_weighting=likelihood_weighting, eps=eps)
    if isinstance(sde, VESDE):
        return make_smld_loss(sde, score_model, reduce_mean=reduce_mean)
    return make_ddpm_loss(sde, score_model, reduce_mean=reduce_mean)
