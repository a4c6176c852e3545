r"""Runs the sample evaluation of a finished run again, with other options, without retraining.

  python -m dpo_jax.evaluate --workdir=/tmp/dpo_run --scorer=vader --judge=scorer:vader \
      --temperatures=0.5,1.0 --num_prompts=64 --samples_per_prompt=2 --max_new_tokens=24 [--name=NAME]

Reads `<workdir>/config.json`, replaces the keys of its `config.evaluation` block given as flags (the
others keep the run's values; `--scorer=` or `--judge=` clears one), validates the config, and runs
what training ends with (`evaluation.evaluate_run`): samples of the final policy (the last policy
stage's final checkpoint) on the first `num_prompts` held-out prompts of the run's data, scored by
the scorer, judged against the reference responses, with the KL to that stage's starting point. The
same options on the same run give the numbers training gave.

Results go beside the run, in `<workdir>/evaluations/<name>/`: results.json, results.md, win_rates.png
(with a judge) and evaluation.json (the evaluation block, the seed, the policy stage and the full
result, the KL's standard error included). `<name>` defaults to the options, e.g.
`scorer-vader_t1.0_n256x4_len24`; a directory holding an evaluation with other options is refused.
The run's config.json, checkpoints, summary.json and metrics are only read: a workdir whose config
differs in `evaluation.*` is one that training refuses to resume.
"""

import hashlib
import json
import re
import sys

from absl import app, flags, logging

from dpo_jax import checkpointing, commands, evaluation, restore, scorers, sharding, storage, train
from dpo_jax.configs import validation
from dpo_jax.data import task as data_task

FLAGS = flags.FLAGS

OVERRIDES = ("scorer", "judge", "temperatures", "num_prompts", "samples_per_prompt", "max_new_tokens", "batch_size")
# What an evaluation's numbers depend on; the batch size only groups the same samples.
_OPTIONS = ("scorer", "judge", "temperatures", "num_prompts", "samples_per_prompt", "max_new_tokens")


def apply_overrides(config, **overrides):
    """Sets the given (not None) keys of `config.evaluation`; list-valued ones become tuples."""
    for key, value in overrides.items():
        if key not in OVERRIDES:
            raise ValueError(f"config.evaluation.{key}: not a key this command overrides ({', '.join(OVERRIDES)})")
        if value is not None:
            config.evaluation[key] = tuple(value) if isinstance(value, (list, tuple)) else value
    return config


def _slug(spec):
    """A scorer or judge spec as part of a directory name: path characters replaced, a long one shortened."""
    slug = re.sub(r"[^A-Za-z0-9.,+=-]+", "-", spec).strip("-")
    if len(slug) > 48:
        slug = f"{slug[:39]}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"
    return slug


def default_name(evaluation_config):
    """The name of an evaluation from its options: scorer-<spec>_judge-<spec>_t<temperatures>_n<prompts>x
    <samples>_len<max_new_tokens>, e.g. scorer-vader_t1.0_n256x4_len24."""
    parts = [f"scorer-{_slug(evaluation_config.scorer)}"] if evaluation_config.scorer else []
    parts += [f"judge-{_slug(evaluation_config.judge)}"] if evaluation_config.judge else []
    parts.append("t" + ",".join(str(float(t)) for t in evaluation_config.temperatures))
    parts.append(f"n{evaluation_config.num_prompts}x{evaluation_config.samples_per_prompt}")
    parts.append(f"len{evaluation_config.max_new_tokens}")
    return "_".join(parts)


def _options(evaluation_block):
    return {key: evaluation_block.get(key) for key in _OPTIONS}


def _check_output_dir(out_dir, evaluation_block):
    """Refuses a directory that holds an evaluation of other options (the same options: redone, overwritten)."""
    path = storage.join(out_dir, "evaluation.json")
    if not storage.isfile(path):
        return
    saved = _options(storage.read_json(path).get("evaluation", {}))
    differing = {key: (saved[key], value) for key, value in _options(evaluation_block).items() if saved[key] != value}
    if differing:
        changes = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in differing.items())
        raise ValueError(f"{out_dir}: holds an evaluation with other options ({changes}); give another --name")


def evaluate(workdir, *, name=None, **overrides):
    """The sample evaluation of the finished run in `workdir` with `config.evaluation` overridden by
    `overrides` (keys of `OVERRIDES`), into `<workdir>/evaluations/<name>/`; returns (result, out_dir)."""
    config = apply_overrides(restore.read_config(workdir), **overrides)
    validation.validate(config)
    evaluation_config = config.evaluation
    if not (evaluation_config.scorer or evaluation_config.judge):
        raise ValueError("config.evaluation: neither a scorer nor a judge is set (by the run or by --scorer / "
                         "--judge): give one")
    restore.check_finished(workdir, config)
    name = name or default_name(evaluation_config)
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"--name={name!r}: must be a directory name")
    out_dir = storage.join(workdir, "evaluations", name)
    evaluation_block = json.loads(evaluation_config.to_json())
    _check_output_dir(out_dir, evaluation_block)

    scorer = scorers.make_scorer(evaluation_config.scorer) if evaluation_config.scorer else None
    judge = scorers.make_judge(evaluation_config.judge) if evaluation_config.judge else None
    task = data_task.load_task(config)
    if task.tokenizer is None:  # before the checkpoints are read
        raise ValueError(f"{workdir}: the run has no tokenizer (the synthetic task is token ids), so its samples "
                         "have no text to score")
    policy = restore.restore_policy(workdir, config, sharding.make_mesh(config.mesh), with_reference=True)
    storage.makedirs(out_dir)
    result = evaluation.evaluate_run(config, task, policy.model.graphdef, policy.params, policy.reference,
                                     method=policy.plan.name, out_dir=out_dir, scorer=scorer, judge=judge)
    storage.write_json(storage.join(out_dir, "evaluation.json"),
                       {"evaluation": evaluation_block, "seed": config.seed, "policy_stage": policy.stage,
                        "result": result})
    return result, out_dir


def define_flags():
    """The command's flags, defined when it runs (not on import: other modules define --workdir too)."""
    flags.DEFINE_string("workdir", None, "A finished run's directory (config.json, checkpoints/, summary.json).")
    flags.DEFINE_string("name", None, "Name of the evaluation: results go to <workdir>/evaluations/<name>/ "
                        "(default: from the options, e.g. scorer-vader_t1.0_n256x4_len24).")
    flags.DEFINE_string("scorer", None, "config.evaluation.scorer: vader | command:<cmd> | "
                        "hf_classifier:<dir>[@label] | reward_model:<dir> ('' = none; default: the run's).")
    flags.DEFINE_string("judge", None, "config.evaluation.judge: command:<cmd> | scorer:<scorer spec> ('' = none; "
                        "default: the run's).")
    flags.DEFINE_list("temperatures", None, "config.evaluation.temperatures, e.g. 0,0.5,1 (default: the run's).")
    flags.DEFINE_integer("num_prompts", None, "config.evaluation.num_prompts: the first N held-out prompts "
                         "(default: the run's).")
    flags.DEFINE_integer("samples_per_prompt", None, "config.evaluation.samples_per_prompt (default: the run's).")
    flags.DEFINE_integer("max_new_tokens", None, "config.evaluation.max_new_tokens (default: the run's).")
    flags.DEFINE_integer("batch_size", None, "config.evaluation.batch_size: prompts per sampling batch "
                         "(default: the run's).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    checkpointing.quiet_orbax_logs()
    if not FLAGS.workdir:
        sys.exit("Error: --workdir: required (a finished run's directory)")
    try:
        result, out_dir = evaluate(FLAGS.workdir, name=FLAGS.name, **{key: FLAGS[key].value for key in OVERRIDES})
    except (ValueError, FileNotFoundError, checkpointing.CheckpointError, scorers.ScorerError) as error:
        sys.exit(f"Error: {error}")
    logging.info("Wrote the evaluation of %s to %s", FLAGS.workdir, out_dir)
    print(train.format_report({"evaluation": result}))
    print(f"results in {out_dir}")


def run():
    """`python -m dpo_jax.evaluate`."""
    define_flags()
    commands.run(main, __name__)


if __name__ == "__main__":
    run()
