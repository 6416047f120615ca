"""Sampling throughput of the paper networks, and the wall time of a FID evaluation.

    python benchmarks/sample_throughput.py                   # GPU: paper width, batch 128
    python benchmarks/sample_throughput.py --samplers dpm_solver,edm --dtype bfloat16
    python benchmarks/sample_throughput.py --width 16 --batch 4 --pc_steps 10 --fid_samples 8 \
        --inception_batch 8                                  # CPU: every path at tiny sizes

For DDPM++ cont. (experiments/vp_cifar.py, `ddpmpp`) and NCSN++ cont. (experiments/ve_cifar.py,
`ncsnpp`) on 32x32x3 with random-initialised parameters (the network's cost is what is measured),
the samplers users run, through the codebase's own entry point (`generate.make_sampler`, the
jitted program `generate.sample_batches` calls, over the data mesh):

  dpm_solver  DPM-Solver++(2M), 20 steps (20 NFE)
  edm         EDM's deterministic Heun sampler, its default 18 steps (35 NFE)
  pc          predictor-corrector: Euler-Maruyama predictor with the paper config's corrector
              (none for vp_cifar; Langevin, snr 0.16, for ve_cifar: 2 NFE per step), sde.N =
              1000 steps (--pc_steps to change)

Each is compiled ahead of time (compile seconds reported, not timed), then run on one batch of
--batch images; a row is the median over up to --repeats runs (fewer once --case_seconds have
passed). FLOPs are the forward pass's XLA count x NFE. Peak memory is the device's own
`peak_bytes_in_use` since the process started (so a row never reads lower than the one above;
run one network per process for per-network peaks); XLA:CPU reports none.

--fid_samples N (0: skip) then times a FID evaluation as `evaluate.eval_sample_quality` runs it:
N samples of the config's sampler (--fid_sampler to pick one of the above) streamed through the
FID Inception network (`evaluate.make_inception_extractor`, `InceptionExtractor.stats`), and the
FID / KID of the statistics, wall time split into sampling, Inception and the final FID / KID.
With --fid_budget_s, N is cut to what the measured rate fits into that many seconds and the time
for --fid_samples is extrapolated. Needs the converted Inception weights
(`python scripts/convert_inception.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from train_throughput import load_config  # noqa: E402  (benchmarks/, the script's folder)

from diffusion import data as data_lib  # noqa: E402
from diffusion import experiment, generate, metrics  # noqa: E402
from diffusion.evaluate import make_inception_extractor  # noqa: E402
from diffusion.parallel import data_mesh, global_batch  # noqa: E402

# network name -> paper config under experiments/
NETWORKS = {"ddpmpp": "vp_cifar", "ncsnpp": "ve_cifar"}
# sampler name -> overrides of config.sampling (anything else stays as the config has it)
SAMPLERS = {
    "dpm_solver": dict(method="dpm_solver", steps=20),
    "edm": dict(method="edm", steps=0),                      # 0: its default, 18 steps
    "pc": dict(method="pc", predictor="euler_maruyama"),     # corrector: the config's
}


def peak_device_bytes() -> int | None:
    """The device's peak bytes in use since the process started; None where the backend keeps
    no statistics (XLA:CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    return stats.get("peak_bytes_in_use") if stats else None


def fmt_gib(nbytes: int | None) -> str:
    return f"{nbytes / 2**30:.2f}" if nbytes is not None else "n/a (CPU)"


def network_config(name: str, width: int, batch: int, sampler: str | None, pc_steps: int):
    """The paper config of `name` with width, sampling batch and `sampler`'s overrides
    (None: the config's own sampler)."""
    config = load_config(os.path.join(ROOT, "experiments", f"{NETWORKS[name]}.py"))
    if width:
        config.model.nf = width
    config.sampling.batch_size = batch
    if sampler is not None:
        config.sampling.update(SAMPLERS[sampler])
        if sampler != "pc":      # pc's keys back to the defaults (else config checks note them)
            config.sampling.predictor, config.sampling.corrector = "euler_maruyama", "none"
    if config.sampling.method == "pc" and pc_steps:
        config.sampling.steps = pc_steps
    return config


def build(config, dtype: str) -> tuple[experiment.Experiment, dict]:
    """The experiment (its network in `dtype`: users sample in float32, bfloat16 is this
    benchmark's option) and random-initialised network parameters on the devices."""
    exp = experiment.build(config, shape_only_data=True)
    if dtype != "float32":
        exp = dataclasses.replace(exp, score_model=dataclasses.replace(exp.score_model,
                                                                       compute_dtype=dtype))
    x = jax.numpy.zeros((1, *exp.dataset.data_shape), jax.numpy.float32)
    t = jax.numpy.ones((1,), jax.numpy.float32)
    init = jax.jit(lambda k: exp.net.init(k, x, t, train=False)["params"],
                   out_shardings=NamedSharding(data_mesh(), P()))   # replicated, as restored
    return exp, init(exp.key("init"))


def forward_flops(exp: experiment.Experiment, params, batch: int) -> float:
    """XLA's FLOP count of one score evaluation of a batch (multiply and add counted apart)."""
    x = jax.ShapeDtypeStruct((batch, *exp.dataset.data_shape), np.float32)
    t = jax.ShapeDtypeStruct((batch,), np.float32)
    cost = jax.jit(lambda p, x, t: exp.score_model(p, x, t)).lower(params, x, t).compile()
    cost = cost.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def sampler_inputs(exp: experiment.Experiment, mesh, batch: int) -> dict:
    """The conditioning batch `generate.sample_batches` hands an unconditional sampler."""
    host = {"index": np.arange(batch, dtype=np.int32), "y": np.zeros((batch,), np.int32),
            "cond": np.zeros((batch, 1), np.float32), "mask": np.zeros((batch, 1), np.float32)}
    return jax.tree.map(lambda a: global_batch(a, mesh), host)


def time_sampler(exp, params, mesh, batch: int, repeats: int, case_seconds: float) -> dict:
    """Compiles the configured sampler for one batch ahead of time, then times whole batches."""
    sampler = generate.make_sampler(exp, exp.sampling, batch, mesh)
    inputs = sampler_inputs(exp, mesh, batch)
    key = jax.random.key(0)
    t0 = time.perf_counter()
    compiled = sampler.lower((params, None), key, inputs).compile()
    compile_s = time.perf_counter() - t0
    times, nfe, started = [], 0, time.perf_counter()
    for i in range(repeats):
        t0 = time.perf_counter()
        x, nfe_dev = compiled((params, None), jax.random.fold_in(key, i), inputs)
        jax.block_until_ready(x)
        times.append(time.perf_counter() - t0)
        nfe = int(np.max(np.asarray(nfe_dev)))
        if time.perf_counter() - started > case_seconds:
            break
    if not np.all(np.isfinite(np.asarray(x))):
        print(f"warning: {exp.sampling.method} produced non-finite values (random weights)",
              file=sys.stderr)
    return dict(compile_s=compile_s, batch_s=float(np.median(times)), nfe=nfe,
                runs=len(times))


def sampler_label(exp: experiment.Experiment) -> str:
    s, kw = exp.sampling, exp.sampling.kwargs
    if s.method == "pc":
        corrector = kw.get("corrector")
        return (f"pc {s.pc_levels or exp.sde.N} ({kw.get('predictor')}"
                + (f" + {corrector}" if corrector else "") + ")")
    if s.method == "dpm_solver":
        return f"dpm_solver++ {kw.get('order', 2)}M {kw.get('steps', 20)}"
    if s.method == "edm":
        return f"edm heun {kw.get('steps', 18)}"
    return s.method


def throughput_table(args) -> None:
    mesh = data_mesh()
    print(f"\nSampling one batch of {args.batch} 32x32x3 images, width "
          f"{args.width or 'as in the paper'}, network in {args.dtype}; median of up to "
          f"{args.repeats} runs after an ahead-of-time compile. GFLOP/img = XLA's forward count "
          f"x NFE; peak = the device's peak_bytes_in_use so far in this process.\n")
    header = (f"| {'network':<7} | {'sampler':<34} | {'NFE':>5} | {'compile s':>9} | "
              f"{'s/batch':>8} | {'img/s':>8} | {'GFLOP/img':>9} | {'TFLOP/s':>7} | "
              f"{'peak GiB':>9} |")
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|", flush=True)
    for name in args.networks.split(","):
        flops = None
        for sampler in args.samplers.split(","):
            config = network_config(name, args.width, args.batch, sampler, args.pc_steps)
            exp, params = build(config, args.dtype)
            if flops is None:
                flops = forward_flops(exp, params, args.batch) / args.batch
            r = time_sampler(exp, params, mesh, args.batch, args.repeats, args.case_seconds)
            gflop = flops * r["nfe"] / 1e9
            cells = [f"{name:<7}", f"{sampler_label(exp):<34}", f"{r['nfe']:5d}",
                     f"{r['compile_s']:9.1f}", f"{r['batch_s']:8.3f}",
                     f"{args.batch / r['batch_s']:8.1f}", f"{gflop:9.1f}",
                     f"{gflop * args.batch / r['batch_s'] / 1e3:7.3g}",
                     f"{fmt_gib(peak_device_bytes()):>9}"]
            print("| " + " | ".join(cells) + " |", flush=True)


def random_inception_weights(path: str) -> str:
    """Writes random weights of the FID Inception network's shapes, in the converted format
    (`inception_weights.load_params`), to `path`: the same cost as the real ones, meaningless
    values. For a machine without the converted weights (they are 87 MB and fetched with pip)."""
    from diffusion.metrics import inception

    shapes = jax.eval_shape(inception.InceptionV3().init, jax.random.key(0),
                            jax.numpy.zeros((1, inception.INPUT_SIZE, inception.INPUT_SIZE, 3)))
    rng = np.random.default_rng(0)
    state = {}
    for path_keys, leaf in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]:
        names = [k.key for k in path_keys]
        if names[-1] != "kernel":
            continue
        module = ".".join(names[:-1])
        h, w, i, o = leaf.shape                                 # HWIO -> the export's OIHW
        state[f"{module}.weight"] = (rng.standard_normal((o, i, h, w), np.float32)
                                     * np.float32(np.sqrt(2.0 / (h * w * i))))
        state[f"{module}.beta"] = np.zeros(o, np.float32)
        state[f"{module}.mean"] = np.zeros(o, np.float32)
        state[f"{module}.var"] = np.ones(o, np.float32)
    np.savez(path, **state)
    return path


def fid_wall_time(args) -> None:
    """Times sampling + Inception statistics + FID / KID of --fid_samples, as evaluation runs it."""
    mesh = data_mesh()
    sampler = None if args.fid_sampler == "config" else args.fid_sampler
    batch = args.fid_batch or args.batch
    config = network_config(args.fid_network, args.width, batch, sampler, args.pc_steps)
    if args.inception_batch:
        config.eval.fid_batch_size = args.inception_batch
    if args.inception_weights == "random":
        import tempfile

        config.eval.inception_weights = random_inception_weights(
            os.path.join(tempfile.mkdtemp(), "random_inception.npz"))
        print("FID timing with random Inception weights of the real shapes (same cost; the "
              "FID values are meaningless)", flush=True)
    elif args.inception_weights:
        config.eval.inception_weights = args.inception_weights
    exp, params = build(config, args.dtype)
    extractor = make_inception_extractor(exp.eval, mesh)
    inverse = data_lib.inverse_scaler(exp.data.centered)
    key = exp.key("fid")

    # Warm-up (compiles), then one timed batch of each to size the run.
    t0 = time.perf_counter()
    for _ in range(2):
        t1 = time.perf_counter()
        x, nfe = next(generate.sample_batches(exp, params, mesh, batch, key))
    sample_per_image = (time.perf_counter() - t1) / batch
    pixels0 = metrics.fid.to_pixels(inverse(x))
    inception_batch = extractor.batch_size
    probe = np.resize(pixels0, (inception_batch, *pixels0.shape[1:]))
    for _ in range(2):
        t1 = time.perf_counter()
        extractor(probe)
    inception_per_image = (time.perf_counter() - t1) / inception_batch
    warmup_s = time.perf_counter() - t0
    per_image = sample_per_image + inception_per_image
    n = args.fid_samples
    if args.fid_budget_s > 0 and n * per_image > args.fid_budget_s:
        n = max(batch, int(args.fid_budget_s / per_image) // batch * batch)
        print(f"FID: {args.fid_samples} samples would take about {args.fid_samples * per_image:.0f}"
              f" s at the warm-up rate ({per_image * 1e3:.2f} ms per image) > --fid_budget_s "
              f"{args.fid_budget_s:g}: timing {n} and extrapolating.", flush=True)

    sample_s = 0.0

    def pixels():       # eval_sample_quality's loop, with the time inside the sampler counted
        nonlocal sample_s
        batches = generate.sample_batches(exp, params, mesh, n, key)
        while True:
            t1 = time.perf_counter()
            try:
                x, _ = next(batches)
            except StopIteration:
                return
            sample_s += time.perf_counter() - t1
            if not np.all(np.isfinite(x)):
                print("warning: non-finite samples (random weights)", file=sys.stderr)
            yield metrics.fid.to_pixels(inverse(x))

    t0 = time.perf_counter()
    stats = extractor.stats(pixels(), max_keep=max(exp.eval.kid_subset_size, 10_000))
    stream_s = time.perf_counter() - t0
    t0 = time.perf_counter()     # against itself: the cost of FID / KID, not a value
    metrics.sample_quality(stats, stats, exp.eval.kid_subsets, exp.eval.kid_subset_size,
                           exp.eval.is_splits)
    score_s = time.perf_counter() - t0
    total = stream_s + score_s
    full = args.fid_samples
    extrapolated = stream_s * full / n + score_s     # FID / KID cost does not grow with n
    print(f"\nFID evaluation: {n} samples of {args.fid_network} ({sampler_label(exp)}, NFE {nfe}, "
          f"network in {args.dtype}) in batches of {batch}, Inception batch {inception_batch}; "
          f"warm-up (compiling sampler, Inception) {warmup_s:.1f} s, not counted.\n")
    print(f"| {'samples':>7} | {'sampling s':>10} | {'Inception s':>11} | {'FID/KID s':>9} | "
          f"{'total s':>8} | {'img/s':>7} | {f'{full} extrapolated s':>22} | {'peak GiB':>9} |")
    print(f"|{'-' * 9}|{'-' * 12}|{'-' * 13}|{'-' * 11}|{'-' * 10}|{'-' * 9}|{'-' * 24}|"
          f"{'-' * 11}|")
    print(f"| {n:7d} | {sample_s:10.1f} | {stream_s - sample_s:11.1f} | {score_s:9.1f} | "
          f"{total:8.1f} | {n / total:7.1f} | {extrapolated:22.0f} | "
          f"{fmt_gib(peak_device_bytes()):>9} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--networks", default="ddpmpp,ncsnpp", help=f"of {list(NETWORKS)}")
    parser.add_argument("--samplers", default="dpm_solver,edm,pc", help=f"of {list(SAMPLERS)}")
    parser.add_argument("--batch", type=int, default=128, help="images per sampler call")
    parser.add_argument("--width", type=int, default=-1,
                        help="the networks' nf (0: the paper's 128; default 0 on GPU/TPU, "
                             "16 on CPU)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--pc_steps", type=int, default=0, help="pc steps (0: sde.N = 1000)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (median)")
    parser.add_argument("--case_seconds", type=float, default=30.0,
                        help="no further repeats of a row once this much time has passed")
    parser.add_argument("--fid_samples", type=int, default=-1,
                        help="samples of the FID timing (0: skip; default 50000 on GPU/TPU, "
                             "0 on CPU)")
    parser.add_argument("--fid_network", default="ddpmpp", choices=list(NETWORKS))
    parser.add_argument("--fid_sampler", default="config",
                        help="'config' (the paper config's: pc 1000) or one of SAMPLERS")
    parser.add_argument("--fid_batch", type=int, default=0, help="sampling batch (0: --batch)")
    parser.add_argument("--inception_batch", type=int, default=0,
                        help="Inception batch (0: the config's eval.fid_batch_size, 200)")
    parser.add_argument("--inception_weights", default="",
                        help="converted weights (default ~/.cache/diffusion/...), or 'random'")
    parser.add_argument("--fid_budget_s", type=float, default=0.0,
                        help="fewer FID samples if --fid_samples would take longer (0: no cap)")
    parser.add_argument("--skip_table", action="store_true", help="only the FID timing")
    args = parser.parse_args()
    for name in args.networks.split(","):
        if name not in NETWORKS:
            parser.error(f"unknown network {name!r}: use {list(NETWORKS)}")
    for name in args.samplers.split(",") + ([] if args.fid_sampler == "config"
                                             else [args.fid_sampler]):
        if name not in SAMPLERS:
            parser.error(f"unknown sampler {name!r}: use {list(SAMPLERS)}")
    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    args.width = (16 if on_cpu else 0) if args.width < 0 else args.width
    args.fid_samples = (0 if on_cpu else 50_000) if args.fid_samples < 0 else args.fid_samples
    print(f"{jax.device_count()} x {device.platform} ({device.device_kind}), "
          f"{os.cpu_count()} CPU cores, jax {jax.__version__}", flush=True)
    if not args.skip_table:
        throughput_table(args)
    if args.fid_samples > 0:
        if args.fid_samples < (args.fid_batch or args.batch):
            parser.error("--fid_samples must be at least one sampling batch")
        fid_wall_time(args)
    elif not math.isclose(args.fid_budget_s, 0.0):
        print("--fid_budget_s without --fid_samples: no FID timing", flush=True)


if __name__ == "__main__":
    main()
