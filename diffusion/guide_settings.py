"""Controllable-generation settings (`config.sampling`): labels, guidance and the task.

`GuideSettings` is what `diffusion.generate` reads; `guidance_problems` is the part of
`experiment.check_config` that checks these keys; `parse_labels` turns `sampling.labels` into the
labels to sample. The methods themselves are in `diffusion.guidance`.
"""

from __future__ import annotations

import dataclasses
import sys

from diffusion.guidance import TASKS


@dataclasses.dataclass(frozen=True)
class GuideSettings:
    """Controllable generation (`diffusion.guidance`): labels, guidance and the task."""

    labels: str = ""
    guidance: str = "none"
    weight: float = 0.0
    classifier_workdir: str = ""
    task: str = "none"
    task_input: str = "eval"
    mask: str = "right_half"
    sr_factor: int = 2

    @property
    def tag(self) -> str:
        """The sample files' name prefix: '' for plain samples, else e.g. 'cfg_w3_' or
        'inpaint_'."""
        parts = []
        if self.guidance == "cfg":
            parts.append(f"cfg_w{self.weight:g}")
        elif self.guidance == "classifier":
            parts.append(f"classifier_s{self.weight:g}")
        if self.task == "super_resolve":
            parts.append(f"super_resolve_x{self.sr_factor}")
        elif self.task != "none":
            parts.append(self.task)
        return "".join(p + "_" for p in parts)


GUIDANCE = ("none", "cfg", "classifier")
MASKS = ("right_half", "bottom_half", "center", "random")


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


def parse_labels(text: str, num_classes: int) -> list[int] | None:
    """sampling.labels -> the labels to cycle through: "3,3,7" -> [3, 3, 7], "all" -> 0..K-1,
    "" -> None (uniformly random)."""
    if not text:
        return None
    if text == "all":
        return list(range(num_classes))
    try:
        labels = [int(v) for v in str(text).split(",")]
    except ValueError:
        raise ValueError(f"sampling.labels={text!r} must be 'all' or comma-separated class "
                         f"numbers such as '3,3,7'") from None
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"sampling.labels has {bad}, outside the classes 0..{num_classes - 1}")
    return labels
