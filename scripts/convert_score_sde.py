"""Turns a score_sde checkpoint (Song et al. 2021's released models) into a checkpoint here.

    python scripts/convert_score_sde.py --config experiments/ve_cifar.py \\
        --checkpoint exp/ve/cifar10_ncsnpp_continuous/checkpoint_24 --workdir runs/ve_cifar_sde
    python scripts/run.py --config experiments/ve_cifar.py --workdir runs/ve_cifar_sde --mode sample

The config must describe the checkpoint's model (its score_sde config file: ve_cifar.py for
`ve/cifar10_ncsnpp_continuous`, `ve_cifar.py:deep` for the deep one, vp_cifar.py / subvp_cifar.py
and their `:deep` for DDPM++). The workdir must not hold a checkpoint yet. All logic lives in
`diffusion.compat.score_sde`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "This codebase's config of the checkpoint's model (path[:variant]).",
    lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "score_sde's checkpoint_<N> file.",
                                  required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "New workdir to write the checkpoint into.",
                               required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required (e.g. experiments/ve_cifar.py).")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO level
        logging.set_verbosity(logging.WARNING)
    from diffusion.compat import score_sde

    config, workdir = _CONFIG.value, _WORKDIR.value
    try:
        state_dict = score_sde.load_state_dict(_CHECKPOINT.value)
        step = score_sde.write_checkpoint(state_dict, config, workdir)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        if os.environ.get("DIFFUSION_TRACEBACK"):
            raise
        sys.exit(f"Error ({type(e).__name__}): {e}")
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    print(f"converted {_CHECKPOINT.value} (score_sde step {step}) into "
          f"{os.path.join(workdir, 'checkpoints')}; sample from it with\n"
          f"  python scripts/run.py --config <the same config> --workdir {workdir} --mode sample")


if __name__ == "__main__":
    app.run(main)
