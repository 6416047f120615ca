"""Strict configs: every key a config sets is used, or the config is refused with a message that
names the key and lists the valid ones (diffusion.config_checks.check_config, models.get_model,
sde.get_sde). No compilation: these only build configs."""

import ast
import pathlib
import re

import pytest

from diffusion import config_checks, defaults, experiment, models
from diffusion import sde as sde_lib
from experiments import digits, toy_2d, vp_cifar


def _set(config, key: str, value):
    section, field = key.split(".")
    with config.unlocked():
        config[section][field] = value
    return config


# (config factory, key, value, what the message must say)
BAD_CONFIGS = [
    (digits, "data.image_sise", 8, r"unknown key data\.image_sise; the shared keys are \[.*"
                                   r"'image_size'"),
    (digits, "training.n_iter", 10, r"unknown key training\.n_iter;.*'n_iters'"),
    (digits, "optim.learning_rate", 1e-3, r"unknown key optim\.learning_rate;.*'lr'"),
    (digits, "eval.num_sample", 10, r"unknown key eval\.num_sample;.*'fid_num_samples'"),
    (digits, "model.chmult", (1, 2), r"unknown key model\.chmult; network 'unet' \(UNet\) takes "
                                     r"\[.*'ch_mult'"),
    (digits, "model.nf", 16, r"unknown key model\.nf; network 'unet'.*'ch'"),
    (toy_2d, "model.remat", True, r"model\.remat=True is set but not used by network 'mlp'"),
    (digits, "sde.sigma_max", 100.0, r"sde\.sigma_max=100\.0 is set but not used by SDE 'vpsde', "
                                     r"which reads \['N', 'beta_max', 'beta_min', 'name'\]"),
    (digits, "sde.beta_mn", 0.1, r"unknown key sde\.beta_mn; SDE 'vpsde' takes"),
    (digits, "sampling.stepz", 10, r"unknown key sampling\.stepz; sampler 'pc' takes"),
    (digits, "training.loss", "l2", r"training\.loss='l2' is not one of \['dsm', "
                                    r"'flow_matching', 'edm', 'hybrid', 'vlb', "
                                    r"'consistency_training', 'consistency_distillation'\]"),
    (digits, "training.t_sampling", "logit_normal", r"training\.t_sampling='logit_normal' is set "
                                                    r"but not used by the DSM loss"),
    (digits, "training.p_mean", -1.0, r"training\.p_mean=-1\.0 is set but not used by the DSM "
                                      r"loss"),
    (digits, "data.sigma_data", 0.7, r"data\.sigma_data=0\.7 is set but used only by the 'edm' "
                                     r"parameterization and loss"),
    (digits, "model.parameterization", "velocity", r"Unknown parameterization 'velocity'"),
    (digits, "sde.T", 0.9, r"unknown key sde\.T; SDE 'vpsde' takes"),
    (digits, "sampling.method", "ddpm", r"sampling\.method='ddpm' samples a discrete-time "
                                        r"model's chain \(training\.continuous=False"),
    (digits, "model.patch_size", 2, r"unknown key model\.patch_size; network 'unet'"),
    (digits, "training.n_iters", 1001, None),   # with n_jitted_steps = 5, below
    (digits, "training.likelihood_weighting", True, None),   # with continuous = False, below
]


@pytest.mark.parametrize("module, key, value, message", BAD_CONFIGS,
                         ids=[case[1] for case in BAD_CONFIGS])
def test_bad_config_is_refused_with_a_message_naming_the_key(module, key, value, message):
    config = _set(module.get_config("smoke"), key, value)
    if key == "training.n_iters":
        config.training.n_jitted_steps = 5
        config.training.log_freq = config.training.snapshot_freq = config.training.eval_freq = 5
        message = (r"training\.n_iters=1001 is not reachable in calls of "
                   r"training\.n_jitted_steps=5 steps \(the loop would stop at 1005\): use "
                   r"n_iters=1000 or 1005")
    if key == "training.likelihood_weighting":
        config.training.continuous = False
        config.sde.N = 100
        message = (r"training\.likelihood_weighting=True is set but not used by the DDPM / SMLD "
                   r"\(training\.continuous=False\) loss")
    with pytest.raises(ValueError, match=message):
        experiment.build(config)


def test_every_problem_is_listed_in_one_message():
    config = digits.get_config("smoke")
    for key, value in [("model.nf", 16), ("sde.sigma_max", 3.0), ("training.n_jitted_steps", 3)]:
        _set(config, key, value)
    with pytest.raises(ValueError) as info:
        config_checks.check_config(config)
    text = str(info.value)
    assert text.startswith("Invalid config:")
    for needle in ("model.nf", "sde.sigma_max", "training.log_freq=2 must be a multiple of "
                   "training.n_jitted_steps=3", "training.n_iters=4 is not reachable"):
        assert needle in text


def test_unknown_section_is_refused():
    config = digits.get_config("smoke")
    with config.unlocked():
        config.sampler = {"method": "ddim"}
    with pytest.raises(ValueError, match=r"unknown config section 'sampler': the sections are"):
        config_checks.check_config(config)


def test_a_sampler_setting_the_chosen_sampler_ignores_is_a_note_not_an_error():
    """The paper configs set the PC sampler's predictor and corrector; switching the sampler on
    the command line cannot delete them, so they are reported, not refused."""
    config = vp_cifar.get_config("smoke")
    config.sampling.corrector = "langevin"
    config.sampling.method = "dpm_solver"
    notes = config_checks.check_config(config)
    assert notes == ["sampling.corrector='langevin' is set but not used by sampler 'dpm_solver', "
                     "which reads ['order', 'steps'] and the shared keys"]
    config.sampling.method = "pc"
    assert config_checks.check_config(config) == []


@pytest.mark.parametrize("variant, sde, parameterization, loss", [
    ("flow", sde_lib.RectifiedFlow, "v", "flow_matching"), ("v", sde_lib.VPSDE, "v", "dsm"),
    ("edm", sde_lib.VESDE, "edm", "edm")])
def test_digits_variants_choose_process_parameterization_and_loss(variant, sde, parameterization,
                                                                   loss):
    for arg in (variant, f"{variant},smoke"):
        config = digits.get_config(arg)
        exp = experiment.build(config)
        assert type(exp.sde) is sde and exp.score_model.parameterization == parameterization
        assert config.training.loss == loss
    base, other = digits.get_config(), digits.get_config(variant)
    network = lambda c: {k: v for k, v in c.model.items() if k != "parameterization"}  # noqa: E731
    assert network(base) == network(other)      # the same network, steps and optimiser
    assert base.training.n_iters == other.training.n_iters and base.optim == other.optim
    with pytest.raises(ValueError,
                       match="at most one of \\['cd', 'ct', 'ddpm', 'edm', 'flow', 'hybrid', "
                             "'v', 'vlb'\\]"):
        digits.get_config(f"{variant},edm" if variant != "edm" else "edm,v")


def test_a_flow_loss_option_on_the_rectified_flow_with_an_edm_key_is_refused():
    config = digits.get_config("flow,smoke")
    config.training.p_std = 2.0
    with pytest.raises(ValueError, match=r"training\.p_std=2\.0 is set but not used by the "
                                         r"flow_matching loss \(training\.loss='flow_matching'\)"):
        experiment.build(config)
    config = digits.get_config("edm,smoke")
    config.model.noise_input = "log_sigma"
    with pytest.raises(ValueError, match="the 'edm' parameterization conditions the network"):
        experiment.build(config)


def test_every_experiment_config_passes_the_checks():
    import glob
    import importlib
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    names = [os.path.basename(p)[:-3] for p in glob.glob(os.path.join(root, "experiments", "*.py"))]
    checked = 0
    for name in sorted(set(names) - {"__init__", "default"}):
        module = importlib.import_module(f"experiments.{name}")
        for variant in (None, "smoke"):
            assert config_checks.check_config(module.get_config(variant)) == [], (name, variant)
            models.get_model(module.get_config(variant))
            checked += 1
    assert checked >= 16


def test_get_model_and_get_sde_refuse_keys_nobody_takes():
    config = toy_2d.get_config("smoke")
    with config.unlocked():
        config.model.hiden = 64
    with pytest.raises(ValueError, match=re.escape(
            "config.model has keys that network 'mlp' (MLP) does not take: ['hiden']")):
        models.get_model(config)
    with pytest.raises(ValueError, match=r"Unknown SDE arguments \['sigma_maks'\]"):
        sde_lib.get_sde("vesde", sigma_maks=3.0)
    # A key that belongs to another SDE is ignored (the config's sde block serves them all).
    assert sde_lib.get_sde("vpsde", sigma_max=3.0, beta_max=10.0) == sde_lib.VPSDE(beta_max=10.0)


def test_the_defaults_docstring_lists_every_key():
    """defaults.py's docstring is the index of the keys: a key added without it is caught."""
    doc = " ".join(defaults.__doc__.split())
    base = defaults.get_default_config()
    for section, block in base.items():
        if not hasattr(block, "keys"):
            assert re.search(rf"\b{section}\b", doc), section
            continue
        listed = re.search(rf"\b{section}\.\{{([^}}]*)\}}", doc)
        assert listed, f"defaults.py's docstring has no {section}.{{...}} list"
        names = {k.strip() for k in listed.group(1).split(",")}
        missing = sorted(set(block) - names)
        assert not missing, f"defaults.py's docstring omits {section}.{missing}"


# The modules that read a ConfigDict: the reader, its checks, the defaults. Everything else takes
# plain arguments (the entry points train_and_evaluate / evaluate / sample pass the config to
# experiment.build untouched).
CONFIG_READERS = {"experiment.py", "config_checks.py", "defaults.py"}


def _config_reads(path: pathlib.Path) -> list[str]:
    """`config.<key>` / `config[...]` reads in a module (any name bound to a ConfigDict is
    called config, cfg or c here; strings and comments are not code, so they are not counted)."""
    tree = ast.parse(path.read_text())
    reads = []
    for node in ast.walk(tree):
        target = node.value if isinstance(node, ast.Attribute | ast.Subscript) else None
        if isinstance(target, ast.Name) and target.id in ("config", "cfg"):
            reads.append(f"{path.name}:{node.lineno}")
    return reads


def test_only_the_experiment_reads_the_config():
    library = pathlib.Path(experiment.__file__).parent
    reads = [r for path in sorted(library.rglob("*.py")) if path.name not in CONFIG_READERS
             or path.parent != library for r in _config_reads(path)]
    assert not reads, (f"these lines read a config below experiment.build: {reads}. Unpack the "
                       f"keys in diffusion/experiment.py and pass plain arguments down.")


def test_the_config_read_check_finds_a_read(tmp_path):
    (tmp_path / "m.py").write_text("def f(config):\n    return config.model.name  # config.x\n")
    assert _config_reads(tmp_path / "m.py") == ["m.py:2"]
