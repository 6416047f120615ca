"""Entry point: train, evaluate or sample a score model described by a config file.

    python scripts/run.py --config experiments/digits.py --workdir runs/digits            # train
    python scripts/run.py --config experiments/digits.py --workdir runs/digits --mode sample
    python scripts/run.py --config experiments/digits.py --workdir runs/digits --mode eval
    python scripts/run.py --config experiments/vp_cifar.py:smoke --workdir /tmp/w \\
        --config.training.n_iters=10                                             # overrides

All logic lives in `diffusion` (train.py, evaluate.py, generate.py); this file parses flags
and makes one call per mode.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_DEFAULT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "experiments", "digits.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT, "Experiment config file (path[:variant]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.",
                               required=True)
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to run.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-process run: call jax.distributed.initialize(), which finds the "
    "coordinator, process count and id itself on TPU pods and under SLURM; elsewhere pass the "
    "three flags below (each implies --distributed).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, reachable from every process.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..n-1.")
_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "diffusion-jax"),
    "Persistent XLA compilation cache: a second run (or --mode sample after training) reuses "
    "the compiled programs. Empty disables it.")
_CACHE_MIN_SECS = flags.DEFINE_float(
    "compilation_cache_min_secs", 0.5, "Only programs that took longer to compile are cached.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import jax

    from diffusion import checkpointing, parallel, train

    # Errors that mean "fix the config, data or workdir" and say how; a bug keeps its traceback.
    user_errors = (ValueError, FileNotFoundError, PermissionError, FloatingPointError,
                   checkpointing.CheckpointError)

    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO level
        logging.set_verbosity(logging.WARNING)
    if _CACHE.value:
        jax.config.update("jax_compilation_cache_dir", _CACHE.value)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", _CACHE_MIN_SECS.value)
    explicit = dict(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                    process_id=_PROCESS_ID.value)
    if _DISTRIBUTED.value or any(v is not None for v in explicit.values()):
        # CPU processes exchange gradients through gloo (GPUs use NCCL, TPUs their ICI).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**{k: v for k, v in explicit.items() if v is not None})
        parallel.connect_processes()
    logging.info("process %d/%d, devices: %s", jax.process_index(), jax.process_count(),
                 jax.devices())
    run = {"train": train.train_and_evaluate, "eval": train.evaluate, "sample": train.sample}
    try:
        run[_MODE.value](_CONFIG.value, _WORKDIR.value)
    except user_errors as e:
        if os.environ.get("DIFFUSION_TRACEBACK"):
            raise
        # One clear message instead of a deep traceback; DIFFUSION_TRACEBACK=1 shows it.
        sys.exit(f"Error ({type(e).__name__}): {e}\n(DIFFUSION_TRACEBACK=1 shows the traceback)")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, except that an override of a key the config does not have is one
    line of explanation, not a traceback from inside ml_collections."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        detail = e
        while isinstance(detail, BaseException) and detail.args:   # KeyError inside AttributeError
            detail = detail.args[0]
        detail = " ".join(str(detail).split())
        bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        sys.exit(f"Error: a --config.* override names a key the config does not have "
                 f"({detail}; overrides given: {', '.join(bad)}). Overrides can change keys, not "
                 f"add them: check the spelling against diffusion/defaults.py and the network's "
                 f"fields.")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
