"""Every bad config is one line `Error: <culprit>: <reason>`: bad values refused by validation naming the
key (NaN and inf in any float key, out-of-range numbers, unknown dtypes and keys), config files that
cannot be loaded named with their line, workdirs that cannot hold a run, corrupt config.json files;
and on the command line the same one line on stderr, exit code 1, no traceback."""

import math
import os
import re

import pytest
from conftest import config_path, run_config, run_python

from dpo_jax import workdir as workdir_lib
from dpo_jax.configs import load_config, schema, validation

INF, NAN = math.inf, math.nan


def _set(config, key, value):
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    node[leaf] = value


def _refusal(overrides):
    """The ValueError message validation gives the runlocal config with `overrides` ({"a.b": value})."""
    config = run_config("quickstart", "runlocal")
    for key, value in overrides.items():
        _set(config, key, value)
    with pytest.raises(ValueError) as error:
        validation.validate(config)
    message = str(error.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------
# Validation: one case per bad value, naming its key
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, culprit, reason", [
    ({"dpo.beta": INF}, "dpo.beta", "must be a finite number (no NaN or inf), got inf"),
    ({"dpo.beta": NAN}, "dpo.beta", "must be a finite number (no NaN or inf), got nan"),
    ({"dpo.beta": 0.0}, "dpo.beta", "must be > 0, got 0.0"),
    ({"sft.learning_rate": INF}, "sft.learning_rate", "must be a finite number"),
    ({"dpo.learning_rate": 0.0}, "dpo.learning_rate",
     "must be > 0 (for a stage that should not train, set num_steps=0)"),
    ({"dpo.learning_rate": -1e-4}, "dpo.learning_rate", "must be > 0"),
    ({"train.weight_decay": NAN}, "train.weight_decay", "must be a finite number"),
    ({"train.weight_decay": -0.01}, "train.weight_decay", "must be >= 0, got -0.01"),
    ({"train.b1": 1.0}, "train.b1", "must be in [0, 1) (adam's first-moment decay), got 1.0"),
    ({"train.b1": -0.1}, "train.b1", "must be in [0, 1)"),
    ({"train.b2": 1.5}, "train.b2", "must be in [0, 1)"),
    ({"train.b2": INF}, "train.b2", "must be a finite number"),
    ({"train.grad_clip_norm": -1.0}, "train.grad_clip_norm", "must be >= 0 (0: no clipping)"),
    ({"dpo.label_smoothing": 0.5}, "dpo.label_smoothing", "must be in [0, 0.5)"),
    ({"dpo.label_smoothing": -0.1}, "dpo.label_smoothing", "must be in [0, 0.5)"),
    ({"dpo.warmup_steps": -1}, "dpo.warmup_steps", "must be >= 0"),
    ({"sft.num_steps": -1}, "sft.num_steps", "must be >= 0"),
    ({"checkpoint.every_minutes": INF}, "checkpoint.every_minutes", "must be a finite number"),
    ({"kto.desirable_weight": 0.0}, "kto.desirable_weight", "must be > 0"),
    ({"ppo.value_coef": -1.0}, "ppo.value_coef", "must be >= 0"),
    ({"ppo.gamma": 1.5}, "ppo.gamma", "must be in [0, 1]"),
    ({"dpo.reference_update_alpha": 0.0}, "dpo.reference_update_alpha", "must be in (0, 1]"),
    ({"stages": ("sft", "online_dpo")}, "online_dpo.reward",
     "'model' needs a reward model: a 'reward' stage before 'online_dpo' in config.stages"),
    ({"stages": ("sft", "reward", "online_dpo"), "online_dpo.judge": "scorer:vader", "online_dpo.num_generations": 4},
     "online_dpo.judge", "a judge compares two responses: needs online_dpo.num_generations=2, got 4"),
    ({"stages": ("sft", "reward", "online_dpo"), "online_dpo.loss_type": "hinge"}, "online_dpo.loss_type",
     "must be one of ('sigmoid', 'ipo'), got 'hinge'"),
    ({"online_dpo.beta_schedule": (0.1, 0.0)}, "online_dpo.beta_schedule", "each item must be > 0"),
    ({"online_dpo.judge": "oracle:gpt", "stages": ("sft", "reward", "online_dpo")}, "online_dpo.judge",
     "unknown judge spec 'oracle:gpt'"),
    ({"stages": ("sft", "reward", "grpo"), "grpo.num_generations": 1}, "grpo.num_generations",
     "must be >= 2 (advantages compare a group's responses), got 1"),
    ({"stages": ("sft", "reward", "grpo"), "grpo.loss_type": "bnpo"}, "grpo.loss_type",
     "must be one of ('grpo', 'dr_grpo', 'dapo'), got 'bnpo'"),
    ({"stages": ("sft", "reward", "grpo"), "grpo.num_minibatches": 3}, "grpo.num_minibatches",
     "must be > 0 and divide the rollout's train.global_batch_size x num_generations"),
    ({"grpo.epsilon_high": -0.1}, "grpo.epsilon_high", "must be >= 0 (0: epsilon)"),
    ({"stages": ("sft", "grpo"), "grpo.reward": "sentiment"}, "grpo.reward", "unknown scorer spec 'sentiment'"),
    ({"dpo.loss_options.rpo_alpha": INF}, "dpo.loss_options.rpo_alpha", "must be a finite number"),
    ({"model.dtype": "float7"}, "model.dtype",
     "must be auto or one of ('float32', 'bfloat16', 'float16'), got 'float7'"),
    ({"model.param_dtype": "int8"}, "model.param_dtype", "must be one of"),
    ({"model.param_dtype": "auto"}, "model.param_dtype", "must be one of ('float32', 'bfloat16', 'float16')"),
    ({"model.num_heads": 0}, "model.num_heads", "must be > 0"),
    ({"model.num_kv_heads": 0}, "model.num_kv_heads", "must be > 0"),
    ({"model.norm_eps": 0.0}, "model.norm_eps", "must be > 0"),
    ({"model.rotary_fraction": 1.5}, "model.rotary_fraction", "must be in (0, 1]"),
    ({"model.lora.alpha": -1.0}, "model.lora.alpha", "must be > 0"),
    ({"model.rope_scaling": "llama3", "model.rope_high_freq_factor": 1.0}, "model.rope_high_freq_factor",
     "llama3 rope scaling needs it > model.rope_low_freq_factor=1.0"),
    ({"model.activation": "swishy"}, "model.activation", "is not one of"),
    ({"model.attention_kernel": "flash"}, "model.attention_kernel",
     "must be one of ('auto', 'dense', 'splash', 'pallas_gpu'), got 'flash'"),
    ({"model.attention_kernel": "splash", "model.sliding_window": 16}, "model.attention_kernel",
     "splash takes no sliding window (model.sliding_window=16); use auto or dense"),
    ({"model.attention_kernel": "splash", "model.attention_kernel_block_size": 64},
     "model.attention_kernel_block_size", "must be a multiple of 128 for splash attention, got 64"),
    ({"model.attention_kernel": "pallas_gpu", "model.attention_kernel_block_size": 96},
     "model.attention_kernel_block_size", "must be a power of two >= 16 for pallas_gpu attention, got 96"),
    ({"model.attention_kernel_block_size": 0}, "model.attention_kernel_block_size", "must be > 0"),
    ({"data.weights": (INF,)}, "data.weights", "must be finite numbers (no NaN or inf), got (inf,)"),
    ({"evaluation.temperatures": (1.0, -1.0)}, "evaluation.temperatures", "each item must be >= 0 (0: greedy)"),
    ({"experiment.dpo_betas": (0.1, NAN)}, "experiment.dpo_betas", "must be finite numbers"),
    ({"experiment.num_seeds": 0}, "experiment.num_seeds", "must be >= 1 (one run per seed), got 0"),
    ({"experiment.trajectory_every": -1}, "experiment.trajectory_every", "must be >= 0 (0: only the final policy)"),
    ({"experiment.seeded_methods": ("dpo", "rlhf")}, "experiment.seeded_methods",
     "['rlhf'] are not among the methods ('dpo', 'ipo', 'ppo', 'ppo_gt', 'online_dpo', 'grpo'"),
    ({"experiment.kl_budgets": (0.0,)}, "experiment.kl_budgets", "each item must be > 0, got (0.0,)"),
    ({"experiment.dpo_learning_rates": (-1e-4,)}, "experiment.dpo_learning_rates", "each item must be > 0"),
    ({"experiment.ppo_target_kls": (0.0,)}, "experiment.ppo_target_kls", "each item must be > 0"),
    ({"dpo.betta": 0.1}, "dpo.betta", "unknown key (did you mean config.dpo.beta?)"),
    ({"stages": ("sft", "sft")}, "stages", "must be distinct stages"),
], ids=lambda case: "-".join(f"{k}={v}" for k, v in case.items()) if isinstance(case, dict) else None)
def test_a_bad_value_is_refused_naming_its_key(overrides, culprit, reason):
    message = _refusal(overrides)
    assert message.startswith(f"config.{culprit}") and reason in message, message


@pytest.mark.parametrize("dtype", ("auto",) + validation.DTYPES)
def test_every_compute_dtype_and_auto_are_accepted(dtype):
    config = run_config("quickstart", "runlocal")
    config.model.dtype = dtype
    validation.validate(config)


def _float_keys():
    """The float-valued keys of the schema (also lists of floats, and unset float options)."""
    config = schema.base_config()
    config.bench = schema.bench_config()
    flat = validation.flatten(config)
    keys = {key for key, value in flat.items() if isinstance(value, float) and not isinstance(value, bool)}
    keys |= {key for key, item_type in schema.LIST_KEYS.items() if item_type is float}
    options = config.dpo.loss_options
    keys |= {f"dpo.loss_options.{name}" for name in options
             if options.get_ref(name).get_type() is float}  # unset (None) float options
    return sorted(keys)


FLOAT_KEYS = _float_keys()


def test_every_float_key_has_a_range():
    assert set(FLOAT_KEYS) <= set(validation.RANGES), sorted(set(FLOAT_KEYS) - set(validation.RANGES))
    known = set(validation.flatten(schema.base_config()))
    assert set(validation.RANGES) <= known, sorted(set(validation.RANGES) - known)


@pytest.mark.parametrize("key", [key for key in FLOAT_KEYS if not key.startswith("bench.")])
def test_nan_and_inf_are_refused_in_every_float_key(key):
    tuple_valued = schema.LIST_KEYS.get(key) is float
    for value in (NAN, INF, -INF):
        message = _refusal({key: (value,) if tuple_valued else value})
        assert message.startswith(f"config.{key}: must be") and "no NaN or inf" in message, message


def _outside(spec):
    """A number just outside the interval `spec` (its lower bound, or above its upper one)."""
    low, high, low_inclusive, high_inclusive = validation._interval(spec)  # pylint: disable=protected-access
    if not math.isinf(low):
        return low - 1 if low_inclusive else low
    return high + 1 if high_inclusive else high


@pytest.mark.parametrize("key", sorted(key for key, spec in validation.RANGES.items()
                                       if "-inf" not in (spec[0] if isinstance(spec, tuple) else spec)))
def test_a_number_outside_its_range_is_refused(key):
    spec = validation.RANGES[key]
    spec = spec[0] if isinstance(spec, tuple) else spec
    default = validation.flatten(run_config("quickstart", "runlocal"))[key]
    item_type = schema.LIST_KEYS.get(key) or (type(default) if default is not None else float)
    value = item_type(_outside(spec))
    message = _refusal({key: (value,) if key in schema.LIST_KEYS else value})
    assert message.startswith(f"config.{key}: "), message


# ---------------------------------------------------------------------------------------------
# Config files that cannot be loaded: named, with the line
# ---------------------------------------------------------------------------------------------

CONFIG_FILES = {
    "syntax_error": ("def get_config(arg=None)\n    return None\n", ":1: the config file does not parse"),
    "import_error": ("import nonexistent_module_of_a_config\n",
                     ":1: loading the config file raised ModuleNotFoundError: No module named"),
    "raises": ("from dpo_jax.configs import base_config\n\ndef get_config(arg=None):\n    return 1 / 0\n",
               ":4: get_config() raised ZeroDivisionError: division by zero"),
    "returns_dict": ("def get_config(arg=None):\n    return {'stages': ('sft',)}\n",
                     ": get_config returned a dict, not a ConfigDict"),
    "returns_none": ("def get_config(arg=None):\n    pass\n", ": get_config returned a NoneType, not a ConfigDict"),
    "no_get_config": ("CONFIG = {}\n", ": defines no get_config(arg)"),
}


@pytest.mark.parametrize("name", sorted(CONFIG_FILES))
def test_a_config_file_that_cannot_be_loaded_is_named(tmp_path, name):
    source, reason = CONFIG_FILES[name]
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    with pytest.raises(ValueError) as error:
        load_config(str(path))
    assert str(error.value).startswith(f"{path}{reason}"), str(error.value)


@pytest.mark.parametrize("spec, message", [
    ("{tmp}/missing.py", "{tmp}/missing.py: no such config file"),
    ("{tmp}", "{tmp}: a directory, not a config file"),
    ("{quickstart}:nope", "{quickstart}:<line>: get_config('nope') raised ValueError: Unknown config arg 'nope'"),
])
def test_a_missing_config_file_or_a_bad_config_arg_is_named(tmp_path, spec, message):
    paths = dict(tmp=tmp_path, quickstart=config_path("quickstart"))
    with pytest.raises(ValueError) as error:
        load_config(spec.format(**paths))
    assert re.match(re.escape(message.format(**paths)).replace("<line>", r"\d+"), str(error.value)), str(error.value)


# ---------------------------------------------------------------------------------------------
# Workdirs that cannot hold a run, corrupt config.json
# ---------------------------------------------------------------------------------------------

def test_a_workdir_is_created_with_its_parents(tmp_path):
    workdir = tmp_path / "a" / "b"
    workdir_lib.make_workdir(str(workdir))
    workdir_lib.make_workdir(str(workdir))  # again: it exists
    assert workdir.is_dir() and not os.listdir(workdir)  # the probe file is gone


@pytest.mark.parametrize("name, reason", [
    ("file", "is a file, not a directory"),
    ("file/run", "cannot be created ({tmp}/file is a file)"),
])
def test_a_workdir_that_is_or_is_under_a_file_is_refused(tmp_path, name, reason):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=re.escape(f"workdir {tmp_path}/{name}: {reason.format(tmp=tmp_path)}")):
        workdir_lib.make_workdir(str(tmp_path / name))


def test_an_empty_workdir_is_refused():
    with pytest.raises(ValueError, match=re.escape("workdir '': an empty path")):
        workdir_lib.make_workdir("")


def test_an_unwritable_workdir_or_parent_is_refused(tmp_path, monkeypatch):
    """What a read-only directory does for another user than root (the tests may run as root)."""
    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", os.fspath(path))
    workdir = tmp_path / "run"
    workdir.mkdir()
    with monkeypatch.context() as patch:
        patch.setattr(workdir_lib.os, "open", refuse)
        with pytest.raises(ValueError, match=re.escape(f"workdir {workdir}: not writable (Permission denied)")):
            workdir_lib.make_workdir(str(workdir))
    monkeypatch.setattr(workdir_lib.storage, "makedirs", refuse)
    with pytest.raises(ValueError, match=re.escape(f"workdir {tmp_path}/new: cannot be created (Permission denied: "
                                                   f"{tmp_path}/new)")):
        workdir_lib.make_workdir(str(tmp_path / "new"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_workdir_and_parent_are_refused(tmp_path):
    parent = tmp_path / "read_only"
    (parent / "run").mkdir(parents=True)
    parent.chmod(0o500)
    (parent / "run").chmod(0o500)
    try:
        with pytest.raises(ValueError, match="not writable"):
            workdir_lib.make_workdir(str(parent / "run"))
        with pytest.raises(ValueError, match="cannot be created"):
            workdir_lib.make_workdir(str(parent / "new"))
    finally:
        (parent / "run").chmod(0o700)
        parent.chmod(0o700)


CORRUPT_CONFIG_JSON = {
    "not_json": (b"not json", "not valid JSON"),
    "truncated": (b'{"stages": ["sft"', "not valid JSON"),
    "empty": (b"", "not valid JSON"),
    "array": (b"[1, 2]", "holds an array, not an object of config keys"),
    "null": (b"null", "holds null, not an object of config keys"),
    "binary": (b"\xff\xfe{", "not text"),
    "bad_list_item": (b'{"data": {"weights": "a,b"}}', "data.weights holds 'a,b', not float items"),
}


@pytest.mark.parametrize("name", sorted(CORRUPT_CONFIG_JSON))
def test_a_corrupt_config_json_of_a_trained_workdir_is_named(tmp_path, name):
    content, reason = CORRUPT_CONFIG_JSON[name]
    (tmp_path / "config.json").write_bytes(content)
    (tmp_path / "checkpoints" / "sft").mkdir(parents=True)  # the workdir holds training
    with pytest.raises(ValueError) as error:
        workdir_lib.check_workdir(run_config("quickstart", "runlocal"), str(tmp_path))
    message = str(error.value)
    assert message.startswith(f"{tmp_path}/config.json: {reason}") and "use a new --workdir" in message, message


def test_a_corrupt_config_json_of_a_workdir_without_training_is_replaced(tmp_path):
    (tmp_path / "config.json").write_text("[")
    workdir_lib.check_workdir(run_config("quickstart", "runlocal"), str(tmp_path))  # the new run's: no error


# ---------------------------------------------------------------------------------------------
# The command line: the same one line on stderr, exit code 1, no traceback (a few cases: each
# is a process that imports JAX; the cases above cover the values)
# ---------------------------------------------------------------------------------------------

LOG_LINE = re.compile(r"^[IWEF]\d{4} ")  # absl's log lines


def _error_line(args):
    result = run_python(["-m", "dpo_jax.main", *args], check=False, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]
    assert result.returncode == 1 and lines, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert [line for line in lines if line.startswith("Error:")] == [lines[-1]], result.stderr[-3000:]
    return lines[-1]


RUNLOCAL = "--config=configs/quickstart.py:runlocal"


@pytest.mark.parametrize("args, error", [
    ([RUNLOCAL, "--config.dpo.betta=0.1"], "Error: config.dpo.betta: unknown key (did you mean config.dpo.beta?)"),
    ([RUNLOCAL, "--config.dpo.beta=abc"], "Error: --config.dpo.beta=abc: could not convert string to float"),
    ([RUNLOCAL, "--config.dpo.beta=inf"], "Error: config.dpo.beta: must be a finite number"),
    (["--config={tmp}/missing.py"], "Error: {tmp}/missing.py: no such config file"),
    (["--config={tmp}/raises.py"], "Error: {tmp}/raises.py:2: get_config() raised RuntimeError: no config today"),
])
def test_a_bad_command_line_is_one_line_naming_the_culprit(tmp_path, args, error):
    (tmp_path / "raises.py").write_text("def get_config(arg=None):\n    raise RuntimeError('no config today')\n")
    args = [arg.format(tmp=tmp_path) for arg in args]
    line = _error_line(args + [f"--workdir={tmp_path}/run"])
    assert line.startswith(error.format(tmp=tmp_path)), line
    assert not (tmp_path / "run").exists()


def test_a_missing_workdir_flag_is_one_line():
    assert _error_line([RUNLOCAL]) == "Error: --workdir: required"


def test_a_workdir_that_is_a_file_is_one_line_naming_it(tmp_path):
    (tmp_path / "file").write_text("x")
    line = _error_line([RUNLOCAL, f"--workdir={tmp_path}/file"])
    assert line.startswith("Error: ") and f"{tmp_path}/file" in line, line


def test_a_best_metric_the_stage_does_not_compute_is_named_before_any_checkpoint(tmp_path):
    line = _error_line([RUNLOCAL, f"--workdir={tmp_path}/run", "--config.checkpoint.best_metric=nosuchmetric"])
    assert line.startswith("Error: config.checkpoint.best_metric='nosuchmetric' is not an eval metric of stage sft "
                           "(it has "), line
    assert "nll" in line
    assert not os.listdir(tmp_path / "run" / "checkpoints" / "sft")
