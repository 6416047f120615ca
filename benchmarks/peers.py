"""This codebase against the JAX diffusion libraries on PyPI, on the same work, in one table.

    python benchmarks/peers.py                                       # peers importable here
    python benchmarks/peers.py --peer_python /path/to/peers-venv/bin/python
    python benchmarks/peers.py --quick                                # fewer steps, a smoke run

It installs nothing. The peers live in their own venv (their pins clash with ours; the README
of benchmarks/ says how to make it); each library runs in a fresh subprocess of its interpreter
(`--worker NAME`), ours with this one, so every row starts from the same state (no compilation
cache, one CPU device, the default XLA flags), and a peer that is not importable is reported
as such.

The work (VP SDE, beta 0.1 .. 20, T = 1, float32):
  train_mlp   2-D data, an MLP of about 133k parameters, batch 512: training steps/s.
  train_unet  16x16x1 images, a U-Net of 165k-195k parameters, batch 128: training steps/s.
  em          reverse-SDE Euler-Maruyama, 1000 steps from T to 1e-3, 10,000 2-D points.
  ode         probability-flow ODE sampling of 10,000 2-D points to t = 1e-3.
  likelihood  exact log-likelihood (exact divergence) of 10,000 2-D points at t = 1e-5.
Training steps/s is the median of 3 repeats of K steps after the first (compiling) call; a
training step is what the library's own training loop runs per step (its jitted step, and the
EMA update where the loop does one). The sampling tasks use the exact score of Gaussian data
N(MU, diag S^2), so the probability-flow ODE has a closed-form solution and the density a
closed form: the table gives each library's error against them (RMS distance to the exact ODE
solution from the same prior draw; mean |log p - exact| in nats), so speed is compared at a
stated accuracy. Times are medians of 3 calls after the compiling one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

LIBRARIES = ("ours", "diffusionjax", "sbgm")
TASKS = ("train_mlp", "train_unet", "em", "ode", "likelihood")
BETA_MIN, BETA_MAX = 0.1, 20.0
MU, S = (1.0, -0.5), (0.5, 1.0)          # the Gaussian data of the sampling tasks
N_POINTS, EM_STEPS = 10_000, 1000
SAMPLE_EPS, LIKELIHOOD_EPS = 1e-3, 1e-5
TOLERANCES = (1e-5, 1e-6, 1e-7, 1e-8)   # ours: adaptive rtol = atol; 1e-5 is the default
MLP_BATCH, UNET_BATCH, IMAGE = 512, 128, 16


# --------------------------------------------------------------------------- shared closed forms
# Written with jax.numpy only: the peers' workers import no module of this codebase.

def _alpha(t):
    import jax.numpy as jnp
    return jnp.exp(-0.25 * t**2 * (BETA_MAX - BETA_MIN) - 0.5 * t * BETA_MIN)


def _marginal(t):
    """Mean and std (each (B, 2), or (1, 2) for a scalar t) of p_t for data N(MU, diag S^2)
    under the VP SDE."""
    import jax.numpy as jnp
    a = _alpha(jnp.asarray(t)).reshape(-1, 1)
    mu, s = jnp.asarray(MU)[None], jnp.asarray(S)[None]
    return a * mu, jnp.sqrt(a**2 * s**2 + 1.0 - a**2)


def exact_score(x, t):
    """Score of p_t at x (B, 2), t (B,) or scalar."""
    mean, std = _marginal(t)
    return -(x - mean) / std**2


def exact_flow(z, t):
    """The probability-flow ODE's solution at time t from z at T = 1: for Gaussian data it is
    the affine map x_t = m_t + (s_t / s_T)(z - m_T), per dimension."""
    m1, s1 = _marginal(1.0)
    mt, st = _marginal(t)
    return mt + st / s1 * (z - m1)


def exact_log_density(x, t):
    import jax.numpy as jnp
    from jax.scipy.stats import norm
    mean, std = _marginal(t)
    return jnp.sum(norm.logpdf(x, mean, std), axis=-1)


def gaussian_points(key, n=N_POINTS):
    import jax
    import jax.numpy as jnp
    return jnp.asarray(MU)[None] + jnp.asarray(S)[None] * jax.random.normal(key, (n, 2))


def median_seconds(fn, *args, repeats=3):
    """Median wall time of `fn(*args)` over `repeats` calls after a first (compiling) one; and
    the first call's output."""
    import jax
    import numpy as np
    out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def steps_per_second(step, carry, steps, repeats=3):
    """Median steps/s of `carry = step(carry)` over `repeats` runs of `steps` steps, after one
    compiling step."""
    import jax
    import numpy as np
    carry = jax.block_until_ready(step(carry))
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            carry = step(carry)
        jax.block_until_ready(carry)
        rates.append(steps / (time.perf_counter() - t0))
    return float(np.median(rates))


def _count(tree) -> int:
    import jax
    return int(sum(x.size for x in jax.tree.leaves(tree) if hasattr(x, "size")))


def _sampling_errors(z, x, nfe):
    """Report of an ODE sample x (from prior draw z): RMS distance to the exact solution."""
    import jax.numpy as jnp
    err = jnp.sqrt(jnp.mean(jnp.sum((x - exact_flow(z, SAMPLE_EPS)) ** 2, axis=-1)))
    return {"error": float(err), "nfe": int(nfe)}


def _likelihood_errors(x, logp, nfe):
    """Mean |log p - exact| of a likelihood solve, where "exact" is what an exact solve gives
    with the libraries' N(0, I) prior at T (the true p_T differs from it by about 5e-3 nats
    here): log p_eps(x) - log p_T(z) + log N(z; 0, I), z the exact flow of x to T."""
    import jax.numpy as jnp
    from jax.scipy.stats import norm
    m_eps, s_eps = _marginal(LIKELIHOOD_EPS)
    m1, s1 = _marginal(1.0)
    z = m1 + s1 / s_eps * (x - m_eps)
    reference = (exact_log_density(x, LIKELIHOOD_EPS) - exact_log_density(z, 1.0)
                 + jnp.sum(norm.logpdf(z), axis=-1))
    err = jnp.mean(jnp.abs(logp - reference))
    return {"error": float(err), "nfe": int(nfe)}


# --------------------------------------------------------------------------- this codebase

def ours(task: str, steps: int) -> dict:
    import jax
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from diffusion import likelihood, train
    from diffusion import sde as sde_lib
    from diffusion.experiment import build
    from diffusion.sampling import ode, pc
    from experiments import digits, toy_2d

    if task in ("train_mlp", "train_unet"):
        if task == "train_mlp":   # diffusionjax's MLP: 3 hidden layers of 256 with ReLU and the
            config = toy_2d.get_config()   # noise embedding at the input (137k parameters)
            config.model.update(hidden=256, embed_at="input", embed_dim=16, activation="relu")
            config.training.batch_size = MLP_BATCH
            shape = (MLP_BATCH, 2)
        else:                      # 177k parameters
            config = digits.get_config()
            config.data.image_size = IMAGE
            config.model.update(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))
            config.training.batch_size = UNET_BATCH
            shape = (UNET_BATCH, IMAGE, IMAGE, 1)
        exp = build(config, shape_only_data=True)
        mesh = train.data_mesh()
        state = train.init_train_state(exp, mesh)
        step_fn = train.make_train_step(exp.loss_fn, exp.tx, config.model.ema_rate, mesh,
                                        config.model.ema_warmup)
        batch = train.put_batch({"x": np.asarray(
            jax.random.normal(jax.random.key(1), (1, *shape)))}, mesh)
        key = jax.random.key(0)
        rate = steps_per_second(lambda s: step_fn(s, batch, key)[0], state, steps)
        return {"steps_per_s": rate, "params": _count(state.params)}

    sde = sde_lib.VPSDE(BETA_MIN, BETA_MAX)
    if task == "em":
        fn = jax.jit(lambda k: pc.pc_sample(k, sde, exact_score, (N_POINTS, 2),
                                            n_steps=EM_STEPS, eps=SAMPLE_EPS)[0])
        seconds, _ = median_seconds(fn, jax.random.key(0))
        return {"seconds": seconds, "nfe": EM_STEPS}
    # The adaptive solvers at several tolerances (rtol = atol): the first is the default,
    # score_sde's 1e-5; the table compares each peer with our fastest one at least as accurate.
    settings = []
    for tol in TOLERANCES:
        if task == "ode":
            z = jax.random.normal(jax.random.key(0), (N_POINTS, 2))
            fn = jax.jit(lambda z, tol=tol: ode.ode_sample(
                None, sde, exact_score, z.shape, rtol=tol, atol=tol, eps=SAMPLE_EPS, z=z))
            seconds, (x, nfe) = median_seconds(fn, z)
            report = _sampling_errors(z, x, nfe)
        elif task == "likelihood":
            x = gaussian_points(jax.random.key(2))
            fn = jax.jit(lambda x, tol=tol: likelihood.log_likelihood(
                jax.random.key(0), sde, exact_score, x, divergence="exact", rtol=tol, atol=tol,
                eps=LIKELIHOOD_EPS))
            seconds, (logp, nfe) = median_seconds(fn, x)
            report = _likelihood_errors(x, logp, nfe)
        else:
            raise ValueError(task)
        settings.append({"seconds": seconds, "tolerance": tol, **report})
    return {**settings[0], "settings": settings}


# --------------------------------------------------------------------------- diffusionjax 0.1.8

def diffusionjax(task: str, steps: int) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax
    # run_lib (the training step) imports torch's DataLoader at module level for its data
    # loaders; none is used here, so an empty stand-in is registered when torch is absent.
    try:
        import torch  # noqa: F401
    except ImportError:
        import types
        data = types.ModuleType("torch.utils.data")
        data.DataLoader = object
        sys.modules.update({"torch": types.ModuleType("torch"),
                            "torch.utils": types.ModuleType("torch.utils"),
                            "torch.utils.data": data})
    from diffusionjax import run_lib, solvers, utils
    from diffusionjax import sde as sde_lib

    sde = sde_lib.VP(*utils.get_linear_beta_function(BETA_MIN, BETA_MAX))
    if task in ("train_mlp", "train_unet"):
        ts, _ = utils.get_times(num_steps=1000, t0=1e-5)
        solver = solvers.EulerMaruyama(sde, ts)
        if task == "train_mlp":
            # diffusionjax/models.py (its MLP) is shadowed by the package diffusionjax/models/
            # in the 0.1.8 wheel, so it is loaded from its file.
            import importlib.util

            import diffusionjax
            path = os.path.join(os.path.dirname(diffusionjax.__file__), "models.py")
            spec = importlib.util.spec_from_file_location("diffusionjax_mlp", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            model, shape = module.MLP(), (MLP_BATCH, 2)
        else:   # the EDM2 U-Net of diffusionjax.models (NCHW), 164k parameters
            from diffusionjax.models.networks_edm2 import UNet

            class EDM2(nn.Module):
                @nn.compact
                def __call__(self, x, t):
                    return UNet(img_resolution=IMAGE, img_channels=1, label_dim=0,
                                model_channels=16, channel_mult=(1, 2), num_blocks=1,
                                attn_resolutions=(8,), channels_per_head=16)(x, t, None)

            model, shape = EDM2(), (UNET_BATCH, 1, IMAGE, IMAGE)
        batch = jax.random.normal(jax.random.key(1), shape)
        params = model.init(jax.random.key(0), batch, jnp.ones(shape[0]))
        # run_lib.get_optimizer with grad_clip 1 and no warm-up: clip, then Adam.
        optimizer = optax.chain(optax.clip(1.0), optax.adam(1e-3))
        loss = utils.get_loss(sde, solver, model, score_scaling=True, likelihood_weighting=False)
        step_fn = run_lib.get_step_fn(loss, optimizer, train=True, pmap=False)
        carry = (jax.random.key(0), params, optimizer.init(params))
        rate = steps_per_second(lambda c: step_fn(c, batch)[0], carry, steps)
        return {"steps_per_s": rate, "params": _count(params)}

    if task == "em":
        ts, _ = utils.get_times(num_steps=EM_STEPS, t0=SAMPLE_EPS)
        solver = solvers.EulerMaruyama(sde.reverse(exact_score), ts)
        sampler = jax.jit(utils.get_sampler((N_POINTS, 2), solver, denoise=True))
        seconds, _ = median_seconds(lambda k: sampler(k)[0], jax.random.key(0))
        return {"seconds": seconds, "nfe": EM_STEPS}
    return {"missing": "no probability-flow ODE sampler or likelihood"}


# --------------------------------------------------------------------------- sbgm 0.0.38

def sbgm(task: str, steps: int) -> dict:
    import types

    import jax
    import jax.numpy as jnp
    # sbgm/__init__ imports sbgm.data, whose loaders need torch / torchvision; none of the work
    # here reads data through it, so it is replaced by an empty module when torch is absent.
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.modules.setdefault("sbgm.data", types.ModuleType("sbgm.data"))
    import equinox as eqx
    import optax
    import sbgm
    from sbgm import _ode, _sample, _train

    def beta_integral(t):
        return BETA_MIN * t + 0.5 * (BETA_MAX - BETA_MIN) * t**2

    def vp(t0, dt=0.01):
        return sbgm.sde.VPSDE(beta_integral, dt=dt, t0=t0, t1=1.0)

    class Exact(eqx.Module):
        """The analytic score in sbgm's model interface (one example at a time)."""

        def __call__(self, t, x, q=None, a=None, *, key=None):
            return exact_score(x[None], t)[0]

    if task in ("train_mlp", "train_unet"):
        if task == "train_mlp":   # 3 hidden layers of 256 (depth 2 + the input layer): 134k
            model = sbgm.models.ResidualNetwork(2, 256, 2, key=jax.random.key(0))
            shape = (MLP_BATCH, 2)
        else:                      # 193k parameters
            # (random Fourier time features: sbgm 0.0.38's sinusoidal embedding returns a
            # (2, dim / 2) array that its next layer cannot take, with einx 0.3.0 as pinned)
            model = sbgm.models.UNet(dim=16, dim_mults=(1, 2), channels=1, attn_heads=2,
                                     attn_dim_head=16, random_fourier_features=True,
                                     key=jax.random.key(0))
            shape = (UNET_BATCH, 1, IMAGE, IMAGE)
        sde = vp(1e-5)
        x = jax.random.normal(jax.random.key(1), shape)
        opt = optax.adam(1e-3)    # sbgm's configs: optax.adam
        carry = (model, model, jax.random.key(0), opt.init(eqx.filter(model, eqx.is_array)))

        def step(carry):           # one iteration of sbgm's train loop: make_step, then the EMA
            model, ema, key, opt_state = carry
            _, model, key, opt_state = _train.make_step(model, sde, (x, None, None), key,
                                                        opt_state, opt)
            return model, _train.apply_ema(ema, model), key, opt_state

        rate = steps_per_second(step, carry, steps)
        return {"steps_per_s": rate, "params": _count(eqx.filter(model, eqx.is_array))}

    model = Exact()
    if task == "em":
        sde = vp(SAMPLE_EPS)
        one = _sample.get_eu_sample_fn(model, sde, (2,), T_sample=EM_STEPS)
        fn = jax.jit(jax.vmap(lambda k: one(k)))
        keys = jax.random.split(jax.random.key(0), N_POINTS)
        seconds, _ = median_seconds(fn, keys)
        return {"seconds": seconds, "nfe": EM_STEPS}
    if task == "ode":   # sbgm's sampler: Tsit5 at fixed dt = sde.dt (0.01) from the prior draw
        sde = vp(SAMPLE_EPS)
        term, solver = _ode.get_ode(model, sde), _ode.get_solver()

        def one(z):
            import diffrax
            sol = diffrax.diffeqsolve(diffrax.ODETerm(lambda t, y, args: term(y, t)), solver,
                                      sde.t1, sde.t0, -sde.dt, z)
            return sol.ys[0], sol.stats["num_steps"]

        z = jax.random.normal(jax.random.key(0), (N_POINTS, 2))
        fn = jax.jit(jax.vmap(one))
        seconds, (x, n) = median_seconds(fn, z)
        # Check that this is sbgm's own sampler: same result as single_ode_sample_fn from z.
        return {"seconds": seconds, **_sampling_errors(z, x, 6 * int(n[0]) + 1)}
    if task == "likelihood":
        sde = vp(LIKELIHOOD_EPS)
        one = _ode.get_log_likelihood_fn(model, sde, data_shape=(2,), exact_log_prob=True)
        x = gaussian_points(jax.random.key(2))
        fn = jax.jit(jax.vmap(lambda x: one(x)))
        seconds, logp = median_seconds(fn, x)
        # Tsit5 (6 stages; FSAL not exploited) at dt = sde.dt over [eps, 1].
        nfe = 6 * int(jnp.ceil((sde.t1 - sde.t0) / sde.dt)) + 1
        return {"seconds": seconds, **_likelihood_errors(x, logp, nfe)}
    raise ValueError(task)


WORKERS = {"ours": ours, "diffusionjax": diffusionjax, "sbgm": sbgm}


# --------------------------------------------------------------------------- the driver

def run_worker(name: str, tasks: list[str], steps: dict[str, int]) -> None:
    """Runs the tasks of one library in this process and prints one JSON line per task."""
    import jax
    info = {"jax": jax.__version__, "device": jax.devices()[0].device_kind}
    for task in tasks:
        try:
            result = WORKERS[name](task, steps.get(task, 0))
        except ImportError as e:
            result = {"missing": f"not importable ({e})"}
        except Exception as e:   # noqa: BLE001 (one failing peer must not end the table)
            result = {"failed": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        print(json.dumps({"task": task, **info, **result}), flush=True)


def collect(name: str, python: str, tasks: list[str], quick: bool) -> dict[str, dict]:
    cmd = [python, os.path.abspath(__file__), "--worker", name, "--tasks", ",".join(tasks)]
    if quick:
        cmd.append("--quick")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    print(f"running {name} with {python} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            results[record["task"]] = record
    if not results:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        results = {t: {"missing": f"not importable with {python}: {tail[:160]}"} for t in tasks}
    return results


def _timing(record: dict) -> str:
    extra = [f"{record['nfe']} NFE"]
    if "error" in record:
        extra.append(f"error {record['error']:.1e}")
    if "tolerance" in record:
        extra.append(f"tol {record['tolerance']:.0e}")
    return f"{record['seconds']:.3f} s ({', '.join(extra)})"


def _cell(record: dict) -> str:
    if "steps_per_s" in record:
        return f"{record['steps_per_s']:.1f} steps/s ({record['params'] / 1e3:.0f}k params)"
    if "seconds" in record:
        return _timing(record)
    return record.get("missing") or record.get("failed", "?")


def _matched(ours_record: dict, peer: dict) -> dict:
    """Our fastest setting at least as accurate as the peer (else our most accurate one)."""
    settings = ours_record.get("settings")
    if not settings or "error" not in peer:
        return ours_record
    good = [s for s in settings if s["error"] <= peer["error"]]
    if good:
        return min(good, key=lambda s: s["seconds"])
    return min(settings, key=lambda s: s["error"])


def _ratio(ours_record: dict, peer: dict) -> str:
    """How many times faster this codebase is than the peer (> 1: ours is faster); for the
    adaptive solvers at the peer's accuracy, with that setting of ours named."""
    if "steps_per_s" in ours_record and "steps_per_s" in peer:
        return f"{ours_record['steps_per_s'] / peer['steps_per_s']:.2f}x"
    if "seconds" in ours_record and "seconds" in peer:
        mine = _matched(ours_record, peer)
        ratio = f"{peer['seconds'] / mine['seconds']:.2f}x"
        return ratio + (f" (ours at {_timing(mine)})" if mine is not ours_record else "")
    return "-"


def table(results: dict[str, dict[str, dict]], tasks: list[str]) -> str:
    """Markdown: one column per library (label), then ours against each peer."""
    peers = [label for label in results if label != "ours"]
    head = ["task", *results, *(f"ours vs {p}" for p in peers)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task in tasks:
        row = [task, *(_cell(r[task]) for r in results.values())]
        if "ours" in results:
            row += [_ratio(results["ours"][task], results[p][task]) for p in peers]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _label(name: str, python: str, record: dict, default_python: str) -> str:
    """'sbgm', or 'sbgm (jax 0.4.33)' for a library run with another interpreter than the
    other peers."""
    if name == "ours" or python == default_python or "jax" not in record:
        return name
    return f"{name} (jax {record['jax']})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer_python", default=sys.executable,
                        help="the interpreter of the venv the peers are installed in")
    parser.add_argument("--libraries", default=",".join(LIBRARIES),
                        help="comma-separated; NAME=PYTHON runs that library with another "
                             "interpreter, e.g. sbgm=/path/old-venv/bin/python (a column of its "
                             "own: the same library on another jax)")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--quick", action="store_true", help="fewer training steps (a smoke run)")
    parser.add_argument("--worker", choices=LIBRARIES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        parser.error(f"unknown task(s) {unknown}: choose from {list(TASKS)}")
    steps = {"train_mlp": 20 if args.quick else 200, "train_unet": 2 if args.quick else 10}
    if args.worker:
        run_worker(args.worker, tasks, steps)
        return
    results = {}
    for spec in args.libraries.split(","):
        name, _, python = spec.partition("=")
        if name not in LIBRARIES:
            parser.error(f"unknown library {name!r}: choose from {list(LIBRARIES)}")
        python = python or (sys.executable if name == "ours" else args.peer_python)
        runs = collect(name, python, tasks, args.quick)
        results[_label(name, python, next(iter(runs.values())), args.peer_python)] = runs
    versions = ", ".join(f"{label}: jax {next(iter(r.values())).get('jax', '?')}"
                         for label, r in results.items())
    device = next(iter(next(iter(results.values())).values())).get("device", "?")
    print(f"\n{os.cpu_count()} CPU cores ({device}); {versions}")
    print(table(results, tasks))


if __name__ == "__main__":
    main()
