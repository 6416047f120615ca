"""Every experiment's smoke variant runs train -> checkpoint -> sample -> eval end to end."""

import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from diffusion import data as data_lib
from diffusion import evaluate as evaluate_lib
from diffusion import experiment as experiment_lib
from diffusion import train
from tests.helpers import data_context

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The default suite trains, samples and evaluates the U-Net on embedded images and the MLP on 2-D
# points, and reads a built tfds dataset through the CIFAR-10 config's input path
# (test_cifar_config_reads_a_built_tfds_dataset_in_worker_processes); training on it
# (test_cifar_config_trains_on_a_built_tfds_dataset_with_worker_processes) and DDPM++ sampled
# and evaluated on tfds images run with -m slow (a minute each on 2 cores). The others repeat
# those loops with another SDE / loss / network preset (their pieces are tested on their own) and
# run with -m slow.
EXPERIMENTS = [("digits", False), ("toy_2d", False), ("digits:dit", False),
               pytest.param("vp_cifar", False, marks=pytest.mark.slow),
               # FID / KID of the digits smoke run (the Inception network at 299 x 299 compiles
               # for a minute on 2 cores): with the slow set, as are the 2-process FID test and
               # the other SDE / loss / network presets.
               pytest.param("digits", True, marks=pytest.mark.slow),
               *(pytest.param(name, False, marks=pytest.mark.slow)
                 for name in ("ddpm_cifar", "iddpm_cifar", "ict_cifar", "ve_cifar", "subvp_cifar",
                              "edm_cifar", "digits:flow", "digits:v", "digits:edm",
                              "digits:hybrid", "digits:ct", "dit_cifar", "uvit_cifar",
                              "digits:uvit"))]
# Higher resolutions: their smoke variants are only trained (and checkpointed), to save time.
TRAIN_ONLY = ["vp_celeba64", "ve_celebahq256"]


@pytest.mark.parametrize("name, fid", EXPERIMENTS)
def test_smoke_variant_trains_samples_and_evaluates(name, fid, smoke_run, request, monkeypatch):
    config, workdir = smoke_run(name)          # trained once per session, shared
    # FID / KID for the digits only: the Inception network compiles per input shape, and the
    # code path is the same for every image dataset.
    config.eval.enable_fid = fid
    # An image model's bits/dim through the ODE (its compile is the bulk of this test) with the
    # slow, full evaluation; the protocol is tested against a closed form in test_train.py.
    is_image = bool(config.data.image_size)
    config.eval.enable_bpd = fid or not is_image
    if fid:
        try:   # FID / KID where the converted Inception weights are (CI converts them)
            config.eval.inception_weights = request.getfixturevalue("inception_weights")
        except pytest.skip.Exception:
            config.eval.enable_fid = fid = False
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(config.training.n_iters)))
    drawn = []   # the samples the evaluation draws, for the check of its 2-D distances
    if not is_image:
        draw_samples = evaluate_lib.draw_samples

        def recording_draw_samples(*args, **kwargs):
            drawn.append(draw_samples(*args, **kwargs))
            return drawn[-1]

        monkeypatch.setattr(evaluate_lib, "draw_samples", recording_draw_samples)
    with data_context(config):
        path = train.sample(config, workdir)
        record = train.evaluate(config, workdir)

    tag = experiment_lib.sampling_settings(config.sampling).guide.tag   # dit_cifar: "cfg_w0.5_"
    assert path == os.path.join(workdir, "samples", f"{tag}step_{config.training.n_iters}.npz")
    samples = np.load(path)["samples"]
    data_shape = ((config.data.image_size, config.data.image_size, config.data.num_channels)
                  if config.data.image_size else (2,))
    assert samples.shape == (config.sampling.num_samples, *data_shape)
    assert np.all(np.isfinite(samples))
    assert os.path.getsize(path[:-4] + ".png") > 0
    assert os.path.exists(os.path.join(workdir, "samples",
                                       f"train_step_{config.training.n_iters}.png"))
    with open(os.path.join(workdir, "eval.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert lines[-1] == record and record["step"] == config.training.n_iters
    assert np.isfinite(record["eval_loss"])
    if not is_image:
        assert len(drawn) == 1, "the 2-D evaluation draws its samples once"
        check_sample_distances(record, config, drawn[0][0])
    likelihood_key = "bpd" if len(data_shape) == 3 else "nll"
    if config.eval.enable_bpd:
        assert np.isfinite(record[likelihood_key]) and record["likelihood_nfe"] > 0
    else:
        assert likelihood_key not in record
    if likelihood_key in record:   # an untrained model is far from the data, but not absurd
        assert 0.0 < record.get("bpd", 1.0) < 100.0
    if not config.training.continuous and config.model.num_classes is None:
        # discrete unconditional models: DDPM's bound, on all N levels
        # (an untrained model's KL terms against the small posterior variances are large: 741
        # bits/dim for iddpm_cifar:smoke's 10-level cosine chain, 24 for digits:hybrid,smoke)
        assert np.isfinite(record["vlb_bpd"])
        assert 0.0 < record["vlb_prior_bpd"] < record["vlb_bpd"]
        assert 0.0 < record["vlb_decoder_bpd"] < record["vlb_bpd"]
    if fid:   # an untrained model's noise is far from the data in Inception space
        assert record["fid"] > 10.0 and record["kid"] > 0.0
        assert record["fid_num_samples"] == config.eval.fid_num_samples
        assert record["sampler"] == config.sampling.method and record["sampler_nfe"] > 0
        stats = os.listdir(os.path.join(workdir, "fid_stats"))
        assert len(stats) == 1 and stats[0].endswith(".npz")   # cached reference statistics


def exact_sliced_wasserstein(x, y, num_angles=720):
    """sqrt(E_theta W_2^2(theta.x, theta.y)) in 2-D by the midpoint rule over the half circle
    (720 angles: within 1e-6 of 4000), each 1-D distance the exact W_2 between the empirical
    measures (the quantile functions matched on the union of their steps, so any sizes N, M).
    float64 numpy."""
    angles = np.pi * (np.arange(num_angles) + 0.5) / num_angles
    theta = np.stack([np.cos(angles), np.sin(angles)])               # (2, A)
    px, py = np.sort(x @ theta, axis=0), np.sort(y @ theta, axis=0)
    n, m = len(x), len(y)
    steps = np.union1d(np.arange(n + 1) / n, np.arange(m + 1) / m)   # where a quantile jumps
    u, width = (steps[1:] + steps[:-1]) / 2, np.diff(steps)
    qx, qy = px[np.floor(u * n).astype(int)], py[np.floor(u * m).astype(int)]
    return float(np.sqrt(np.mean(width @ (qx - qy) ** 2)))


def unbiased_mmd2(x, y):
    """Gretton et al.'s unbiased MMD^2, Gaussian kernel with the median pooled distance as
    bandwidth. float64 numpy."""
    z = np.concatenate([x, y])
    sq = np.sum((z[:, None] - z[None]) ** 2, axis=-1)
    k = np.exp(-sq / (2.0 * np.median(sq[np.triu_indices(len(z), 1)])))
    n, m = len(x), len(y)
    off = lambda a, size: (a.sum() - np.trace(a)) / (size * (size - 1))
    return float(off(k[:n, :n], n) + off(k[n:, n:], m) - 2.0 * k[:n, n:].mean())


def check_sample_distances(record, config, samples):
    """The 2-D evaluation's distances, recomputed in numpy from the samples it drew, the eval
    split (the first 10k points) and the first training batch of as many points (its floor).

    MMD has no randomness (float32 against float64: they agree to 1e-5); the sliced Wasserstein
    distance averages over 256 random directions, whose Monte Carlo error is 2% (one sd, measured
    over 300 draws of directions for these sets; 5% at most), against the exact average here."""
    dataset = data_lib.load_dataset(config.data.dataset)
    n = min(len(dataset.eval), 10_000)
    ref = data_lib.take(dataset.eval, np.arange(n))[0].astype(np.float64)
    num = config.sampling.num_samples
    train_points = data_lib.batch_at(dataset, "train", 0, num, seed=config.seed,
                                     train=False)["x"].astype(np.float64)
    samples = np.asarray(samples, np.float64)
    assert samples.shape == (num, 2) and record["num_samples"] == num
    m = min(2000, n, num)
    np.testing.assert_allclose(record["mmd"], unbiased_mmd2(samples[:m], ref[:m]),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(record["mmd_data_floor"],
                               unbiased_mmd2(train_points[:m], ref[:m]), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(record["sliced_wasserstein"],
                               exact_sliced_wasserstein(samples, ref), rtol=0.1)
    np.testing.assert_allclose(record["sliced_wasserstein_data_floor"],
                               exact_sliced_wasserstein(train_points, ref), rtol=0.1)


@pytest.mark.slow     # 25-45 s each from a cold compilation cache; the CIFAR ones cover the code
@pytest.mark.parametrize("name", TRAIN_ONLY)
def test_high_resolution_smoke_variant_trains(name, tmp_path):
    config = importlib.import_module(f"experiments.{name}").get_config("smoke")
    config.training.snapshot_sampling = False
    with data_context(config):
        state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == config.training.n_iters
    assert (tmp_path / "checkpoints" / str(config.training.n_iters)).is_dir()


def test_cifar_config_reads_a_built_tfds_dataset_in_worker_processes(tmp_path):
    """The real input path, without a network: array_record files through tfds.data_source, PNG
    decoding, and batches prepared by spawned worker processes equal to those made in process
    (mock data does not reach those)."""
    from diffusion import data as data_lib
    from tests import synthetic_tfds

    config = importlib.import_module("experiments.vp_cifar").get_config("smoke")
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.dataset = synthetic_tfds.build(config.data.data_dir, num_train=64, num_test=8)
    data = data_lib.get_dataset(config)
    kwargs = dict(seed=1, random_flip=True, centered=True)
    expected = [data_lib.batch_at(data, "train", s, 8, **kwargs) for s in range(3)]
    with data_lib.BatchIterator(data, "train", 0, 8, num_workers=2, stop_step=3,
                                **kwargs) as batches:
        got = list(batches)
    assert len(got) == 3
    for batch, want in zip(got, expected, strict=True):
        np.testing.assert_array_equal(batch["x"], want["x"])
        np.testing.assert_array_equal(batch["label"], want["label"])
    assert got[0]["x"].shape == (8, 32, 32, 3) and -1.0 <= got[0]["x"].min() < 0.0


@pytest.mark.slow   # 25-35 s on 2 cores (the network compiles); the input path is tested above
def test_cifar_config_trains_on_a_built_tfds_dataset_with_worker_processes(tmp_path):
    """The real input path: array_record files through tfds.data_source, PNG decoding, and
    batches prepared by spawned worker processes (mock data does not reach those)."""
    from tests import synthetic_tfds

    # DDPM's U-Net (ddpm_cifar): it compiles in half the time of DDPM++, and the network is
    # not what this test is about.
    config = importlib.import_module("experiments.ddpm_cifar").get_config("smoke")
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.dataset = synthetic_tfds.build(config.data.data_dir, num_train=64, num_test=8)
    config.data.num_workers = 2
    config.training.snapshot_sampling = False
    config.training.eval_freq = 1000   # no eval step to compile: this test is about the input
    state = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert int(state.step) == config.training.n_iters
    with open(tmp_path / "run" / "train.jsonl") as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    assert losses and np.all(np.isfinite(losses))


# (method, steps, expected NFE with noise removal), as written to the .npz by `train.sample`.
SAMPLER_CASES = [("ddim", 5, 6), ("dpm_solver", 20, 21), ("edm", 0, 35), ("ode", 0, None),
                 ("pc", 7, 7)]   # pc: the final denoising is its last predictor step


# The adaptive ODE by default (pc runs in the smoke test); each sampler's algorithm is tested on
# its own in test_solvers.py / test_pc.py / test_ode.py, and all of them from the config with the
# slow set.
@pytest.mark.parametrize("method, steps, expected_nfe", [
    case if case[0] == "ode" else pytest.param(*case, marks=pytest.mark.slow)
    for case in SAMPLER_CASES])
def test_every_sampler_from_the_config(method, steps, expected_nfe, smoke_run):
    config, workdir = smoke_run("toy_2d")
    config.sampling.method, config.sampling.steps = method, steps
    path = train.sample(config, workdir)
    with np.load(path) as f:
        samples, nfe = f["samples"], int(f["nfe"])
    assert samples.shape == (config.sampling.num_samples, 2) and np.all(np.isfinite(samples))
    assert nfe == expected_nfe if expected_nfe else nfe > 6, (method, nfe)


def test_an_unknown_sampler_from_the_config(smoke_run):
    config, workdir = smoke_run("toy_2d")
    config.sampling.method = "heun"
    with pytest.raises(ValueError, match="Unknown sampler 'heun'"):
        train.sample(config, workdir)


# 30 s on 2 cores (two fresh processes compile everything); the default suite runs the same
# loops in process and scripts/run.py's flag handling in test_train.py / test_docs.py.
@pytest.mark.slow
def test_command_line_train_then_sample(tmp_path):
    """The README's entry point, as a user runs it (smoke size)."""
    base = [sys.executable, os.path.join(ROOT, "scripts", "run.py"),
            f"--config={os.path.join(ROOT, 'experiments', 'toy_2d.py')}:smoke",
            f"--workdir={tmp_path}", f"--compilation_cache_dir={tmp_path / 'jax_cache'}",
            "--compilation_cache_min_secs=0"]
    out = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "steps/s" in out.stdout and "ETA" in out.stdout
    assert any((tmp_path / "jax_cache").iterdir())   # compiled programs persisted for reuse
    out = subprocess.run(base + ["--mode=sample", "--config.sampling.method=dpm_solver",
                                 "--config.sampling.steps=20"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    samples = np.load(tmp_path / "samples" / "step_4.npz")["samples"]
    assert samples.shape == (64, 2) and np.all(np.isfinite(samples))
    assert (tmp_path / "samples" / "step_4.png").exists()
    assert "NFE 21" in out.stdout   # 20 DPM-Solver++ steps + the final denoising evaluation
