"""The binding of a workdir to its run: `config.json`, the resolved config it was started with.

Resuming a workdir with a different model, data or training config is refused, listing the keys
that differ, except for the keys in `RESUMABLE_CHANGES` (lengthening a run, changing how often it
evaluates or saves, the machine it runs on, or which runs an experiment holds). A run claims its
workdir only once it can run: training writes config.json after validation and data preparation
succeed, and a workdir whose run saved no checkpoint yet takes a corrected config. `make_workdir`
creates a workdir, refusing one that cannot be (a file, an unwritable directory) before anything runs.
"""

import dataclasses
import json
import os

from absl import logging

from dpo_jax import models, stages, storage
from dpo_jax.configs import schema, validation
from dpo_jax.models.transformer import RUNTIME_FIELDS

RESUMABLE_CHANGES = tuple(f"{stage}.num_steps" for stage in stages.STAGES) + (
    "eval.every_steps", "checkpoint.every_steps", "checkpoint.max_to_keep", "checkpoint.every_minutes",
    "checkpoint.best_metric", "checkpoint.best_mode", "train.log_every_steps", "train.max_nonfinite_steps",
    "mesh.dcn", "mesh.data", "mesh.fsdp", "mesh.tensor",
    # How the same network is computed, so a run can move between machines.
    "model.remat", "model.attention_kernel", "model.attention_kernel_block_size", "model.attention_block_size",
    "model.fused_qkv", "model.fused_gate_up", "model.fused_parallel_inputs",
    "model.logits_chunk_size") + tuple(
    # Which runs an experiment holds: each run checks its own workdir, so adding one keeps the others.
    f"experiment.{key}" for key in ("dpo_betas", "ipo_betas", "ppo_kl_coefs", "ppo_gt_kl_coefs", "online_dpo_betas",
                                    "grpo_betas", "preferred_ft", "unlikelihood", "best_of_n", "dpo_learning_rates",
                                    "ppo_target_kls", "num_seeds", "seeded_methods", "trajectory_every",
                                    "kl_budgets"))


def _as_saved(value):
    """A value as config.json holds it (tuples are JSON lists)."""
    return json.loads(json.dumps(value))


def make_workdir(workdir):
    """Creates `workdir` (and its parents) for a run, or raises a ValueError naming it and why it cannot
    be one: an empty path, a file, a parent that is a file, or (local paths) a directory this process
    cannot write, found by creating and removing a probe file now rather than at the first save."""
    if not workdir:
        raise ValueError("workdir '': an empty path; give the run's directory (--workdir)")
    if storage.exists(workdir) and not storage.isdir(workdir):
        raise ValueError(f"workdir {workdir}: is a file, not a directory")
    try:
        storage.makedirs(workdir)
    except OSError as error:
        raise ValueError(f"workdir {workdir}: cannot be created ({_why_not_created(workdir, error)})") from error
    if storage.is_remote(workdir):
        return
    probe = os.path.join(workdir, f".write_probe.{os.getpid()}")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC))
        os.remove(probe)
    except OSError as error:
        raise ValueError(f"workdir {workdir}: not writable ({error.strerror or error})") from error


def _why_not_created(workdir, error):
    """The reason a local `workdir` could not be made: the ancestor that is a file, else the OS's."""
    if not storage.is_remote(workdir):
        parent = os.path.dirname(os.path.abspath(workdir))
        while parent and not os.path.exists(parent) and parent != os.path.dirname(parent):
            parent = os.path.dirname(parent)
        if os.path.exists(parent) and not os.path.isdir(parent):
            return f"{parent} is a file"
    return f"{error.strerror}: {error.filename}" if error.strerror and error.filename else str(error)


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def _saved_config(path):
    """The flat config of a workdir's config.json, in today's schema: a config.json written before
    list-valued keys became lists holds comma strings there, and lacks the keys added since (which
    then count as their defaults). A config.json that is not such an object is a ValueError naming it."""
    hint = "it records the workdir's run: restore it, or use a new --workdir"
    try:
        saved = storage.read_json(path)  # a ValueError naming the file if it does not parse
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not text ({error}); {hint}") from None
    except ValueError as error:
        raise ValueError(f"{error}; {hint}") from None
    except OSError as error:  # a directory, unreadable
        raise ValueError(f"{path}: cannot be read ({error.strerror or error}); {hint}") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: holds {_JSON_TYPES.get(type(saved), type(saved).__name__)}, not an object of "
                         f"config keys; {hint}")
    saved = validation.flatten(saved)
    defaults = validation.flatten(json.loads(schema.base_config().to_json_best_effort()))
    for key, item_type in schema.LIST_KEYS.items():
        if key in saved and (saved[key] is None or isinstance(saved[key], str)):  # "" / None: unset, no items
            try:
                saved[key] = [item_type(part.strip()) for part in (saved[key] or "").split(",") if part.strip()]
            except ValueError:
                raise ValueError(f"{path}: {key} holds {saved[key]!r}, not {item_type.__name__} items; "
                                 f"{hint}") from None
    return {**{key: value for key, value in defaults.items() if key not in saved}, **saved}


def _from_checkpoint(saved, current):
    """The model keys that `model.init_from_hf` decides (validation copies them from the checkpoint), when
    both configs start from the same checkpoint: a config.json written before they were copied holds
    the preset's values there."""
    init_from_hf = current.get("model.init_from_hf")
    if not init_from_hf or saved.get("model.init_from_hf") != init_from_hf:
        return set()
    return {f"model.{field.name}" for field in dataclasses.fields(models.DecoderConfig)
            if field.name not in RUNTIME_FIELDS}


def _holds_training(workdir):
    """Whether a run in `workdir` got as far as saving something to resume: a checkpoint (or, for an
    experiment, one of its runs)."""
    return any(storage.isdir(os.path.join(workdir, name)) and storage.listdir(os.path.join(workdir, name))
               for name in ("checkpoints", "runs"))


def check_workdir(config, workdir):
    """Refuses a workdir whose config.json holds a different run, listing the keys that differ, or is
    not a config (naming the file); a workdir that saved no checkpoint yet (a run that failed before
    it trained) is the new run's."""
    path = os.path.join(workdir, "config.json")
    if not storage.exists(path):
        return
    try:
        saved = _saved_config(path)
    except ValueError as error:
        if _holds_training(workdir):
            raise
        logging.warning("Workdir %s saved no checkpoint; this run replaces its unreadable config.json (%s)",
                        workdir, error)
        return
    current = validation.flatten(json.loads(config.to_json_best_effort()))
    resumable = set(RESUMABLE_CHANGES) | _from_checkpoint(saved, current)
    differing = sorted(key for key in set(saved) | set(current)
                       if _as_saved(saved.get(key)) != current.get(key) and key not in resumable)
    if not differing:
        return
    changes = "; ".join(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in differing)
    if not _holds_training(workdir):
        logging.warning("Workdir %s held the config of a run that saved no checkpoint; this run replaces it "
                        "(%s)", workdir, changes)
        return
    raise ValueError(f"Workdir {workdir} holds a different run (its config.json differs in {changes}). "
                     f"Use a new --workdir, or undo the changes to resume it.")


def write_config(config, workdir):
    """Records the resolved config as the workdir's config.json (process 0)."""
    storage.write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))


def bind_workdir(config, workdir):
    """`check_workdir`, then `write_config`."""
    check_workdir(config, workdir)
    write_config(config, workdir)
