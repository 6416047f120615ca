"""Training throughput: the full training loop against a bare jitted step, the paper networks'
step time / FLOPs / MFU / memory, and the input pipeline.

    python benchmarks/train_throughput.py                       # the embedded default (digits)
    python benchmarks/train_throughput.py --config experiments/toy_2d.py --steps 2000
    python benchmarks/train_throughput.py --networks ddpm,ddpmpp,ncsnpp      # batch 128
    python benchmarks/train_throughput.py --networks dit_b2,uvit_s2 --width 32 --steps 2
    python benchmarks/train_throughput.py --networks ddpmpp --width 0 --compile_only \
        --remat both --dtypes float32,bfloat16          # full size: FLOPs and memory, no step
    python benchmarks/train_throughput.py --pipeline --workers 0,2,4
    python benchmarks/train_throughput.py --memory      # peak host memory, a process per case
    python benchmarks/train_throughput.py --config experiments/toy_2d.py --stop_check
    python benchmarks/train_throughput.py --unroll_compile     # training.unroll: compile s

--networks compiles one train step (loss, gradient, Adam, EMA) of DDPM (experiments/ddpm_cifar),
DDPM++ cont. (vp_cifar) and NCSN++ cont. (ve_cifar), optionally deep, at batch 128 on 32x32x3
inputs (or NCSN++ on 256x256x3, ve_celebahq256, as `ncsnpp_256`), and of the transformers
DiT-B/2 (`dit_b2`: dit_cifar:B, class-conditional with 10 classes, learned variance, the
discrete hybrid loss; the batch carries random labels) and U-ViT-S/2 (`uvit_s2`: uvit_cifar),
and prints parameters, compile time, step time, images/s, model FLOPs per step (3x the forward
pass, as XLA counts it), TFLOP/s, MFU against the chip's dense peak (PEAK_TFLOPS; --peak_tflops
otherwise, or on a CPU a measured matmul) and XLA's memory estimate of the compiled step. On a
CPU the width defaults to 32 (a paper-size step takes minutes there); --width 0 --compile_only
still gives the full-size FLOPs and memory. --width sets the base channels of the U-Nets
(model.ch / nf) and, for the transformers, the token width model.hidden_size = 4 x num_heads x
max(1, width // 32) (head dimension 4 per 32 of width; depth, heads and patch size stay: DiT-B/2
at --width 32 is 48 wide, U-ViT-S/2 32; the paper's 768 and 512 are --width 512 or 0). A
narrow transformer keeps its 256 tokens and all its heads, so its attention (B x heads x 256^2
scores per block) dominates a CPU step: DiT-B/2 at width 48 and batch 128 takes about 30 s per
step on 2 cores and XLA plans 16 GiB for it (pass a smaller --batch there). On a GPU / TPU the
table adds the device's own peak memory (`memory_stats()["peak_bytes_in_use"]`; --fresh_process
runs each row in its own process, as that peak never resets). --memory prints the peak host
memory (ru_maxrss) of the embedded default run and of the CIFAR smoke config, each in a fresh
process. --pipeline times the tfds input pipeline (tfds.data_source, PNG decoding, batches in
worker processes) on a locally built CIFAR-shaped dataset. --unroll_compile prints the seconds
to compile one train-step call of --config with its n_jitted_steps loop unrolled and as
`lax.scan` (training.unroll), for n_jitted_steps 1, 5 and 10.

The default mode compares, for one experiment config:
"full pipeline" is `train.train_and_evaluate` as a user runs it: the data pipeline (host batches,
prefetch thread, transfer to the devices), checkpoints every `snapshot_freq`, progress lines,
TensorBoard and jsonl logging; only the sample grids are off (sampling is not training). Its rate is
read from the wall-clock times it logs, after a warm-up that covers compilation. "bare loop" is the
same network, loss and optimizer in a jitted step on one fixed device-resident batch, with nothing
else. Prints a table; the full pipeline should reach >= 90% of the bare loop. --stop_check times
the bare loop without and with the preemption watcher's per-call stop check (`stop_agreed`): as
on one process (its own flag, no collective), and with the collective that several processes
use forced on this one (a one-element max over the devices per call, read 2 calls later), in
interleaved windows (a shared machine's load falls on all three alike); median and best.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from diffusion import data as data_lib
from diffusion import train, train_state  # noqa: E402


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


def _jitted_step(config):
    """(step_fn, state, batch, key, mesh) of the config's jitted train step, with one fixed,
    device-resident batch of n_jitted_steps copies of global batch 0."""
    exp = train.build(config)
    mesh = train.data_mesh()
    state = train.init_train_state(exp, mesh)
    step_fn = train.make_train_step(exp.loss_fn, exp.tx, config.model.ema_rate, mesh,
                                    config.model.ema_warmup, config.training.unroll)
    host = data_lib.batch_at(exp.dataset, "train", 0, config.training.batch_size, seed=0,
                             centered=config.data.centered)
    batch = train.put_batch({"x": np.stack([host["x"]] * config.training.n_jitted_steps)}, mesh)
    return step_fn, state, batch, jax.random.key(0), mesh


def bare_loop(config, steps: int, warmup: int) -> float:
    """Steps/s of the jitted train step alone on one fixed, device-resident batch."""
    step_fn, state, batch, key, _ = _jitted_step(config)
    n_jit = config.training.n_jitted_steps
    for _ in range(warmup // n_jit):
        state, metrics = step_fn(state, batch, key)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps // n_jit):
        state, metrics = step_fn(state, batch, key)
    jax.block_until_ready(metrics)
    return (steps // n_jit) * n_jit / (time.perf_counter() - t0)


STOP_CHECKS = ("none", "one process", "collective")


def stop_check_rates(config, steps: int, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Steps/s of the bare loop without and with the preemption watcher's per-call stop check
    (`stop_agreed`), as in `STOP_CHECKS`: none; as on one process (its own flag); and with the
    collective of several processes forced on this one (a one-element max over the devices per
    call, read `lag` calls later). One compiled step; `repeats` rounds of one window of `steps`
    steps per variant, interleaved, so that load from other processes falls on all alike."""
    from diffusion import checkpointing

    step_fn, state, batch, key, mesh = _jitted_step(config)
    n_jit = config.training.n_jitted_steps
    watchers = {"one process": checkpointing.PreemptionWatcher(mesh, collective=False),
                "collective": checkpointing.PreemptionWatcher(mesh, collective=True)}
    rates = {name: [] for name in STOP_CHECKS}
    try:
        for _ in range(max(1, warmup // n_jit)):
            state, metrics = step_fn(state, batch, key)
            for watcher in watchers.values():
                watcher.stop_agreed()
        jax.block_until_ready(metrics)
        for _ in range(repeats):
            for name in STOP_CHECKS:
                watcher = watchers.get(name)
                t0 = time.perf_counter()
                for _ in range(steps // n_jit):
                    state, metrics = step_fn(state, batch, key)
                    if watcher is not None and watcher.stop_agreed():
                        raise RuntimeError("no signal was sent, yet the watcher says stop")
                jax.block_until_ready(metrics)
                rates[name].append((steps // n_jit) * n_jit / (time.perf_counter() - t0))
    finally:
        for watcher in watchers.values():
            watcher.close()
    return rates


def stop_check_table(config, name: str, steps: int, warmup: int, repeats: int) -> None:
    rates = stop_check_rates(config, steps, warmup, repeats)
    device = jax.devices()[0]
    print(f"\nThe preemption stop check, {name}: batch {config.training.batch_size}, "
          f"n_jitted_steps {config.training.n_jitted_steps}, {jax.device_count()} x "
          f"{device.platform} ({device.device_kind}), {os.cpu_count()} CPU cores; {repeats} "
          f"interleaved windows of {steps} steps per variant\n")
    print(f"| {'stop check':<12} | {'median steps/s':>14} | {'best steps/s':>12} | "
          f"{'median vs none':>14} | {'ms per step vs none':>19} |")
    print(f"|{'-' * 14}|{'-' * 16}|{'-' * 14}|{'-' * 16}|{'-' * 21}|")
    base = float(np.median(rates["none"]))
    for check in STOP_CHECKS:
        median = float(np.median(rates[check]))
        print(f"| {check:<12} | {median:14.2f} | {max(rates[check]):12.2f} | "
              f"{median / base:14.1%} | {1e3 / median - 1e3 / base:19.3f} |")


def unroll_compile_table(config, name: str, n_jits: list[int]) -> None:
    """Seconds to compile one train-step call of `config` (jit's lower + compile, no cache) for
    each n_jitted_steps, with its loop unrolled and as `lax.scan` (training.unroll)."""
    import tensorflow_datasets as tfds
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_enable_compilation_cache", False)
    with tfds.testing.mock_data(num_examples=8):     # only the data's shape is needed here
        exp = train.build(config)
    mesh = train.data_mesh()
    batch = config.training.batch_size
    abstract = train_state.abstract_train_state(exp, mesh)
    device = jax.devices()[0]
    print(f"\nCompile time of one train-step call, {name} (batch {batch}, "
          f"{train.count_params(abstract.params):,} parameters), {jax.device_count()} x "
          f"{device.platform} ({device.device_kind}), {os.cpu_count()} CPU cores; seconds of "
          f"jit lower + compile, no compilation cache\n")
    print(f"| {'n_jitted_steps':>14} | {'unroll s':>8} | {'scan s':>8} |")
    print(f"|{'-' * 16}|{'-' * 10}|{'-' * 10}|", flush=True)
    for n_jit in n_jits:
        x = jax.ShapeDtypeStruct((n_jit, batch, *exp.dataset.data_shape), np.float32,
                                 sharding=NamedSharding(mesh, P(None, train.DATA_AXIS)))
        seconds = {}
        for unroll in ("unroll", "scan"):
            step_fn = train.make_train_step(exp.loss_fn, exp.tx, config.model.ema_rate, mesh,
                                              config.model.ema_warmup, unroll)
            t0 = time.perf_counter()
            step_fn.lower(abstract, {"x": x}, jax.random.key(0)).compile()
            seconds[unroll] = time.perf_counter() - t0
        print(f"| {n_jit:>14} | {seconds['unroll']:8.1f} | {seconds['scan']:8.1f} |", flush=True)


# --------------------------------------------------------------------------- paper networks

# name -> experiment config (file, variant) whose network and loss are timed.
NETWORKS = {
    "ddpm": ("ddpm_cifar", None),
    "ddpmpp": ("vp_cifar", None),
    "ddpmpp_deep": ("vp_cifar", "deep"),
    "ncsnpp": ("ve_cifar", None),
    "ncsnpp_deep": ("ve_cifar", "deep"),
    "ncsnpp_256": ("ve_celebahq256", None),     # 256x256x3; the paper's batch there is 64
    "dit_b2": ("dit_cifar", "B"),               # class-conditional, learned variance (hybrid)
    "uvit_s2": ("uvit_cifar", None),
}

# Dense peak TFLOP/s per chip: (bfloat16, float32 as XLA runs it by default: TF32 on NVIDIA
# Ampere and later, one bf16 pass on TPU). Matched against `device_kind` by prefix.
PEAK_TFLOPS = {
    "NVIDIA H100": (989.0, 494.7), "NVIDIA H200": (989.0, 494.7),
    "NVIDIA A100": (312.0, 156.0), "NVIDIA L4": (121.0, 60.0),
    "Tesla V100": (None, 15.7),
    "TPU v4": (275.0, 275.0), "TPU v5 lite": (197.0, 197.0), "TPU v5e": (197.0, 197.0),
    "TPU v5p": (459.0, 459.0), "TPU v6 lite": (918.0, 918.0),
}


def matmul_tflops(dtype: str, n: int = 2048, repeats: int = 10) -> float:
    """Measured TFLOP/s of an n x n matmul: the reference "peak" where none is tabulated."""
    a = jax.numpy.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    jax.block_until_ready(f(a))
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = f(a)
    jax.block_until_ready(out)
    return 2.0 * n**3 * repeats / (time.perf_counter() - t0) / 1e12


def peak_tflops(device, dtype: str, override: float | None) -> tuple[float, str]:
    """(peak TFLOP/s, where it comes from): --peak_tflops, PEAK_TFLOPS, else a measured matmul."""
    if override:
        return override, "--peak_tflops"
    for prefix, (bf16, fp32) in PEAK_TFLOPS.items():
        if device.device_kind.startswith(prefix):
            peak = bf16 if dtype == "bfloat16" else fp32
            if peak:
                return peak, f"{prefix} dense peak"
    return matmul_tflops(dtype), "measured 2048^2 matmul"


TRANSFORMERS = ("dit", "uvit")      # model.name of the transformer backbones


def network_width(config) -> int:
    """The network's width: base channels (ch / nf), or the token width of a transformer."""
    if config.model.name in TRANSFORMERS:
        return config.model.hidden_size
    return config.model["ch" if config.model.name == "unet" else "nf"]


def network_config(root: str, name: str, width: int, batch: int, dtype: str, remat: bool,
                   n_jit: int):
    module, variant = NETWORKS[name]
    config = load_config(os.path.join(root, "experiments", f"{module}.py")
                         + (f":{variant}" if variant else ""))
    if width and config.model.name in TRANSFORMERS:
        # Head dimension 4 per 32 of width: divisible by num_heads and by 4 (the 2-D sin-cos
        # position code); depth and patch size stay.
        config.model.hidden_size = 4 * config.model.num_heads * max(1, width // 32)
    elif width:
        config.model["ch" if config.model.name == "unet" else "nf"] = width
    config.training.batch_size = batch
    config.training.compute_dtype = dtype
    config.training.n_jitted_steps = n_jit
    config.model.remat = remat
    return config


def measure_network(config, steps: int, warmup: int, compile_only: bool) -> dict:
    """Compiles one train step of `config`'s network at its batch size and times it.

    Returns params, compile seconds, XLA's memory estimate of the compiled step (arguments +
    outputs + temporaries - donated aliases), model FLOPs per optimizer step (3x the forward
    pass's XLA flop count: forward + backward, without rematerialised recomputation), and unless
    compile_only the median seconds per optimizer step.
    """
    import tensorflow_datasets as tfds
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    with tfds.testing.mock_data(num_examples=8):     # only the data's shape is needed here
        exp = train.build(config)
    mesh = train.data_mesh()
    n_jit, batch = config.training.n_jitted_steps, config.training.batch_size
    abstract = train_state.abstract_train_state(exp, mesh)
    sharding = NamedSharding(mesh, P(None, train.DATA_AXIS))
    batch_spec = {"x": jax.ShapeDtypeStruct((n_jit, batch, *exp.dataset.data_shape), np.float32,
                                            sharding=sharding)}
    if exp.conditional:          # class-conditional (DiT): the batch carries int32 labels
        batch_spec["label"] = jax.ShapeDtypeStruct((n_jit, batch), np.int32, sharding=sharding)
    key = jax.random.key(0)
    step_fn = train.make_train_step(exp.loss_fn, exp.tx, config.model.ema_rate, mesh,
                                      config.model.ema_warmup)
    t0 = time.perf_counter()
    compiled = step_fn.lower(abstract, batch_spec, key).compile()
    compile_s = time.perf_counter() - t0
    compile_peak = peak_device_bytes()     # compiling (GPU autotuning) allocates scratch too
    memory = compiled.memory_analysis()
    mem_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                 + memory.temp_size_in_bytes - memory.alias_size_in_bytes) if memory else None

    x = jax.ShapeDtypeStruct((batch, *exp.dataset.data_shape), np.float32)
    t = jax.ShapeDtypeStruct((batch,), np.float32)
    y = jax.ShapeDtypeStruct((batch,), np.int32) if exp.conditional else None
    forward = jax.jit(lambda p, x, t, y: exp.score_model(p, x, t, y=y)).lower(
        abstract.params, x, t, y)
    cost = forward.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    row = dict(params=train.count_params(abstract.params), compile_s=compile_s,
               mem_bytes=mem_bytes, model_flops=3.0 * float(cost["flops"]),
               compile_peak=compile_peak, peak=peak_device_bytes())
    if compile_only:
        return row
    state = train.init_train_state(exp, mesh)
    rng = np.random.default_rng(0)
    host = {"x": rng.standard_normal((n_jit, batch, *exp.dataset.data_shape)).astype(np.float32)}
    if exp.conditional:
        host["label"] = rng.integers(0, exp.num_classes, (n_jit, batch)).astype(np.int32)
    data = train.put_batch(host, mesh)
    for _ in range(max(1, warmup // n_jit)):
        state, metrics = compiled(state, data, key)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(max(1, steps // n_jit)):
        t0 = time.perf_counter()
        state, metrics = compiled(state, data, key)
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - t0) / n_jit)
    row["step_s"] = float(np.median(times))
    row["peak"] = peak_device_bytes()
    return row


def peak_device_bytes() -> int | None:
    """The device's peak bytes in use since the process started (it never resets: run one case
    per process, --fresh_process, for a case's own peak); None on XLA:CPU, which keeps none."""
    stats = jax.local_devices()[0].memory_stats()
    return stats.get("peak_bytes_in_use") if stats else None


def child_rows(argv: list[str]) -> list[dict]:
    """Runs this script with `argv` in a fresh process; its `ROW {json}` lines, parsed. Other
    output passes through."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], text=True,
                          stdout=subprocess.PIPE)
    rows = []
    for line in proc.stdout.splitlines():
        if line.startswith("ROW "):
            rows.append(json.loads(line[4:]))
        else:
            print(line, flush=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)}: the child process failed (exit {proc.returncode})")
    return rows


def network_case(root: str, args, name: str, dtype: str, remat: bool) -> dict:
    """One row of the network table, measured in this process."""
    device = jax.devices()[0]
    width = args.width if args.width >= 0 else (0 if device.platform != "cpu" else 32)
    config = network_config(root, name, width, args.batch, dtype, remat, args.n_jitted_steps)
    r = measure_network(config, args.steps, args.warmup, args.compile_only)
    peak, source = peak_tflops(device, dtype, args.peak_tflops)
    return dict(r, name=name, dtype=dtype, remat=remat, width_arg=width,
                width=network_width(config),
                peak_tflops=peak, peak_source=source, platform=device.platform,
                device_kind=device.device_kind, device_count=jax.device_count())


def network_table(root: str, args) -> None:
    header = (f"| {'network':<12} | {'width':>5} | {'params':>7} | {'dtype':<8} | {'remat':<5} | "
              f"{'compile s':>9} | {'step s':>7} | {'img/s':>7} | {'GFLOP/step':>10} | "
              f"{'TFLOP/s':>7} | {'MFU':>6} | {'memory GiB':>10} | {'peak GiB':>9} | "
              f"{'compile peak GiB':>16} |")
    first = True
    for name in args.networks.split(","):
        for dtype in args.dtypes.split(","):
            for remat in ([False, True] if args.remat == "both" else [args.remat == "on"]):
                if args.fresh_process:    # the parent never touches the accelerator
                    argv = [a for a in sys.argv[1:] if a != "--fresh_process"]
                    r = child_rows(argv + ["--networks", name, "--dtypes", dtype, "--remat",
                                           "on" if remat else "off", "--row_only"])[0]
                else:
                    r = network_case(root, args, name, dtype, remat)
                if args.row_only:
                    print("ROW " + json.dumps(r), flush=True)
                    continue
                if first:
                    print(f"\nTrain step of the paper networks (32x32x3 CIFAR-10 shapes, 256x256x3 "
                          f"for ncsnpp_256; width = base channels, or the token width of "
                          f"dit_b2 / uvit_s2), batch {args.batch}, {r['device_count']} x "
                          f"{r['platform']} ({r['device_kind']}), {os.cpu_count()} CPU cores; "
                          f"width {r['width_arg'] or 'as in the paper'}; median of {args.steps} "
                          f"timed steps after {args.warmup} warm-up; n_jitted_steps "
                          f"{args.n_jitted_steps}.\nmodel FLOPs = 3 x forward (XLA's count); "
                          f"MFU = model FLOP/s / peak ({r['peak_source']}); memory = XLA's "
                          f"buffer assignment for the compiled step; peak = the device's "
                          f"peak_bytes_in_use after the timed steps, compile peak = after "
                          f"compiling, before the state exists ("
                          + ("one process per row" if args.fresh_process
                             else "since the process started") + ").\n")
                    print(header)
                    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
                    first = False
                step = r.get("step_s")
                tflops = r["model_flops"] / step / 1e12 if step else None
                peak = r["peak_tflops"]
                gib = lambda b: f"{b / 2**30:.2f}" if b is not None else "n/a (CPU)"
                cells = [f"{name:<12}", f"{r['width']:>5}", f"{r['params'] / 1e6:6.1f}M",
                         f"{dtype:<8}", f"{'yes' if remat else 'no':<5}",
                         f"{r['compile_s']:9.1f}",
                         f"{step:7.3f}" if step else f"{'-':>7}",
                         f"{args.batch / step:7.0f}" if step else f"{'-':>7}",
                         f"{r['model_flops'] / 1e9:10.0f}",
                         f"{tflops:7.3g}" if tflops else f"{'-':>7}",
                         f"{tflops / peak:6.1%}" if tflops and peak else f"{'n/a':>6}",
                         f"{r['mem_bytes'] / 2**30:10.2f}" if r["mem_bytes"] else f"{'-':>10}",
                         f"{gib(r['peak']):>9}", f"{gib(r['compile_peak']):>16}"]
                print("| " + " | ".join(cells) + " |", flush=True)


# --------------------------------------------------------------------------- host memory

MEMORY_CASES = ("imports", "digits", "cifar_smoke")


def memory_case(root: str, case: str, steps: int) -> dict:
    """Runs one case in this (fresh) process; its peak resident host memory (ru_maxrss)."""
    import resource

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if case == "imports":       # the floor: jax, flax, tfds, the library, a device
            jax.devices()
            what = "imports and the device only"
        elif case == "digits":      # the embedded default, as configured, fewer steps
            config = load_config(os.path.join(root, "experiments", "digits.py"))
            config.training.n_iters = steps
            config.training.snapshot_freq = steps // 2
            train.train_and_evaluate(config, os.path.join(tmp, "run"))
            what = (f"experiments/digits.py, {steps} steps: 2 checkpoints + sample grids "
                    f"({config.sampling.batch_size} samples, pc {config.sde.N}), eval loss at "
                    f"the end")
        elif case == "cifar_smoke":  # on a locally built CIFAR-shaped tfds dataset
            from tests import synthetic_tfds

            config = load_config(os.path.join(root, "experiments", "vp_cifar.py:smoke"))
            config.data.dataset = synthetic_tfds.build(tmp, num_train=1000, num_test=100)
            config.data.data_dir = tmp
            train.train_and_evaluate(config, os.path.join(tmp, "run"))
            what = ("experiments/vp_cifar.py:smoke as configured (2 steps, sample grid, eval "
                    "loss) on a local tfds dataset of 1,000 32x32x3 PNGs")
        else:
            raise ValueError(f"unknown memory case {case!r}: use {MEMORY_CASES}")
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss        # KiB on Linux
    return dict(case=case, what=what, maxrss_mib=rss_kib / 1024,
                seconds=time.perf_counter() - t0)


def memory_table(args) -> None:
    """Peak host memory of each case, each in a fresh process."""
    print(f"\nPeak host memory (ru_maxrss of a fresh process per case), {os.cpu_count()} CPU "
          f"cores:\n")
    print(f"| {'case':<12} | {'peak RSS MiB':>12} | {'seconds':>7} | what runs |")
    print(f"|{'-' * 14}|{'-' * 14}|{'-' * 9}|-----------|", flush=True)
    for case in args.memory.split(","):
        r = child_rows(["--memory_case", case, "--memory_steps", str(args.memory_steps)])[0]
        print(f"| {case:<12} | {r['maxrss_mib']:12.0f} | {r['seconds']:7.1f} | {r['what']} |",
              flush=True)


# --------------------------------------------------------------------------- input pipeline


def pipeline_table(args) -> None:
    """Batches/s of the tfds input pipeline on a locally built CIFAR-shaped array_record dataset
    (PNG-encoded, as tfds stores cifar10), for 0 (a thread) and N worker processes."""
    from tests import synthetic_tfds

    with tempfile.TemporaryDirectory() as data_dir:
        name = synthetic_tfds.build(data_dir, num_train=args.pipeline_examples, num_test=100)
        data = data_lib.load_dataset(name, image_size=32, num_channels=3, data_dir=data_dir)
        print(f"\nInput pipeline: batches of {args.batch} from a locally built tfds dataset "
              f"({args.pipeline_examples} PNG-encoded 32x32x3 images, array_record), random "
              f"flips and dequantization on; {os.cpu_count()} CPU cores.\n")
        print(f"| {'workers':<20} | {'batches/s':>9} | {'images/s':>8} | {'start-up s':>10} |")
        print(f"|{'-' * 22}|{'-' * 11}|{'-' * 10}|{'-' * 12}|")
        for workers in [int(w) for w in args.workers.split(",")]:
            t0 = time.perf_counter()
            with data_lib.BatchIterator(data, "train", 0, args.batch, num_workers=workers,
                                        prefetch=max(4, 2 * workers), seed=0,
                                        uniform_dequantization=True, random_flip=True) as it:
                next(it)
                t1 = time.perf_counter()
                for _ in range(args.pipeline_batches):
                    next(it)
                rate = args.pipeline_batches / (time.perf_counter() - t1)
            label = ("1 thread" if workers == 0
                     else f"{workers} process{'es' if workers > 1 else ''}")
            print(f"| {label:<20} | {rate:9.1f} | {rate * args.batch:8.0f} | {t1 - t0:10.1f} |",
                  flush=True)


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(root, "experiments", "digits.py"))
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps (default 600; 5 with --networks)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="warm-up steps (default 100; 1 with --networks)")
    parser.add_argument("--networks", default="",
                        help=f"comma-separated paper networks to time instead: {list(NETWORKS)}")
    parser.add_argument("--width", type=int, default=-1,
                        help="--networks: base channels; transformers: hidden_size = 4 x "
                             "num_heads x max(1, width // 32) (0: the paper's; default 0 on "
                             "GPU/TPU, 32 on CPU)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtypes", default="float32",
                        help="--networks: compute dtypes, e.g. float32,bfloat16")
    parser.add_argument("--remat", choices=["off", "on", "both"], default="off")
    parser.add_argument("--n_jitted_steps", type=int, default=1)
    parser.add_argument("--compile_only", action="store_true",
                        help="--networks: parameters, FLOPs and memory without running a step")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="peak TFLOP/s for MFU on a device missing from PEAK_TFLOPS")
    parser.add_argument("--fresh_process", action="store_true",
                        help="--networks: each row in its own process (its own device peak)")
    parser.add_argument("--row_only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", action="store_true",
                        help="time the tfds input pipeline instead")
    parser.add_argument("--workers", default="0,2,4", help="--pipeline: worker processes")
    parser.add_argument("--pipeline_examples", type=int, default=5000)
    parser.add_argument("--pipeline_batches", type=int, default=40)
    parser.add_argument("--memory", nargs="?", const=",".join(MEMORY_CASES), default="",
                        help=f"peak host memory of the cases {MEMORY_CASES} (default all)")
    parser.add_argument("--memory_steps", type=int, default=300, help="--memory: digits steps")
    parser.add_argument("--memory_case", default="", help=argparse.SUPPRESS)
    parser.add_argument("--stop_check", type=int, nargs="?", const=5, default=0,
                        help="time the bare loop without and with the preemption watcher's "
                             "per-step stop check (one process; the collective forced), in this "
                             "many interleaved rounds (default 5) of --steps steps")
    parser.add_argument("--unroll_compile", nargs="?", const="1,5,10", default="",
                        help="compile time of --config's train step, unrolled and scanned, for "
                             "these n_jitted_steps (default 1,5,10)")
    args = parser.parse_args()
    if args.unroll_compile:
        return unroll_compile_table(load_config(args.config), os.path.basename(args.config),
                                    [int(n) for n in args.unroll_compile.split(",")])
    if args.stop_check:
        return stop_check_table(load_config(args.config), os.path.basename(args.config),
                                args.steps or 200, args.warmup or 20, args.stop_check)
    if args.memory_case:
        return print("ROW " + json.dumps(memory_case(root, args.memory_case, args.memory_steps)),
                     flush=True)
    if args.memory:
        return memory_table(args)
    if args.pipeline:
        return pipeline_table(args)
    if args.networks:
        args.steps = 5 if args.steps is None else args.steps
        args.warmup = 1 if args.warmup is None else args.warmup
        return network_table(root, args)
    args.steps = 600 if args.steps is None else args.steps
    args.warmup = 100 if args.warmup is None else args.warmup
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
