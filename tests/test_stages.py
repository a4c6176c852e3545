"""The stage seam: every stage behind one protocol, a driver that names none, a package without import cycles."""

import ast
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from dpo_jax import stages, train
from dpo_jax.configs import base_config, validation

PACKAGE = os.path.join(REPO, "dpo_jax")


def _module_name(path):
    relative = os.path.relpath(path, REPO)[:-len(".py")].replace(os.sep, ".")
    return relative[:-len(".__init__")] if relative.endswith(".__init__") else relative


def _imports(path):
    """The dpo_jax modules a file imports, anywhere in it (function-level imports count too)."""
    names = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_every_stage_has_its_block_in_the_schema_with_the_shared_keys():
    config = base_config()
    assert set(stages.STAGES) == {"pretrain", "sft", "reward", "unlikelihood", "dpo", "kto", "ppo", "online_dpo",
                                  "grpo"}
    for name, stage in stages.STAGES.items():
        assert stage.name == name
        block = stage.config_block()
        assert config[name].to_dict() == block.to_dict()
        assert {"num_steps", "learning_rate", "warmup_steps", "schedule", "init_from"} <= set(block)


def test_the_driver_and_the_planner_name_no_stage():
    for module in ("train.py", "planning.py"):
        tree = ast.parse(open(os.path.join(PACKAGE, module), encoding="utf-8").read())
        named = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
                 and isinstance(node.value, str) and node.value in stages.STAGES}
        assert not named, f"{module} names the stages {named}"


def test_no_import_cycles_among_the_modules():
    paths = glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True)
    modules = {_module_name(path): path for path in paths}
    graph = {name: {imported for imported in _imports(path) if imported in modules and imported != name}
             for name, path in modules.items()}
    # A package's __init__ that re-exports its own modules is where they live, not a cycle.
    graph = {name: {other for other in deps if not name.startswith(other + ".")} for name, deps in graph.items()}
    state, cycle = {}, []

    def visit(name, path):
        state[name] = "open"
        for other in sorted(graph[name]):
            if state.get(other) == "open":
                cycle.extend(path[path.index(other):] + [other] if other in path else [name, other])
                return True
            if other not in state and visit(other, path + [other]):
                return True
        state[name] = "done"
        return False

    assert not any(visit(name, [name]) for name in sorted(graph) if name not in state), f"import cycle: {cycle}"


def test_the_pure_core_loads_no_config_files_and_no_tfds():
    script = ("import sys\nimport dpo_jax.losses, dpo_jax.steps, dpo_jax.sharding, dpo_jax.data.layouts, "
              "dpo_jax.models\nprint([m for m in ('tensorflow_datasets', 'dpo_jax.configs', 'dpo_jax.data.task', "
              "'ml_collections', 'grain', 'orbax') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == "[]", result.stdout


@pytest.mark.parametrize("spec, expected", [
    (("a.jsonl,b.jsonl",), ("a.jsonl", "b.jsonl")),
    (("a.jsonl", " b.jsonl ,c.jsonl"), ("a.jsonl", "b.jsonl", "c.jsonl")),
    ((), ()),
])
def test_comma_strings_of_list_keys_become_tuples(tiny_config, spec, expected):
    tiny_config.data.train_files = spec
    validation.normalize_lists(tiny_config)
    assert tiny_config.data.train_files == expected


def test_numeric_list_keys_are_parsed_and_a_bad_item_is_named(tiny_config):
    tiny_config.evaluation.temperatures = ("0.5,1",)
    tiny_config.dpo.loss_type = ("sigmoid, sft",)
    validation.normalize_lists(tiny_config)
    assert tiny_config.evaluation.temperatures == (0.5, 1.0) and tiny_config.dpo.loss_type == ("sigmoid", "sft")
    tiny_config.experiment.dpo_betas = ("0.1,warm",)
    with pytest.raises(ValueError, match=r"config.experiment.dpo_betas: 'warm' is not a float"):
        validation.normalize_lists(tiny_config)


def test_command_line_comma_strings_reach_the_run_as_tuples(tmp_path):
    """`--config.dpo.loss_type=sigmoid,sft` (a comma string) and files (the flag once per file), through absl and
    config_flags."""
    files = [tmp_path / f"{i}.jsonl" for i in range(2)]
    script = (
        "import json, sys\nfrom absl import app, flags\nfrom ml_collections import config_flags\n"
        "from dpo_jax.configs import validation\n"
        "CONFIG = config_flags.DEFINE_config_file('config')\n"
        "def main(_):\n    config = CONFIG.value\n    validation.normalize_lists(config)\n"
        "    print(json.dumps([config.dpo.loss_type, config.data.pretrain_files, config.stages]))\n"
        "app.run(main)\n")
    result = subprocess.run(
        [sys.executable, "-c", script, f"--config={REPO}/configs/quickstart.py:runlocal",
         "--config.dpo.loss_type=sigmoid,sft", f"--config.data.pretrain_files={files[0]}",
         f"--config.data.pretrain_files={files[1]}",
         "--config.stages=sft,dpo"], capture_output=True, text=True, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    loss_type, pretrain_files, names = json.loads(result.stdout.strip().splitlines()[-1])
    assert loss_type == ["sigmoid", "sft"] and pretrain_files == [str(f) for f in files] and names == ["sft", "dpo"]


def test_a_workdir_written_before_list_keys_and_kto_resumes(tiny_config, tmp_path):
    """config.json of the earlier schema: comma strings for list keys, None for unset loss weights, no kto block."""
    from dpo_jax.workdir import bind_workdir
    validation.validate(tiny_config)
    old = json.loads(tiny_config.to_json_best_effort())
    del old["kto"]
    old["data"].update(name="synthetic", train_files="", pretrain_files="")
    old["dpo"]["loss_type"] = "sigmoid"
    old["dpo"]["loss_options"]["loss_weights"] = None
    old["evaluation"]["temperatures"] = "1.0"
    old["experiment"].update(dpo_betas="0.1", best_of_n="")
    (tmp_path / "config.json").write_text(json.dumps(old))
    (tmp_path / "checkpoints" / "sft" / "3").mkdir(parents=True)
    bind_workdir(tiny_config, str(tmp_path))  # accepted: the same run
    assert json.loads((tmp_path / "config.json").read_text())["data"]["name"] == ["synthetic"]
    tiny_config.dpo.beta = 0.5
    with pytest.raises(ValueError, match=r"holds a different run .*dpo.beta: 0.1 -> 0.5"):
        bind_workdir(tiny_config, str(tmp_path))


def test_a_workdir_whose_run_saved_no_checkpoint_takes_a_corrected_config(tiny_config, tmp_path):
    from dpo_jax.workdir import bind_workdir
    validation.validate(tiny_config)
    bind_workdir(tiny_config, str(tmp_path))
    tiny_config.dpo.beta = 0.5  # the corrected command of a run that failed before its first checkpoint
    bind_workdir(tiny_config, str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["dpo"]["beta"] == 0.5
    (tmp_path / "checkpoints" / "sft" / "3").mkdir(parents=True)
    tiny_config.dpo.beta = 0.1
    with pytest.raises(ValueError, match=r"holds a different run .*dpo.beta: 0.5 -> 0.1"):
        bind_workdir(tiny_config, str(tmp_path))


def test_format_report_asks_each_stage_for_its_lines():
    summary = {"sft": {"steps": 2, "wall_seconds": 1.0, "params_fingerprint": "a" * 64, "eval": {"loss": 2.5}},
               "dpo": {"steps": 3, "wall_seconds": 2.0, "params_fingerprint": "b" * 64,
                       "eval_before": {"rewards/accuracies": 0.5, "rewards/margins": 0.0, "kl": 0.0},
                       "eval": {"rewards/accuracies": 0.75, "rewards/margins": 0.25, "kl": 0.125}}}
    lines = train.format_report(summary).splitlines()
    assert lines[0] == "sft: 2 steps, 1.0 s, fingerprint aaaaaaaaaaaa" and lines[1] == "  loss=2.5000"
    assert lines[3].split() == ["held-out", "before", "DPO", "after", "DPO"]
    assert lines[4].split() == ["preference", "accuracy", "0.5000", "0.7500"]


def test_a_stage_with_unknown_data_is_refused():
    with pytest.raises(ValueError, match="reads unknown data 'images'"):
        stages.Stage(name="vision", data="images", config_block=dict, plan=None)


def test_derangement_pairs_every_example_with_another():
    from dpo_jax.data.unpaired import _derangement
    for count in (2, 3, 17):
        other = _derangement(count, seed=count)
        assert sorted(other) == list(range(count)) and np.all(other != np.arange(count))
