"""The binding of a workdir to its run: `config.json`, the resolved config it was started with.

Resuming a workdir with a different model, data or training config is refused, listing the keys
that differ, except for the keys in `RESUMABLE_CHANGES` (lengthening a run, changing how often it
evaluates or saves, or the machine it runs on). A run claims its workdir only once it can run:
training writes config.json after validation and data preparation succeed, and a workdir whose
run saved no checkpoint yet takes a corrected config.
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
    "model.remat", "model.attention_block_size", "model.logits_chunk_size")


def _as_saved(value):
    """A value as config.json holds it (tuples are JSON lists)."""
    return json.loads(json.dumps(value))


def _saved_config(path):
    """The flat config of a workdir's config.json, in today's schema: a config.json written before
    list-valued keys became lists holds comma strings there, and lacks the keys added since (which
    then count as their defaults)."""
    saved = validation.flatten(storage.read_json(path))
    defaults = validation.flatten(json.loads(schema.base_config().to_json_best_effort()))
    for key, item_type in schema.LIST_KEYS.items():
        if key in saved and (saved[key] is None or isinstance(saved[key], str)):  # "" / None: unset, no items
            saved[key] = [item_type(part.strip()) for part in (saved[key] or "").split(",") if part.strip()]
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
    """Refuses a workdir whose config.json holds a different run, listing the keys that differ; a
    workdir that saved no checkpoint yet (a run that failed before it trained) is the new run's."""
    path = os.path.join(workdir, "config.json")
    if not storage.exists(path):
        return
    saved, current = _saved_config(path), validation.flatten(json.loads(config.to_json_best_effort()))
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
