"""Training throughput: the full pipeline of `train_and_evaluate` against a bare jitted loop.

    python benchmarks/train_throughput.py                       # the embedded default (digits)
    python benchmarks/train_throughput.py --config experiments/toy_2d.py --steps 2000

"full pipeline" is `train.train_and_evaluate` as a user runs it: the data pipeline (host batches,
prefetch thread, transfer to the devices), checkpoints every `snapshot_freq`, progress lines,
TensorBoard and jsonl logging; only the sample grids are off (sampling is not training). Its rate is
read from the wall-clock times it logs, after a warm-up that covers compilation. "bare loop" is the
same network, loss and optimizer in a jitted step on one fixed device-resident batch, with nothing
else. Prints a table; the full pipeline should reach >= 90% of the bare loop.
"""

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from diffusion import datasets, train  # noqa: E402


def load_config(path: str):
    path, _, variant = path.partition(":")
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant or None)


def full_pipeline(config, steps: int, warmup: int) -> float:
    """Steps/s of train_and_evaluate between the logs at step `warmup` and at the end."""
    config.training.n_iters = warmup + steps
    config.training.log_freq = warmup
    config.training.eval_freq = 0
    config.training.snapshot_sampling = False
    with tempfile.TemporaryDirectory() as workdir:
        train.train_and_evaluate(config, workdir)
        with open(os.path.join(workdir, "train.jsonl")) as f:
            records = [json.loads(line) for line in f]
    start = next(r for r in records if r["step"] == warmup)
    end = records[-1]
    return (end["step"] - start["step"]) / (end["time"] - start["time"])


def bare_loop(config, steps: int, warmup: int) -> float:
    """Steps/s of the jitted train step alone on one fixed, device-resident batch."""
    exp = train.build(config)
    mesh = train.data_mesh()
    state = train._init_state(exp, config, mesh)
    step_fn = train.make_train_step(exp.loss_fn, exp.tx, config.model.ema_rate, mesh)
    n_jit = config.training.n_jitted_steps
    host = datasets.batch_at(exp.dataset, "train", 0, config.training.batch_size, seed=0,
                             centered=config.data.centered)
    batch = train.put_batch({"x": np.stack([host["x"]] * n_jit)}, mesh)
    key = jax.random.key(0)
    for _ in range(warmup // n_jit):
        state, metrics = step_fn(state, batch, key)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps // n_jit):
        state, metrics = step_fn(state, batch, key)
    jax.block_until_ready(metrics)
    return (steps // n_jit) * n_jit / (time.perf_counter() - t0)


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(root, "experiments", "digits.py"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--warmup", type=int, default=100)
    args = parser.parse_args()
    config = load_config(args.config)
    n_jit = config.training.n_jitted_steps
    args.steps -= args.steps % n_jit
    args.warmup -= args.warmup % n_jit
    config.training.snapshot_freq = max(n_jit, (args.warmup + args.steps) // 3 // n_jit * n_jit)
    bs = config.training.batch_size
    bare = bare_loop(config, args.steps, args.warmup)
    full = full_pipeline(config, args.steps, args.warmup)
    device = jax.devices()[0]
    print(f"\n{os.path.basename(args.config)}: batch {bs}, {args.steps} timed steps after "
          f"{args.warmup} warm-up, n_jitted_steps {n_jit}, {jax.device_count()} x "
          f"{device.platform} ({device.device_kind}), {os.cpu_count()} CPU cores; full pipeline "
          f"checkpoints every {config.training.snapshot_freq} steps\n")
    print(f"| {'loop':<14} | {'steps/s':>8} | {'examples/s':>10} | {'vs bare':>7} |")
    print(f"|{'-' * 16}|{'-' * 10}|{'-' * 12}|{'-' * 9}|")
    for name, rate in (("bare loop", bare), ("full pipeline", full)):
        print(f"| {name:<14} | {rate:8.2f} | {rate * bs:10.0f} | {rate / bare:7.1%} |")


if __name__ == "__main__":
    main()
