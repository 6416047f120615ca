"""The one reader of the config: a config becomes an `Experiment` of plain objects.

    exp = build(config)            # checks the config, then builds everything below
    exp.sde, exp.score_model, exp.loss_fn, exp.tx, exp.dataset       # the model and its data
    exp.train, exp.sampling, exp.eval, exp.data                       # plain settings objects
    exp.key("sample")                                                 # a PRNG key per purpose

Training (`train.py`), evaluation (`evaluate.py`) and sampling (`generate.py`) take an
`Experiment` and never read the config themselves. `check_config` (run by `build`) refuses, with
one message listing every problem, a config that would silently train something else than it
says: a key that is neither a shared default (`diffusion/defaults.py`) nor taken by the chosen
network or SDE (a misspelt field), a value changed from its default that the chosen network,
SDE or loss does not use, and settings the loops cannot run with. (A changed sampler setting
that the chosen sampler ignores is only printed: paper configs set the PC sampler's, and the
command line can switch the sampler but not delete keys.)
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax

from diffusion import data as data_lib
from diffusion import defaults, likelihood, losses, models
from diffusion import sde as sde_lib
from diffusion.guide_settings import GuideSettings, guidance_problems
from diffusion.models import mlp, parameterization
from diffusion.sampling import CORRECTORS, PREDICTORS, SAMPLERS, ode, pc
from diffusion.train_state import create_optimizer

# What each sampler reads from config.sampling besides the keys every sampler reads.
SAMPLER_KEYS = {
    "pc": ("steps", "predictor", "corrector", "snr", "n_steps_each", "corrector_norm"),
    "ode": ("rtol", "atol", "ode_solver", "denoiser"),
    "ddim": ("steps", "eta"),
    "dpm_solver": ("steps", "order"),
    "edm": ("steps", "rho", "s_churn"),
}
_SAMPLING_SHARED = ("method", "eps", "noise_removal", "batch_size", "num_samples", "labels",
                    "guidance", "guidance_weight", "classifier_workdir", "task", "task_input",
                    "mask", "sr_factor")
# What each loss reads from config.training (the other training keys drive the loop).
_LOSS_KEYS = {
    "dsm": ("reduce_mean", "likelihood_weighting", "eps"),
    "ddpm / smld": ("reduce_mean",),
    "flow_matching": ("reduce_mean", "eps", "t_sampling", "logit_mean", "logit_std"),
    "edm": ("reduce_mean", "eps", "p_mean", "p_std"),
}
# training.unroll: how the n_jitted_steps optimizer steps of one call are traced (train.py).
UNROLL_CHOICES = ("auto", "unroll", "scan")


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """How training / eval batches are made from the dataset (`data.batch_at`'s options)."""

    centered: bool
    uniform_dequantization: bool
    random_flip: bool
    num_workers: int


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    batch_size: int
    n_iters: int
    snapshot_freq: int
    log_freq: int
    eval_freq: int
    n_jitted_steps: int
    snapshot_sampling: bool
    keep_checkpoints: int
    ema_rate: float
    ema_warmup: bool
    unroll: str = "auto"     # training.unroll: "auto" | "unroll" | "scan"


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """A sampler and its arguments: `SAMPLERS[method](key, sde, score_fn, shape, **kwargs)`.

    pc_levels > 0 runs the pc sampler on the SDE's chain with that many levels (its N).
    """

    method: str
    options: tuple[tuple[str, Any], ...]
    pc_levels: int
    batch_size: int
    num_samples: int
    guide: GuideSettings = GuideSettings()

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    batch_size: int
    num_batches: int
    enable_bpd: bool
    bpd_num_batches: int
    bpd_num_repeats: int
    bpd_divergence: str
    likelihood_eps: float
    likelihood_rtol: float
    likelihood_atol: float
    enable_fid: bool
    fid_num_samples: int
    fid_batch_size: int
    fid_ref_split: str
    fid_ref_max_examples: int
    fid_ref_tag: str           # the stored data the reference statistics describe (cache name)
    fid_stats_dir: str
    inception_weights: str
    kid_subsets: int
    kid_subset_size: int
    is_splits: int


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A config unpacked into the plain objects the loops use."""

    sde: sde_lib.SDE
    net: Any
    score_model: Callable
    loss_fn: losses.LossFn
    tx: optax.GradientTransformation
    dataset: data_lib.Dataset
    num_classes: int | None
    seed: int
    data: DataSettings
    train: TrainSettings
    sampling: SamplingSettings
    eval: EvalSettings
    description: str           # one line for the logs: network, SDE, data
    config_json: str           # the whole config, written to <workdir>/config.json
    # Built once per experiment (jitted samplers, eval functions, the abstract train state), so
    # periodic sampling / evaluation compile once and the network is traced once.
    compiled: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def is_classifier(self) -> bool:
        """A noise-conditional classifier (model.name = "classifier", for classifier guidance):
        trained like a score model, evaluated by accuracy, nothing to sample."""
        return self.score_model is None

    def key(self, purpose: str) -> jax.Array:
        """A PRNG key per purpose ("init", "train", "sample", "eval", ...): independent streams."""
        return jax.random.fold_in(jax.random.key(self.seed), zlib.crc32(purpose.encode()) >> 1)


def build(config: ml_collections.ConfigDict, *, shape_only_data: bool = False) -> Experiment:
    """Checks `config` (`check_config`) and builds SDE, network, score model, loss, optimizer,
    dataset and the settings of training, sampling and evaluation.

    shape_only_data: sampling needs only the data's shape, so a tfds dataset is not opened
    (`data.load_dataset(..., shape_only=True)`).
    """
    for note in check_config(config):
        print(f"note: {note}", flush=True)
    t = config.training
    if config.model.name == "classifier":
        score_model, net, sde = None, models.get_model(config), sde_lib.get_sde(**config.sde)
        loss_fn = losses.make_classifier_loss(sde, net, eps=t.eps)
    else:
        score_model = models.get_score_model(config)
        net, sde = score_model.net, score_model.sde
        # Mixed precision is for training: sampling and likelihoods use the float32 network.
        loss_fn = losses.get_loss_fn(
            sde, dataclasses.replace(score_model, compute_dtype=t.compute_dtype),
            loss=t.loss, continuous=t.continuous, reduce_mean=t.reduce_mean,
            likelihood_weighting=t.likelihood_weighting, eps=t.eps, t_sampling=t.t_sampling,
            logit_mean=t.logit_mean, logit_std=t.logit_std, p_mean=t.p_mean, p_std=t.p_std,
            sigma_data=config.data.sigma_data)
    if score_model is not None and config.model.get("num_classes") is not None:
        loss_fn = losses.with_label_dropout(loss_fn, config.model.label_dropout,
                                            config.model.num_classes)
    o = config.optim
    tx = create_optimizer(o.lr, o.warmup, o.grad_clip, o.beta1, o.beta2, o.eps, o.weight_decay)
    dataset = data_lib.load_dataset(**dataset_args(config), shape_only=shape_only_data)
    m, d = config.model, config.data
    if m.get("num_classes") is not None and (dataset.num_classes or 1) > m.num_classes:
        raise ValueError(f"Dataset {d.dataset!r} has labels 0..{dataset.num_classes - 1}, but "
                         f"model.num_classes={m.num_classes}: labels out of range would share "
                         f"embeddings. Set model.num_classes={dataset.num_classes}.")
    description = (f"model {m.name}{' (remat)' if m.get('remat') else ''}, {t.compute_dtype} "
                   f"compute; SDE {config.sde.name}; data {d.dataset} {dataset.data_shape}")
    return Experiment(
        sde=sde, net=net, score_model=score_model, loss_fn=loss_fn, tx=tx,
        dataset=dataset, num_classes=m.get("num_classes"), seed=config.seed,
        data=DataSettings(d.centered, d.uniform_dequantization, d.random_flip,
                          d.num_workers),
        train=TrainSettings(t.batch_size, t.n_iters, t.snapshot_freq, t.log_freq, t.eval_freq,
                            t.n_jitted_steps, t.snapshot_sampling, t.keep_checkpoints,
                            m.ema_rate, m.ema_warmup, t.get("unroll", "auto")),
        sampling=sampling_settings(config.sampling),
        eval=_eval_settings(config),
        description=description, config_json=config.to_json_best_effort(indent=2))


_NONE_NAMES = (None, "", "none", "None")


def dataset_args(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`data.load_dataset`'s arguments from a config's `data` block."""
    d = config.data
    return dict(name=d.dataset, image_size=d.get("image_size"), num_channels=d.get("num_channels"),
                crop_size=d.get("crop_size"), data_dir=d.get("data_dir"), path=d.get("path"),
                train_split=d.get("train_split") or "train",
                eval_split=d.get("eval_split") or "test")


def sampling_settings(s: ml_collections.ConfigDict) -> SamplingSettings:
    """The sampler of a config's `sampling` block and its keyword arguments.

    `steps` = 0 keeps each sampler's default (pc: sde.N; ddim 50, dpm_solver 20, edm 18; the
    adaptive ODE solver takes no step count). `noise_removal` is each sampler's `denoise`.
    Config strings "none" / "" mean no predictor / corrector (score_sde's convention).
    """
    if s.method not in SAMPLERS:
        raise ValueError(f"Unknown sampler {s.method!r}: config.sampling.method must be one of "
                         f"{sorted(SAMPLERS)}.")
    kwargs = dict(eps=s.eps, denoise=s.noise_removal)
    for key in SAMPLER_KEYS[s.method]:
        if key == "steps":
            if s.steps and s.method != "pc":
                kwargs["steps"] = s.steps
        elif key in ("predictor", "corrector"):
            kwargs[key] = None if s[key] in _NONE_NAMES else s[key]
        else:
            kwargs[{"n_steps_each": "n_corrector_steps", "ode_solver": "method"}.get(key, key)] = (
                s[key])
    guide = GuideSettings(s.labels, s.guidance, float(s.guidance_weight), s.classifier_workdir,
                          s.task, s.task_input, s.mask, int(s.sr_factor))
    return SamplingSettings(s.method, tuple(sorted(kwargs.items())),
                            s.steps if s.method == "pc" else 0, s.batch_size, s.num_samples, guide)


def _eval_settings(config: ml_collections.ConfigDict) -> EvalSettings:
    e, d = config.eval, config.data
    stored = d.train_split if e.fid_ref_split == "train" else d.eval_split
    crop = f"_crop{d.crop_size}" if d.crop_size else ""
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{d.dataset}_{stored}{crop}")
    return EvalSettings(
        e.batch_size, e.num_batches, e.enable_bpd, e.bpd_num_batches, e.bpd_num_repeats,
        e.bpd_divergence, e.likelihood_eps, e.likelihood_rtol, e.likelihood_atol, e.enable_fid,
        e.fid_num_samples, e.fid_batch_size, e.fid_ref_split, e.fid_ref_max_examples, tag,
        e.fid_stats_dir, e.inception_weights, e.kid_subsets, e.kid_subset_size, e.is_splits)


# --------------------------------------------------------------------------- checks


def check_config(config: ml_collections.ConfigDict) -> list[str]:
    """Raises one ValueError listing every problem of `config` (see the module docstring).

    Returns notes on sampler settings that the chosen sampler ignores (e.g. a paper config's PC
    corrector when sampling with --config.sampling.method=dpm_solver): not errors, since the
    command line cannot delete a config's keys, but `build` prints them.
    """
    problems, notes = _unknown_and_unused_keys(config)
    problems += _value_problems(config)
    if problems:
        raise ValueError("Invalid config:\n  " + "\n  ".join(problems))
    return notes


def _unknown_and_unused_keys(config) -> tuple[list[str], list[str]]:
    base = defaults.get_default_config()
    problems = [f"unknown config section {k!r}: the sections are {sorted(base)}"
                for k in config if k not in base]
    notes = []
    for section in ("data", "training", "optim", "eval"):
        if section in config:
            problems += _check_section(config, base, section, used=None, owner="")[0]
    if "model" in config and config.model.name in models.NETWORKS:
        net = models.NETWORKS[config.model.name]
        problems += sum(_check_section(
            config, base, "model", used=models.network_fields(net) | set(models.SHARED_KEYS),
            owner=f"network {config.model.name!r} ({net.__name__})"), [])
    if "sde" in config and config.sde.name in sde_lib.SDES:
        problems += sum(_check_section(config, base, "sde",
                                       used=sde_lib.sde_fields(config.sde.name) | {"name"},
                                       owner=f"SDE {config.sde.name!r}"), [])
    if "sampling" in config and config.sampling.method in SAMPLER_KEYS:
        unknown, unused = _check_section(
            config, base, "sampling", used={*SAMPLER_KEYS[config.sampling.method],
                                            *_SAMPLING_SHARED},
            owner=f"sampler {config.sampling.method!r}",
            listed=set(SAMPLER_KEYS[config.sampling.method]))
        problems += unknown
        notes += unused
    if "training" in config and config.training.get("loss", "dsm") in losses.LOSSES:
        loss = config.training.get("loss", "dsm")
        if loss == "dsm" and not config.training.get("continuous", True):
            loss = "ddpm / smld"
        unused = set().union(*_LOSS_KEYS.values()) - set(_LOSS_KEYS[loss])
        owner = {"dsm": "the DSM loss", "ddpm / smld": "the DDPM / SMLD (training.continuous="
                 "False) loss"}.get(loss, f"the {loss} loss (training.loss={loss!r})")
        problems += _check_section(config, base, "training", used=set(base.training) - unused,
                                   owner=owner)[1]
        model = config.get("model", {})
        edm = "edm" in (loss, model.get("parameterization"))
        sigma_data = config.get("data", {}).get("sigma_data", base.data.sigma_data)
        if not edm and _differs(sigma_data, base.data.sigma_data):
            problems.append(f"data.sigma_data={sigma_data!r} is set but used only by the 'edm' "
                            f"parameterization and loss, neither of which is chosen")
        noise_input = model.get("noise_input", base.model.noise_input)
        if model.get("parameterization") == "edm" and _differs(noise_input,
                                                               base.model.noise_input):
            problems.append(f"model.noise_input={noise_input!r} is set but the 'edm' "
                            f"parameterization conditions the network on ln(sigma / alpha) / 4 "
                            f"itself: leave model.noise_input at its default")
    return problems, notes


def _check_section(config, base, section: str, used: set[str] | None, owner: str,
                   listed: set[str] | None = None) -> tuple[list[str], list[str]]:
    """(unknown, unused): keys of config[section] unknown to the defaults and to `used`; and,
    when `used` is given, keys whose value differs from the default but are not in `used`
    (the message lists `listed`, default `used`, as what the owner reads)."""
    got, default = config[section], base[section]
    known = set(default) | (used or set())
    unknown, unused = [], []
    for k in got:
        if k not in known:
            takes = f"; {owner} takes {sorted(used - set(default))}" if used is not None else ""
            unknown.append(f"unknown key {section}.{k}{takes}; the shared keys are "
                           f"{sorted(default)} (diffusion/defaults.py)")
        elif used is not None and k not in used and _differs(got[k], default[k]):
            reads = sorted((used if listed is None else listed) & known)
            unused.append(f"{section}.{k}={got[k]!r} is set but not used by {owner}, which "
                          f"reads {reads}" + (" and the shared keys" if listed is not None
                                              else ""))
    return unknown, unused


def _differs(value, default) -> bool:
    normalize = lambda v: tuple(v) if isinstance(v, list | tuple) else v
    return normalize(value) != normalize(default)


def _value_problems(config) -> list[str]:
    t = config.training
    n_jit = t.n_jitted_steps
    problems = []
    if n_jit < 1:
        problems.append(f"training.n_jitted_steps must be >= 1, got {n_jit}")
    else:
        for name in ("log_freq", "snapshot_freq", "eval_freq"):
            if t[name] % n_jit:
                problems.append(f"training.{name}={t[name]} must be a multiple of "
                                f"training.n_jitted_steps={n_jit}")
        if t.n_iters % n_jit:
            below, above = t.n_iters - t.n_iters % n_jit, t.n_iters - t.n_iters % n_jit + n_jit
            problems.append(f"training.n_iters={t.n_iters} is not reachable in calls of "
                            f"training.n_jitted_steps={n_jit} steps (the loop would stop at "
                            f"{above}): use n_iters={below} or {above}, or n_jitted_steps=1")
    positive = [("training.batch_size", t.batch_size), ("training.n_iters", t.n_iters),
                ("sde.N", config.sde.N), ("sampling.batch_size", config.sampling.batch_size),
                ("sampling.num_samples", config.sampling.num_samples),
                ("eval.batch_size", config.eval.batch_size)]
    problems += [f"{name} must be >= 1, got {value}" for name, value in positive if value < 1]
    non_negative = [("sampling.steps", config.sampling.steps), ("training.log_freq", t.log_freq),
                    ("training.snapshot_freq", t.snapshot_freq),
                    ("training.eval_freq", t.eval_freq)]
    problems += [f"{name} must be >= 0, got {value}" for name, value in non_negative if value < 0]
    if problems:
        return problems        # the checks below divide by these
    n_dev = jax.device_count()
    if t.batch_size % n_dev:
        problems.append(f"training.batch_size={t.batch_size} must be divisible by the number of "
                        f"devices ({n_dev})")
    if config.sampling.batch_size % n_dev:
        problems.append(f"sampling.batch_size={config.sampling.batch_size} must be divisible by "
                        f"the number of devices ({n_dev})")
    if config.eval.batch_size % n_dev:
        problems.append(f"eval.batch_size={config.eval.batch_size} must be divisible by the "
                        f"number of devices ({n_dev})")
    if t.get("unroll", "auto") not in UNROLL_CHOICES:   # absent from older config.json
        problems.append(f"training.unroll must be one of {list(UNROLL_CHOICES)}, got "
                        f"{t.unroll!r}")
    if t.compute_dtype not in parameterization.COMPUTE_DTYPES:
        problems.append(f"training.compute_dtype must be one of "
                        f"{list(parameterization.COMPUTE_DTYPES)}, got {t.compute_dtype!r}")
    e = config.eval
    if e.fid_ref_split not in data_lib.SPLITS:
        problems.append(f"eval.fid_ref_split must be one of {data_lib.SPLITS}, got "
                        f"{e.fid_ref_split!r}")
    if e.fid_num_samples < 2 or e.fid_batch_size < 1:
        problems.append(f"eval.fid_num_samples must be >= 2 and eval.fid_batch_size >= 1, got "
                        f"{e.fid_num_samples} and {e.fid_batch_size}")
    if not 0.0 <= config.model.ema_rate < 1.0:
        problems.append(f"model.ema_rate must be in [0, 1), got {config.model.ema_rate}")
    return problems + _name_problems(config)


def _name_problems(config) -> list[str]:
    """Names the sampler and the likelihood look up only when they run (a snapshot or an
    evaluation, after training has started): checked here, before anything is written."""
    s, problems = config.sampling, []
    choices = []
    if s.method == "pc":
        choices += [("sampling.predictor", s.predictor, sorted(PREDICTORS)),
                    ("sampling.corrector", s.corrector, sorted(CORRECTORS)),
                    ("sampling.corrector_norm", s.corrector_norm, list(pc.CORRECTOR_NORMS))]
    if s.method == "ode":
        choices += [("sampling.ode_solver", s.ode_solver, sorted(ode.SOLVERS)),
                    ("sampling.denoiser", s.denoiser, list(ode.DENOISERS))]
    choices.append(("eval.bpd_divergence", config.eval.bpd_divergence,
                    list(likelihood.DIVERGENCES)))
    choices.append(("training.loss", config.training.loss, list(losses.LOSSES)))
    if config.training.loss == "flow_matching":
        choices.append(("training.t_sampling", config.training.t_sampling,
                        list(losses.T_SAMPLINGS)))
    if config.model.name == "mlp":   # checked by the network only when it is first run
        choices += [("model.embed_at", config.model.get("embed_at", mlp.MLP.embed_at),
                     list(mlp.EMBED_AT)),
                    ("model.activation", config.model.get("activation", mlp.MLP.activation),
                     sorted(mlp.ACTIVATIONS))]
    for key, value, valid in choices:
        optional = key in ("sampling.predictor", "sampling.corrector")
        if optional and value in _NONE_NAMES:
            continue
        if value not in valid:
            problems.append(f"{key}={value!r} is not one of {valid}"
                            + (" (or 'none')" if optional else ""))
    if (s.method == "ode" and s.noise_removal and s.denoiser == "reverse_diffusion"
            and config.sde.name == "vpsde" and config.sde.N <= config.sde.beta_max):
        problems.append(f"sampling.denoiser='reverse_diffusion' (the ode sampler's noise removal) "
                        f"takes a step of the DDPM chain of sde.N={config.sde.N} levels, which "
                        f"needs sde.N > sde.beta_max={config.sde.beta_max}: raise sde.N, or set "
                        f"sampling.denoiser='tweedie'")
    if (s.method == "pc" and s.predictor in _NONE_NAMES and s.corrector in _NONE_NAMES):
        problems.append("sampling.predictor and sampling.corrector are both 'none': the PC "
                        "sampler needs at least one")
    return problems + guidance_problems(config)
