"""Golden numbers of the real training loop: two steps of a tiny fixed config (as nanodo's
tests/train_test.py).

`train.train_and_evaluate` runs the toy_2d smoke experiment for two steps: the MLP's init, the
data stream, the per-example noise, the DSM loss, its gradient, Adam, the EMA and the loop that
connects them, all as a run would. Its logged losses and gradient norms and the parameters it
returns are compared with numbers stored here, so a change anywhere on that path shows up, also
one that every other test would let pass because it changes the result and its expectation
together (a different key for the noise, a new default of a layer's init).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import experiment, train, train_state
from experiments import toy_2d

# float32 on CPU, stored with jax 0.10.2. The numbers do not depend on the device count (the step
# averages the per-device gradients, and each example's noise comes from its index) up to float
# rounding: on 1, 2, 4 and 8 devices and at XLA's optimisation levels 0 (conftest) and default
# they agree to 8e-7. XLA's rounding also differs a little between versions: rtol 1e-4 allows
# that; a real change of the computation moves them by far more.
RTOL = 1e-4

GOLDEN = {
    "loss": [0.85696065, 0.82851583],
    "grad_norm": [0.34633639, 0.42195505],
    "init_param_norm": 14.676289,
    "update_norm": 0.10389054,
    "ema_update_norm": 0.089216039,
}


def golden_config():
    """toy_2d:smoke (MLP of width 32, batch 64 of the 2-D Gaussian mixture, VP SDE, continuous
    DSM, seed 42) for two steps, each logged, without warm-up (it starts at lr 0, so the first
    update would not move the parameters), sampling or evaluation."""
    config = toy_2d.get_config("smoke")
    config.training.n_iters = 2
    config.training.log_freq = 1
    config.training.snapshot_freq = 2
    config.training.eval_freq = 0
    config.training.snapshot_sampling = False
    config.optim.warmup = 0
    return config


def _norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(leaf, np.float64)))
                             for leaf in jax.tree.leaves(tree))))


def _rounded(value):
    """8 significant digits, as pasted into GOLDEN."""
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return float(f"{value:.8g}")


def test_two_training_steps_give_the_golden_numbers(tmp_path):
    config = golden_config()
    state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 2
    with open(tmp_path / "train.jsonl") as f:
        logged = [r for r in map(json.loads, f) if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2]
    init = train_state.init_train_state(experiment.build(config), train.data_mesh())
    minus = lambda a, b: jax.tree.map(jnp.subtract, a, b)
    got = {
        "loss": [r["loss"] for r in logged],
        "grad_norm": [r["grad_norm"] for r in logged],
        "init_param_norm": _norm(init.params),
        "update_norm": _norm(minus(state.params, init.params)),
        "ema_update_norm": _norm(minus(state.ema_params, init.params)),
    }
    message = (
        "Two training steps of tests/test_golden.py:golden_config() no longer give the stored "
        "numbers. Update GOLDEN only for an intended change of the loss, the network or its "
        "init, the optimizer or EMA, the data pipeline, the RNG scheme or toy_2d's smoke "
        "variant, and say so in the commit message; never to make an unexplained difference "
        "go away (find its cause). "
        "New numbers:\nGOLDEN = {\n" + "".join(f"    {k!r}: {_rounded(v)},\n"
                                               for k, v in got.items()) + "}")
    for k, want in GOLDEN.items():
        np.testing.assert_allclose(got[k], want, rtol=RTOL, err_msg=f"{k}\n{message}")
