"""Every check of a config, in one place: `check_config(config)` raises one ValueError listing
every problem, so a run never silently trains something other than its config says.

Refused: a key that is neither a shared default (`diffusion/defaults.py`) nor taken by the chosen
network or SDE (a misspelt field); a value changed from its default that the chosen network,
SDE or loss does not use; values and combinations the loops cannot run with (checked here, before
anything is written, also for names looked up only when a snapshot or an evaluation runs). A
changed sampler setting that the chosen sampler ignores is only a note: paper configs set the PC
sampler's, and the command line can switch the sampler but not delete keys.
`experiment.build` runs it first.
"""

from __future__ import annotations

import sys

import jax
import ml_collections

from diffusion import chain as chain_lib
from diffusion import data as data_lib
from diffusion import defaults, likelihood, losses, models
from diffusion import sde as sde_lib
from diffusion.guidance import TASKS
from diffusion.guide_settings import GUIDANCE, MASKS, parse_labels
from diffusion.models import mlp, parameterization
from diffusion.sampling import CORRECTORS, PREDICTORS, ode, pc

# What each sampler reads from config.sampling besides the keys every sampler reads.
SAMPLER_KEYS = {
    "pc": ("steps", "predictor", "corrector", "snr", "n_steps_each", "corrector_norm"),
    "ode": ("rtol", "atol", "ode_solver", "denoiser"),
    "ddim": ("steps", "eta"),
    "dpm_solver": ("steps", "order"),
    "edm": ("steps", "rho", "s_churn"),
    "ddpm": ("steps", "spacing", "variance"),
    "consistency": ("times",),
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
    "hybrid": ("reduce_mean", "vlb_weight"),
    "vlb": ("reduce_mean", "importance_sampling"),
    "consistency_training": ("eps", "ct_s0", "ct_s1", "ct_p_mean", "ct_p_std"),
    "consistency_distillation": ("eps", "teacher_workdir", "target_ema", "cd_levels",
                                 "cd_solver", "cd_distance"),
}
# training.unroll: how the n_jitted_steps optimizer steps of one call are traced (train.py).
UNROLL_CHOICES = ("auto", "unroll", "scan")
# Config strings that mean no predictor / corrector (score_sde's convention).
NONE_NAMES = (None, "", "none", "None")


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
        edm = "edm" in (loss, model.get("parameterization")) or model.get(
            "parameterization") == "consistency"
        sigma_data = config.get("data", {}).get("sigma_data", base.data.sigma_data)
        if not edm and _differs(sigma_data, base.data.sigma_data):
            problems.append(f"data.sigma_data={sigma_data!r} is set but used only by the 'edm' "
                            f"parameterization and loss, neither of which is chosen")
        noise_input = model.get("noise_input", base.model.noise_input)
        parameterization = model.get("parameterization")
        if parameterization in ("edm", "consistency") and _differs(noise_input,
                                                                   base.model.noise_input):
            problems.append(f"model.noise_input={noise_input!r} is set but the "
                            f"{parameterization!r} parameterization conditions the network on "
                            f"ln(sigma / alpha) / 4 itself: leave model.noise_input at its "
                            f"default")
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
    if config.optim.get("optimizer", "adam") not in ("adam", "radam"):
        problems.append(f"optim.optimizer must be 'adam' or 'radam', got "
                        f"{config.optim.optimizer!r}")
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
        if optional and value in NONE_NAMES:
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
    if (s.method == "pc" and s.predictor in NONE_NAMES and s.corrector in NONE_NAMES):
        problems.append("sampling.predictor and sampling.corrector are both 'none': the PC "
                        "sampler needs at least one")
    return (problems + guidance_problems(config) + chain_problems(config)
            + consistency_problems(config))


def consistency_problems(config) -> list[str]:
    """The problems of a consistency model's config (`diffusion.consistency_losses`)."""
    t, m = config.training, config.model
    problems = []
    if t.loss.startswith("consistency") and m.parameterization != "consistency":
        problems.append(f"training.loss={t.loss!r} trains a consistency function: set "
                        f"model.parameterization='consistency'")
    if t.loss == "consistency_distillation" and not t.teacher_workdir:
        problems.append("training.loss='consistency_distillation' needs "
                        "training.teacher_workdir, the workdir of a trained diffusion model")
    if t.loss == "consistency_distillation":
        from diffusion.consistency_losses import CD_DISTANCES, CD_SOLVERS

        if t.cd_solver not in CD_SOLVERS or t.cd_distance not in CD_DISTANCES:
            problems.append(f"training.cd_solver must be one of {list(CD_SOLVERS)} and "
                            f"training.cd_distance one of {list(CD_DISTANCES)}")
        if not 0.0 <= t.target_ema < 1.0 or t.cd_levels < 2:
            problems.append(f"training.target_ema must be in [0, 1) and training.cd_levels >= 2, "
                            f"got {t.target_ema} and {t.cd_levels}")
    return problems


def parse_times(text: str) -> tuple[float, ...] | None:
    """sampling.times: "" (None: the sampler's default) or comma-separated times, e.g. "1,0.5"."""
    if not str(text).strip():
        return None
    try:
        return tuple(float(t) for t in str(text).split(","))
    except ValueError:
        raise ValueError(f"sampling.times={text!r} must be comma-separated numbers, e.g. "
                         f"'1.0,0.5', or '' for the default (one step from T).") from None


def chain_problems(config) -> list[str]:
    """The problems of what runs on the SDE's discrete chain (`diffusion.chain`): learned
    variances, the hybrid / vlb losses and the DDPM sampler."""
    s, m, t = config.sampling, config.model, config.training
    problems = []
    chain = config.sde.name in ("vpsde", "cosine_vpsde", "vesde")
    learned = m.get("learn_variance", False)
    if learned and (t.continuous or not chain):
        problems.append("model.learn_variance=True learns the reverse kernel of the discrete "
                        "chain: it needs training.continuous=False and sde.name 'vpsde', "
                        "'cosine_vpsde' or 'vesde'")
    elif learned and t.loss not in ("hybrid", "vlb"):
        problems.append(f"model.learn_variance=True is trained by training.loss 'hybrid' or "
                        f"'vlb' (training.loss={t.loss!r} would leave the variance untrained)")
    if t.loss in ("hybrid", "vlb") and not learned:
        problems.append(f"training.loss={t.loss!r} trains a learned variance: set "
                        f"model.learn_variance=True (DDPM's L_simple is training.loss='dsm' "
                        f"with training.continuous=False)")
    if s.method == "consistency":
        try:
            times = parse_times(s.times)
        except ValueError as e:
            problems.append(str(e))
        else:
            end = config.sde.get("T", 1.0) if config.sde.name == "rectified_flow" else 1.0
            if times and (abs(times[0] - end) > 1e-6 or any(
                    not 0.0 < b < a for a, b in zip(times, times[1:], strict=False))):
                problems.append(f"sampling.times={s.times!r} must start at T = {end} and "
                                f"decrease strictly above 0")
    if s.method == "ddpm":
        if not chain:
            problems.append(f"sampling.method='ddpm' steps along a DDPM / SMLD chain; SDE "
                            f"{config.sde.name!r} has none (use 'vpsde', 'cosine_vpsde', "
                            f"'vesde', or another sampler)")
        elif config.training.continuous:
            problems.append("sampling.method='ddpm' samples a discrete-time model's chain "
                            "(training.continuous=False; its level 0 is at t = 0, where a "
                            "continuous model's score is infinite); for a continuous model use "
                            "sampling.method='pc' with sampling.predictor='ancestral', or "
                            "another sampler")
        if s.spacing not in chain_lib.SPACINGS:
            problems.append(f"sampling.spacing={s.spacing!r} is not one of "
                            f"{list(chain_lib.SPACINGS)}")
        if s.variance not in chain_lib.FIXED_VARIANCES:
            problems.append(f"sampling.variance={s.variance!r} is not one of "
                            f"{list(chain_lib.FIXED_VARIANCES)}")
        if s.steps == 1 or s.steps > config.sde.N:
            problems.append(f"sampling.steps={s.steps} of the DDPM sampler must be 0 (all "
                            f"sde.N={config.sde.N} levels) or 2 .. sde.N")
    return problems


def guidance_problems(config) -> list[str]:
    """The problems of a config's labels, guidance and task settings (empty when it is fine)."""
    s, m, d = config.sampling, config.model, config.data
    num_classes = m.get("num_classes")
    problems = []
    if m.name == "classifier":
        if num_classes is None:
            problems.append("model.name='classifier' needs model.num_classes")
        if config.training.snapshot_sampling:
            problems.append("a classifier has nothing to sample: set "
                            "training.snapshot_sampling=False")
    if not 0.0 <= m.label_dropout < 1.0:
        problems.append(f"model.label_dropout must be in [0, 1), got {m.label_dropout}")
    elif m.label_dropout > 0 and num_classes is None:
        problems.append("model.label_dropout > 0 drops labels of a class-conditional model: set "
                        "model.num_classes too")
    if s.guidance not in GUIDANCE:
        problems.append(f"sampling.guidance={s.guidance!r} is not one of {list(GUIDANCE)}")
    elif s.guidance == "cfg" and num_classes is None:
        problems.append("sampling.guidance='cfg' needs a class-conditional model trained with "
                        "label dropout (model.num_classes, model.label_dropout > 0)")
    elif s.guidance == "classifier" and not s.classifier_workdir:
        problems.append("sampling.guidance='classifier' needs sampling.classifier_workdir, the "
                        "workdir of a trained noise-conditional classifier (e.g. "
                        "experiments/digits_classifier.py)")
    if s.guidance_weight < 0:
        problems.append(f"sampling.guidance_weight must be >= 0, got {s.guidance_weight}")
    if s.labels and num_classes is None and s.guidance != "classifier":
        problems.append(f"sampling.labels={s.labels!r} needs a class-conditional model "
                        f"(model.num_classes) or sampling.guidance='classifier'")
    elif s.labels and s.labels != "all":   # "all" is every class, whatever their number
        try:   # a classifier-guided unconditional model: the range is the data's, checked later
            parse_labels(s.labels, num_classes or sys.maxsize)
        except ValueError as e:
            problems.append(str(e))
    if s.task not in ("none", *TASKS):
        problems.append(f"sampling.task={s.task!r} is not one of {['none', *TASKS]}")
    elif s.task == "colorize" and d.num_channels != 3:
        problems.append(f"sampling.task='colorize' needs colour images (data.num_channels=3), "
                        f"got {d.num_channels} channel(s)")
    elif s.task == "super_resolve" and (s.sr_factor < 2 or d.image_size % s.sr_factor):
        problems.append(f"sampling.sr_factor={s.sr_factor} must be >= 2 and divide "
                        f"data.image_size={d.image_size}")
    if s.task == "inpaint" and s.mask not in MASKS:
        problems.append(f"sampling.mask={s.mask!r} is not one of {list(MASKS)}")
    return problems
