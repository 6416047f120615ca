"""Shared test set-up: 4 fake CPU devices, strict numerics, and an x64 fixture.

The fake devices (set before JAX initialises) make every training test exercise the sharded
data-parallel path, as on a multi-GPU machine.
"""

import os

# --xla_backend_optimization_level=0: the tests' programs are small and mostly compiled once, so
# LLVM's optimisation costs more than it saves (measured on 2 cores from a cold compilation
# cache: a CIFAR smoke train step compiles in 32 s instead of 54 s; the suite took 1124 s
# instead of 1306 s, though compute-bound tests such as the sliced-Wasserstein ones run slower).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4"
                           + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def x64():
    """Runs one test in float64 (closed-form comparisons and convergence orders)."""
    with jax.enable_x64(True):
        yield

# Identical programs compiled by several tests (each run of the training loop builds its step
# anew) are compiled once and then read from this cache.
_CACHE = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"diffusion-jax-cache-{os.getuid()}")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def inception_weights():
    """The converted FID Inception weights at their default path, which
    `python scripts/convert_inception.py` (run by .ci/run) writes. Where they are missing the
    test is skipped, naming that command; under CI (env CI set) it fails instead, so CI cannot
    skip these tests silently."""
    from diffusion.metrics.inception_weights import default_weights_path

    path = default_weights_path()
    if not os.path.exists(path):
        message = (f"no converted Inception weights at {path}; run "
                   f"`python scripts/convert_inception.py` once")
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI is set: .ci/run converts them before the tests)")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """`smoke_run(name) -> (config, workdir)`: experiments/<name>.py:smoke (a name "x:v" is
    experiments/x.py:v,smoke) trained once per session (in mock tfds data where it is not
    embedded), shared by the tests that sample and evaluate it. Each call returns a fresh
    config. Tests may add samples and eval records to the workdir; to train on or damage it,
    copy it first (`shutil.copytree`)."""
    import importlib

    from diffusion import train
    from tests.helpers import data_context

    workdirs = {}

    def run(name: str):
        module, _, variant = name.partition(":")     # "digits:flow" -> digits.py:flow,smoke
        config = importlib.import_module(f"experiments.{module}").get_config(
            f"{variant},smoke" if variant else "smoke")
        if name not in workdirs:
            workdir = str(tmp_path_factory.mktemp(f"smoke_{name.replace(':', '_')}"))
            with data_context(config):
                train.train_and_evaluate(config, workdir)
            workdirs[name] = workdir
        return config, workdirs[name]

    return run


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`--dist loadgroup`), the tests that use `smoke_run` share one worker,
    so each smoke experiment is trained once per session, not once per worker."""
    for item in items:
        if "smoke_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("smoke_runs"))
