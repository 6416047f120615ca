"""The one reader of the config: a config becomes an `Experiment` of plain objects.

    exp = build(config)            # checks the config, then builds everything below
    exp.sde, exp.score_model, exp.loss_fn, exp.tx, exp.dataset       # the model and its data
    exp.train, exp.sampling, exp.eval, exp.data                       # plain settings objects
    exp.key("sample")                                                 # a PRNG key per purpose

Training (`train.py`), evaluation (`evaluate.py`) and sampling (`generate.py`) take an
`Experiment` and never read the config themselves; neither does any module below them (the
networks, SDEs, losses and datasets take plain arguments). `build` first runs
`config_checks.check_config`, which refuses, with one message listing every problem, a config
that would silently train something other than it says. `network_of`, `score_model_of`
and `dataset_args` unpack one part of a config for the conveniences `models.get_model(config)`,
`models.get_score_model(config)` and `data.get_dataset(config)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax

from diffusion import chain as chain_lib
from diffusion import data as data_lib
from diffusion import losses, models
from diffusion import sde as sde_lib
from diffusion.config_checks import NONE_NAMES, SAMPLER_KEYS, check_config, parse_times
from diffusion.guide_settings import GuideSettings
from diffusion.sampling import SAMPLERS
from diffusion.train_state import create_optimizer


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
    init_workdir: str = ""   # training.init_workdir: start from that run's EMA weights
    teacher_workdir: str = ""   # training.teacher_workdir: consistency distillation's teacher


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
    enable_vlb: bool
    vlb_variance: str          # a fixed-variance model's Sigma in vlb_bpd (sampling.variance)
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
    # The classifier experiment of sampling.classifier_workdir (classifier guidance), else None.
    classifier: Experiment | None = None
    # The teacher experiment of training.teacher_workdir (consistency distillation), else None.
    teacher: Experiment | None = None
    # What is made once per experiment and reused: jitted samplers and eval functions, the
    # abstract train state, the classifier's restored parameters. Periodic sampling / evaluation
    # then compile once and the network is traced once.
    cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

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


def build(config: ml_collections.ConfigDict, *, shape_only_data: bool = False,
          for_sampling: bool = False) -> Experiment:
    """Checks `config` (`config_checks.check_config`) and builds SDE, network, score model, loss,
    optimizer, dataset and the settings of training, sampling and evaluation.

    shape_only_data: only the data's shape is needed, so a tfds dataset or an image folder is not
    opened (`data.load_dataset(..., shape_only=True)`). for_sampling: the same, unless the
    sampling task reads the eval split (sampling.task_input="eval").
    """
    for note in check_config(config):
        print(f"note: {note}", flush=True)
    t, m, d = config.training, config.model, config.data
    teacher = None
    if t.loss == "consistency_distillation":
        teacher = workdir_experiment(t.teacher_workdir, "training.teacher_workdir",
                                     "a diffusion model (e.g. experiments/digits.py)")
    sampling = sampling_settings(config.sampling)
    task_reads_data = sampling.guide.task != "none" and sampling.guide.task_input == "eval"
    shape_only = shape_only_data or (for_sampling and not task_reads_data)
    dataset = data_lib.load_dataset(**dataset_args(config), shape_only=shape_only)
    if m.name == "classifier":
        score_model, net, sde = None, network_of(config), sde_lib.get_sde(**config.sde)
        loss_fn = losses.make_classifier_loss(sde, net, eps=t.eps)
    else:
        score_model = score_model_of(config)
        net, sde = score_model.net, score_model.sde
        # Mixed precision is for training: sampling and likelihoods use the float32 network.
        loss_fn = losses.get_loss_fn(
            sde, dataclasses.replace(score_model, compute_dtype=t.compute_dtype),
            loss=t.loss, continuous=t.continuous, reduce_mean=t.reduce_mean,
            likelihood_weighting=t.likelihood_weighting, eps=t.eps, t_sampling=t.t_sampling,
            logit_mean=t.logit_mean, logit_std=t.logit_std, p_mean=t.p_mean, p_std=t.p_std,
            sigma_data=d.sigma_data, decoder=decoder_of(dataset, d.centered),
            vlb_weight=t.get("vlb_weight", 0.001),
            importance_sampling=t.get("importance_sampling", True),
            **({"total_steps": t.n_iters, "ct_s0": t.ct_s0, "ct_s1": t.ct_s1,
                "ct_p_mean": t.ct_p_mean, "ct_p_std": t.ct_p_std}
               if t.loss == "consistency_training" else {}),
            **({"teacher_model": teacher.score_model, "cd_levels": t.cd_levels,
                "cd_solver": t.cd_solver, "cd_distance": t.cd_distance,
                "target_ema": t.target_ema} if teacher is not None else {}))
    if score_model is not None and m.get("num_classes") is not None:
        loss_fn = losses.with_label_dropout(loss_fn, m.label_dropout, m.num_classes)
    o = config.optim
    tx = create_optimizer(o.lr, o.warmup, o.grad_clip, o.beta1, o.beta2, o.eps, o.weight_decay,
                          o.get("optimizer", "adam"))
    if m.get("num_classes") is not None and (dataset.num_classes or 1) > m.num_classes:
        raise ValueError(f"Dataset {d.dataset!r} has labels 0..{dataset.num_classes - 1}, but "
                         f"model.num_classes={m.num_classes}: labels out of range would share "
                         f"embeddings. Set model.num_classes={dataset.num_classes}.")
    classifier = None
    if sampling.guide.guidance == "classifier" and (for_sampling or t.snapshot_sampling):
        classifier = classifier_experiment(sampling.guide.classifier_workdir)
    description = (f"model {m.name}{' (remat)' if m.get('remat') else ''}, {t.compute_dtype} "
                   f"compute; SDE {config.sde.name}; data {d.dataset} {dataset.data_shape}")
    return Experiment(
        sde=sde, net=net, score_model=score_model, loss_fn=loss_fn, tx=tx,
        dataset=dataset, num_classes=m.get("num_classes"), seed=config.seed,
        data=DataSettings(d.centered, d.uniform_dequantization, d.random_flip,
                          d.num_workers),
        train=TrainSettings(t.batch_size, t.n_iters, t.snapshot_freq, t.log_freq, t.eval_freq,
                            t.n_jitted_steps, t.snapshot_sampling, t.keep_checkpoints,
                            m.ema_rate, m.ema_warmup, t.get("unroll", "auto"),
                            t.get("init_workdir", ""), t.get("teacher_workdir", "")),
        sampling=sampling, eval=_eval_settings(config), classifier=classifier, teacher=teacher,
        description=description, config_json=config.to_json_best_effort(indent=2))


def decoder_of(dataset: data_lib.Dataset, centered: bool) -> chain_lib.Decoder:
    """The variational bound's decoder for a dataset: discretized on its pixel levels (in
    [-1, 1], or [0, 1] when not centered), the Gaussian density for points."""
    if not dataset.is_image:
        return chain_lib.Decoder()
    return chain_lib.Decoder(dataset.num_levels, -1.0 if centered else 0.0, 1.0)


def workdir_experiment(workdir: str, key: str, what: str) -> Experiment:
    """The experiment of the run in `workdir`, from its config.json (the config key that names
    it and what to train there, for the message when it has none)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{key}={workdir} has no config.json: train {what} there first.")
    with open(path) as f:
        return build(ml_collections.ConfigDict(json.load(f)), shape_only_data=True)


def classifier_experiment(workdir: str) -> Experiment:
    """The experiment of the classifier trained in `workdir` (its config.json), for classifier
    guidance; its parameters are restored by the sampler (`generate.load_classifier`)."""
    exp = workdir_experiment(workdir, "sampling.classifier_workdir",
                             "a classifier (experiments/digits_classifier.py)")
    if not exp.is_classifier:
        raise ValueError(f"sampling.classifier_workdir={workdir} holds a {exp.description} "
                         f"run, not a classifier (model.name='classifier').")
    return exp


def network_of(config: ml_collections.ConfigDict) -> nn.Module:
    """The network of a config's `model` block (`models.build_network`)."""
    return models.build_network(config.model.name, config.model.to_dict())


def score_model_of(config: ml_collections.ConfigDict) -> models.ScoreModel:
    """The score model of a config: its network with the SDE, parameterisation, noise
    conditioning and network input (`models.make_score_model`). Images in [0, 1]
    (data.centered=False) are fed to the network as 2 x - 1, as score_sde's networks are."""
    m = config.model
    return models.make_score_model(
        network_of(config), sde_lib.get_sde(**config.sde), m.parameterization, m.noise_input,
        m.scale_input, scale_by_sigma=m.get("scale_by_sigma", False),
        center_input=not config.data.centered, continuous=config.training.continuous,
        sigma_data=config.data.get("sigma_data", 0.5),
        learn_variance=m.get("learn_variance", False), boundary_time=config.training.eps)


def dataset_args(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`data.load_dataset`'s arguments from a config's `data` block."""
    d = config.data
    return dict(name=d.dataset, image_size=d.get("image_size"), num_channels=d.get("num_channels"),
                crop_size=d.get("crop_size"), data_dir=d.get("data_dir"), path=d.get("path"),
                train_split=d.get("train_split") or "train",
                eval_split=d.get("eval_split") or "test")


def sampling_settings(s: ml_collections.ConfigDict) -> SamplingSettings:
    """The sampler of a config's `sampling` block and its keyword arguments.

    `steps` = 0 keeps each sampler's default (pc, ddpm: sde.N; ddim 50, dpm_solver 20, edm 18; the
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
        elif key == "times":
            kwargs["times"] = parse_times(s.times)
        elif key in ("predictor", "corrector"):
            kwargs[key] = None if s[key] in NONE_NAMES else s[key]
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
        e.batch_size, e.num_batches, e.enable_bpd, e.get("enable_vlb", True),
        config.sampling.get("variance", "beta"), e.bpd_num_batches, e.bpd_num_repeats,
        e.bpd_divergence, e.likelihood_eps, e.likelihood_rtol, e.likelihood_atol, e.enable_fid,
        e.fid_num_samples, e.fid_batch_size, e.fid_ref_split, e.fid_ref_max_examples, tag,
        e.fid_stats_dir, e.inception_weights, e.kid_subsets, e.kid_subset_size, e.is_splits)
