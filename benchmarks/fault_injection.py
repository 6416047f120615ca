"""kill -9 at random moments, then resume: does a run survive any crash?

Each trial starts the toy config (`experiments/toy_2d.py:smoke`, lengthened to --steps steps with
a checkpoint every --save_every steps) in a fresh workdir through `scripts/run.py`, kills it
with SIGKILL after a random delay (during compilation, a step, a log line or an async checkpoint
save), then runs the same command again, which must resume from the newest readable checkpoint
and finish. Prints one line per trial and a table: trials, resumes that succeeded, the most steps
lost (last step logged before the kill minus the step resumed from), checkpoints found corrupted
(moved to checkpoints_unreadable/: must be 0, since orbax renames a finished save into place),
and whether every final state equals an uninterrupted run's (bit for bit on CPU).

    python benchmarks/fault_injection.py                 # 20 trials, about 8 minutes on 2 cores
    python benchmarks/fault_injection.py --trials 50 --seed 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _command(workdir: str, steps: int, save_every: int, cache: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "scripts", "run.py"),
            f"--config={os.path.join(ROOT, 'experiments', 'toy_2d.py')}:smoke",
            f"--workdir={workdir}", f"--config.training.n_iters={steps}",
            f"--config.training.snapshot_freq={save_every}", "--config.training.log_freq=1",
            "--config.training.eval_freq=0", "--config.training.snapshot_sampling=False",
            "--config.training.keep_checkpoints=2", f"--compilation_cache_dir={cache}"]


def _last_logged_step(workdir: str) -> int:
    path = os.path.join(workdir, "train.jsonl")
    if not os.path.exists(path):
        return 0
    steps = [0]
    with open(path) as f:
        for line in f:
            try:
                steps.append(int(json.loads(line)["step"]))
            except (ValueError, KeyError):
                pass              # a line cut by the kill
    return max(steps)


def _final_state(workdir: str, steps: int):
    from diffusion import train, train_state
    from experiments import toy_2d

    config = toy_2d.get_config("smoke")
    config.training.n_iters = steps
    return train_state.restore_latest(train.build(config), workdir, train.data_mesh())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--save_every", type=int, default=25)
    parser.add_argument("--max_delay", type=float, default=0.0,
                        help="kill after U(0.5, max_delay) seconds (0: the uninterrupted run's "
                             "wall time, so the kill lands anywhere from start-up to the end)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    import jax
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "jax_cache")
        reference = os.path.join(tmp, "reference")
        t0 = time.time()
        subprocess.run(_command(reference, args.steps, args.save_every, cache), check=True,
                       capture_output=True, text=True)
        t0 = time.time()   # again, with the compiled programs cached, as every trial runs
        subprocess.run(_command(os.path.join(tmp, "timing"), args.steps, args.save_every, cache),
                       check=True, capture_output=True, text=True)
        wall = time.time() - t0
        max_delay = args.max_delay or wall
        print(f"uninterrupted run: {wall:.1f} s; kills after U(0.5, {max_delay:.1f}) s", flush=True)
        ref = jax.tree.leaves(jax.device_get(_final_state(reference, args.steps)))
        resumed = equal = corrupted = 0
        lost = []
        for trial in range(args.trials):
            workdir = os.path.join(tmp, f"trial_{trial}")
            command = _command(workdir, args.steps, args.save_every, cache)
            delay = rng.uniform(0.5, max_delay)
            proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                proc.wait(timeout=delay)
                killed = False                     # finished before the kill
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed = True
            before = _last_logged_step(workdir)
            again = subprocess.run(command, capture_output=True, text=True)
            ok = again.returncode == 0
            start = 0
            for line in again.stdout.splitlines():
                if "resuming from step" in line:
                    start = int(line.rsplit("resuming from step", 1)[1].split()[0])
            if "Nothing to do" in again.stdout:
                start = args.steps
            bad = os.path.isdir(os.path.join(workdir, "checkpoints_unreadable"))
            same = False
            if ok:
                state = jax.tree.leaves(jax.device_get(_final_state(workdir, args.steps)))
                same = all(np.array_equal(np.asarray(a), np.asarray(b))
                           for a, b in zip(ref, state, strict=True))
            resumed += ok
            equal += same
            corrupted += bad
            lost.append(max(0, before - start))
            print(f"trial {trial:2d}: kill after {delay:4.1f} s{'' if killed else ' (done)'}, "
                  f"logged step {before:3d}, resumed from {start:3d}, "
                  f"{'ok' if ok else 'FAILED: ' + again.stderr[-300:]}"
                  f"{', corrupted checkpoint' if bad else ''}, "
                  f"{'equal' if same else 'DIFFERENT'}", flush=True)
        rows = [("trials", args.trials), ("resumes that succeeded", f"{resumed}/{args.trials}"),
                ("steps lost at most", max(lost)), ("checkpoints corrupted", corrupted),
                ("final params equal the uninterrupted run's", f"{equal}/{args.trials}")]
        print()
        for name, value in rows:
            print(f"| {name:<43} | {value!s:>8} |")
    return 0 if resumed == equal == args.trials and corrupted == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
