"""Config checks that run before anything compiles, and the binding of a workdir to its config.

Every error names the offending key. A workdir remembers its resolved config (`config.json`);
resuming it with a different model, data or training config is refused, listing the keys that
differ, except for the keys in `RESUMABLE_CHANGES` (lengthening a run, changing how often it
evaluates or saves, or the mesh it runs on).
"""

import json
import os

import jax
import jax.numpy as jnp

from configs import common
from dpo_jax import losses

STAGES = ("pretrain", "sft", "reward", "unlikelihood", "dpo", "ppo")
RESUMABLE_CHANGES = tuple(f"{stage}.num_steps" for stage in STAGES) + ("eval.every_steps", "checkpoint.every_steps",
                     "checkpoint.max_to_keep", "checkpoint.every_minutes", "checkpoint.best_metric",
                     "checkpoint.best_mode", "train.log_every_steps", "train.max_nonfinite_steps",
                     "mesh.dcn", "mesh.data", "mesh.fsdp", "mesh.tensor",
                     # How the same network is computed, so a run can move between machines.
                     "model.remat", "model.attention_block_size", "model.logits_chunk_size")


def flatten(tree, prefix=""):
    """{"a.b.c": value} of a nested dict or ConfigDict."""
    items = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if hasattr(value, "items"):
            items.update(flatten(value, path + "."))
        else:
            items[path] = value
    return items


def _check(condition, key, message):
    if not condition:
        raise ValueError(f"config.{key}: {message}")


def _check_schema(config):
    """Unknown keys and wrong types against `configs.common.base_config()`."""
    defaults = flatten(common.base_config())
    for key, value in flatten(config).items():
        _check(key in defaults, key, "unknown key (a typo? see configs/common.py for every key)")
        default = defaults[key]
        if default is None:  # an optional field (a typed FieldReference): ml_collections checks its type
            continue
        if isinstance(default, bool) or isinstance(value, bool):
            _check(isinstance(value, bool) == isinstance(default, bool), key,
                   f"expected {type(default).__name__}, got {value!r}")
        elif isinstance(default, float):
            _check(isinstance(value, (int, float)), key, f"expected a number, got {value!r}")
        else:
            _check(isinstance(value, type(default)), key, f"expected {type(default).__name__}, got {value!r}")


def loss_arguments(dpo_config):
    """`preference_loss` keyword arguments of `config.dpo`: the loss type (names separated by commas
    make a mixture) and the variant options that are set (unset ones are None)."""
    options = {key: value for key, value in dpo_config.loss_options.items() if value is not None}
    if "loss_weights" in options:
        options["loss_weights"] = tuple(float(weight) for weight in options["loss_weights"].split(","))
    names = tuple(name.strip() for name in dpo_config.loss_type.split(","))
    return {"loss_type": names if len(names) > 1 else names[0], **options}


def _check_loss(dpo):
    """Traces the loss once on dummy pairs, so a bad option fails here, naming itself."""
    pairs = jnp.zeros(2, jnp.float32)
    lengths = jnp.ones(2, jnp.float32)
    try:
        jax.eval_shape(lambda: losses.preference_loss(
            pairs, pairs, pairs, pairs, beta=dpo.beta, label_smoothing=dpo.label_smoothing, chosen_lengths=lengths,
            rejected_lengths=lengths, **loss_arguments(dpo)))
    except (ValueError, TypeError) as error:
        raise ValueError(f"config.dpo.loss_options / loss_type: {error}") from error


def validate(config):
    """Raises ValueError naming the key for any invalid value of the config."""
    _check_schema(config)
    stages = tuple(config.stages)
    _check(stages and all(stage in STAGES for stage in stages) and len(set(stages)) == len(stages), "stages",
           f"must be distinct stages out of {STAGES}, got {stages}")
    for stage in STAGES:
        stage_config = config[stage]
        _check(stage_config.num_steps >= 0, f"{stage}.num_steps", "must be >= 0")
        _check(stage_config.learning_rate > 0, f"{stage}.learning_rate", "must be > 0")
        _check(stage_config.warmup_steps >= 0, f"{stage}.warmup_steps", "must be >= 0")
        _check(stage_config.schedule in ("constant", "linear", "cosine"), f"{stage}.schedule",
               f"must be constant, linear or cosine, got {stage_config.schedule!r}")
        _check(not stage_config.init_from or os.path.isdir(stage_config.init_from), f"{stage}.init_from",
               f"{stage_config.init_from!r} is not a directory")
    dpo = config.dpo
    _check(dpo.beta > 0, "dpo.beta", f"must be > 0, got {dpo.beta}")
    _check(0 <= dpo.label_smoothing < 0.5, "dpo.label_smoothing", f"must be in [0, 0.5), got {dpo.label_smoothing}")
    loss_types = [name.strip() for name in dpo.loss_type.split(",")]
    _check(all(name in losses.LOSS_TYPES for name in loss_types), "dpo.loss_type",
           f"{dpo.loss_type!r} is not one of {losses.LOSS_TYPES} (or several, separated by commas)")
    _check_loss(dpo)
    _check({"aot", "aot_unpaired"}.isdisjoint(loss_types) or "packed" not in config.data.layout, "dpo.loss_type",
           f"{dpo.loss_type!r} sorts over the batch, which packed layouts fill with empty pair slots; "
           f"use data.layout='padded' or 'prefix_shared'")
    _check(dpo.reference in ("live", "precomputed", "lora"), "dpo.reference",
           f"must be live, precomputed or lora, got {dpo.reference!r}")
    _check(dpo.reference != "lora" or config.model.lora.rank > 0, "dpo.reference",
           "'lora' needs LoRA adapters: set model.lora.rank > 0")
    _check(dpo.reference_dtype in ("", "float32", "bfloat16", "float16"), "dpo.reference_dtype",
           f"must be '', float32, bfloat16 or float16, got {dpo.reference_dtype!r}")
    _check(dpo.reference_update_every >= 0, "dpo.reference_update_every", "must be >= 0")
    _check(not dpo.reference_update_every or dpo.reference == "live", "dpo.reference_update_every",
           "TR-DPO updates a live reference: needs dpo.reference='live'")
    _check(0 < dpo.reference_update_alpha <= 1, "dpo.reference_update_alpha", "must be in (0, 1]")

    train = config.train
    _check(train.global_batch_size > 0, "train.global_batch_size", "must be > 0")
    _check(train.optimizer in ("adamw", "rmsprop"), "train.optimizer",
           f"must be adamw or rmsprop, got {train.optimizer!r}")
    _check(train.grad_clip_norm >= 0, "train.grad_clip_norm", "must be >= 0")
    _check(train.grad_accum_steps > 0 and train.global_batch_size % train.grad_accum_steps == 0,
           "train.grad_accum_steps", f"must be > 0 and divide train.global_batch_size={train.global_batch_size}")
    _check(train.log_every_steps > 0, "train.log_every_steps", "must be > 0")
    _check(config.eval.every_steps > 0, "eval.every_steps", "must be > 0")
    _check(config.eval.batch_size > 0, "eval.batch_size", "must be > 0")
    _check(config.checkpoint.every_steps > 0, "checkpoint.every_steps", "must be > 0")
    _check(config.checkpoint.max_to_keep > 0, "checkpoint.max_to_keep", "must be > 0")
    _check(config.checkpoint.every_minutes >= 0, "checkpoint.every_minutes", "must be >= 0")
    _check(config.checkpoint.best_mode in ("min", "max"), "checkpoint.best_mode",
           f"must be min or max, got {config.checkpoint.best_mode!r}")
    _check(train.max_nonfinite_steps > 0, "train.max_nonfinite_steps", "must be > 0")

    _validate_data(config)
    _validate_rlhf(config)

    _validate_model(config)


def _validate_rlhf(config):
    """The reward model, PPO, sample evaluation and experiment keys."""
    ppo = config.ppo
    _check(not ppo.reward_from or os.path.isdir(ppo.reward_from), "ppo.reward_from",
           f"{ppo.reward_from!r} is not a directory")
    stages = tuple(config.stages)
    _check("ppo" not in stages or ppo.reward != "model" or ppo.reward_from
           or ("reward" in stages and stages.index("reward") < stages.index("ppo")),
           "ppo.reward", "'model' needs a reward model: a 'reward' stage before 'ppo' in config.stages, or "
           "ppo.reward_from (a reward stage's checkpoint directory); or set a scorer (PPO-GT)")
    _check(ppo.kl_coef >= 0, "ppo.kl_coef", f"must be >= 0, got {ppo.kl_coef}")
    _check(ppo.target_kl > 0 and ppo.kl_horizon > 0, "ppo.target_kl", "target_kl and kl_horizon must be > 0")
    _check(ppo.num_epochs > 0, "ppo.num_epochs", "must be > 0")
    _check(ppo.num_minibatches > 0 and ("ppo" not in config.stages
                                         or config.train.global_batch_size % ppo.num_minibatches == 0),
           "ppo.num_minibatches", f"must be > 0 and divide train.global_batch_size={config.train.global_batch_size}")
    _check(ppo.clip_range > 0 and ppo.clip_range_value > 0, "ppo.clip_range", "clip ranges must be > 0")
    _check(0 <= ppo.gamma <= 1 and 0 <= ppo.lam <= 1, "ppo.gamma", "gamma and lam must be in [0, 1]")
    _check(ppo.temperature > 0, "ppo.temperature", "must be > 0")
    _check(ppo.max_new_tokens > 0, "ppo.max_new_tokens", "must be > 0")
    _check(config.unlikelihood.alpha >= 0, "unlikelihood.alpha", "must be >= 0")
    evaluation = config.evaluation
    try:
        temperatures = [float(t) for t in evaluation.temperatures.split(",")]
    except ValueError:
        temperatures = []
    _check(temperatures and min(temperatures) >= 0, "evaluation.temperatures",
           f"must be numbers >= 0 separated by commas, got {evaluation.temperatures!r}")
    for key in ("samples_per_prompt", "num_prompts", "max_new_tokens", "batch_size"):
        _check(evaluation[key] > 0, f"evaluation.{key}", "must be > 0")
    experiment = config.experiment
    _check(experiment.name in ("", "controlled_sentiment"), "experiment.name",
           f"must be '' or 'controlled_sentiment', got {experiment.name!r}")
    for key in ("dpo_betas", "ppo_kl_coefs", "ppo_gt_kl_coefs", "best_of_n"):
        try:
            values = [float(v) for v in experiment[key].split(",") if v.strip()]
        except ValueError:
            values = [-1.0]
        _check(all(v > 0 for v in values), f"experiment.{key}", f"must be numbers > 0 separated by commas, got "
               f"{experiment[key]!r}")
    _check(experiment.samples_per_prompt >= 2, "experiment.samples_per_prompt", "must be >= 2 to make pairs")


def _validate_model(config):
    model = config.model
    _check(model.attention_block_size >= 0, "model.attention_block_size", "must be >= 0 (0: dense attention)")
    _check(model.logits_chunk_size >= 0, "model.logits_chunk_size", "must be >= 0 (0: full logits)")
    if model.init_from_hf:
        # The architecture is the checkpoint's: its config.json must read (a clear error if not),
        # and the length check is against its positions.
        from dpo_jax import models  # pylint: disable=import-outside-toplevel
        try:
            architecture = models.decoder_config(model)
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"config.model.init_from_hf: {error}") from error
        _check(config.data.max_length <= architecture.max_position_embeddings, "data.max_length",
               f"exceeds the max_position_embeddings={architecture.max_position_embeddings} of "
               f"model.init_from_hf={model.init_from_hf!r}")
        return
    _check(model.embed_dim % model.num_heads == 0 or model.head_dim, "model.num_heads",
           f"must divide model.embed_dim={model.embed_dim} (or set model.head_dim)")
    _check(model.num_heads % model.num_kv_heads == 0, "model.num_kv_heads",
           f"must divide model.num_heads={model.num_heads}")
    _check(model.position_embedding in ("learned", "rope"), "model.position_embedding",
           f"must be learned or rope, got {model.position_embedding!r}")
    _check(model.norm in ("layernorm", "rmsnorm"), "model.norm", f"must be layernorm or rmsnorm, got {model.norm!r}")
    _check(config.data.max_length <= model.max_position_embeddings, "data.max_length",
           f"exceeds model.max_position_embeddings={model.max_position_embeddings}")


def _validate_data(config):
    # Imported here: the data package imports TFDS, which the other checks do not need.
    from dpo_jax.data import DATASETS, builders, layouts, records  # pylint: disable=import-outside-toplevel

    data = config.data
    names = [name.strip() for name in data.name.split(",")]
    for name in names:
        base, _, variant = name.partition("/")
        _check(base in DATASETS, "data.name", f"{name!r} is not a known dataset; known: {DATASETS}")
        if base == "hh_rlhf":
            known = tuple(c.name for c in builders.HhRlhf.BUILDER_CONFIGS)
            _check(variant in known, "data.name", f"{name!r}: hh_rlhf needs a config, one of {known}")
    _check(len(set(names)) == len(names), "data.name", f"names a dataset twice: {data.name!r}")
    _check(not data.weights or (len(data.weights) == len(names) and all(w > 0 for w in data.weights)),
           "data.weights", f"must be empty or one positive weight per dataset of data.name, got {data.weights}")
    _check(0 < data.max_prompt_length < data.max_length, "data.max_prompt_length",
           f"must be in (0, data.max_length={data.max_length}), got {data.max_prompt_length}")
    _check(data.num_train > 0 and data.num_eval > 0, "data.num_train", "num_train and num_eval must be > 0")
    _check(data.layout in layouts.LAYOUTS, "data.layout", f"{data.layout!r} is not one of {layouts.LAYOUTS}")
    # Rows shorter than 2 * max_length may not hold the longest pair: packing then names it.
    _check(data.row_length == 0 or data.row_length >= data.max_length, "data.row_length",
           f"must be 0 (2 * data.max_length, which fits any pair) or >= data.max_length = {data.max_length}, "
           f"got {data.row_length}")
    _check(data.max_pairs_per_row > 0, "data.max_pairs_per_row", f"must be > 0, got {data.max_pairs_per_row}")
    _check(data.on_bad_example in records.ON_BAD_EXAMPLE, "data.on_bad_example",
           f"must be one of {records.ON_BAD_EXAMPLE}, got {data.on_bad_example!r}")
    real = [name for name in names if name != "synthetic"]
    if real or data.pretrain_files:
        tokenizer = data.tokenizer or config.model.init_from_hf
        _check(tokenizer and os.path.exists(tokenizer), "data.tokenizer",
               f"{'datasets ' + str(real) if real else 'data.pretrain_files'} need a tokenizer: a model dir or "
               f"tokenizer.json (or model.init_from_hf), got {tokenizer!r}")
    _check("pretrain" not in config.stages or data.pretrain_files or not real, "data.pretrain_files",
           "the pretrain stage needs texts: data.pretrain_files (JSON lines of {\"text\": ...})")
    _check(not data.pretrain_files or data.pretrain_eval_files, "data.pretrain_eval_files",
           "data.pretrain_files needs held-out texts as well")
    for key in ("pretrain_files", "pretrain_eval_files"):
        for path in filter(None, (p.strip() for p in data[key].split(","))):
            _check(os.path.isfile(path), f"data.{key}", f"{path!r} is not a file")
    _check(not data.manual_dir or os.path.isdir(data.manual_dir), "data.manual_dir",
           f"{data.manual_dir!r} is not a directory")
    if "preference_files" in names:
        _check(data.train_files or data.sft_train_files, "data.train_files",
               "preference_files needs data.train_files (or data.sft_train_files for SFT only)")
        for key in ("train_files", "eval_files", "sft_train_files", "sft_eval_files"):
            for path in filter(None, (p.strip() for p in data[key].split(","))):
                _check(os.path.isfile(path), f"data.{key}", f"{path!r} is not a file")


def bind_workdir(config, workdir):
    """Writes `config.json` on a new workdir; on an existing one, refuses a different config."""
    path = os.path.join(workdir, "config.json")
    resolved = json.loads(config.to_json_best_effort())
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            saved = flatten(json.load(f))
        current = flatten(resolved)
        differing = sorted(key for key in set(saved) | set(current)
                           if saved.get(key) != current.get(key) and key not in RESUMABLE_CHANGES)
        if differing:
            changes = "; ".join(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in differing)
            raise ValueError(f"Workdir {workdir} holds a different run (its config.json differs in {changes}). "
                             f"Use a new --workdir, or undo the changes to resume it.")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(resolved, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
