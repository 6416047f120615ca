"""Controllable-generation settings (`config.sampling`): labels, guidance and the task.

`GuideSettings` is what `diffusion.generate` reads; `parse_labels` turns `sampling.labels` into the
labels to sample. `config_checks` checks these keys; the methods themselves are in
`diffusion.guidance`.
"""

from __future__ import annotations

import dataclasses


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
