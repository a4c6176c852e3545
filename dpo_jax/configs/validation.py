"""Config checks that run before anything compiles: every error names the offending key.

`validate(config)` first splits comma strings of list-valued keys (`schema.LIST_KEYS`) into tuples,
so `--config.dpo.loss_type=sigmoid,sft` and `("sigmoid", "sft")` mean the same, then
checks every key against the schema and every value. Each stage checks its own block
(`dpo_jax.stages`, `Stage.validate`).
"""

import importlib.util

from dpo_jax import models, scorers, stages, storage
from dpo_jax.configs import schema
from dpo_jax.data import builders, layouts, records, task
from dpo_jax.stages.base import check as _check
from dpo_jax.stages.base import check_optimizer_block


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


def _check_schema(config):
    """Unknown keys and wrong types against `schema.base_config()`."""
    defaults = flatten(schema.base_config())
    if "bench" in config:
        defaults.update(flatten({"bench": schema.bench_config()}))
    for key, value in flatten(config).items():
        _check(key in defaults, key, "unknown key (a typo? dpo_jax/configs/schema.py and dpo_jax/stages/ hold every "
               "key)")
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


def _split_item(item, item_type, key):
    """The items of one element of a list-valued key: a comma string's parts, or the element itself."""
    parts = [part.strip() for part in item.split(",") if part.strip()] if isinstance(item, str) else [item]
    items = []
    for part in parts:
        try:
            items.append(item_type(part))
        except (TypeError, ValueError):
            raise ValueError(f"config.{key}: {part!r} is not a {item_type.__name__}") from None
    return items


def normalize_lists(config):
    """Rewrites the list-valued keys of `config` as tuples of their items' type, splitting comma strings."""
    for key, item_type in schema.LIST_KEYS.items():
        *parents, leaf = key.split(".")
        block = config
        for parent in parents:
            block = block.get(parent) if block is not None else None
        if block is not None and leaf in block:  # None: no items
            block[leaf] = tuple(part for item in block[leaf] or () for part in _split_item(item, item_type, key))


def validate(config):
    """Raises ValueError naming the key for any invalid value of the config; list-valued keys given as
    comma strings become tuples first (`normalize_lists`)."""
    normalize_lists(config)
    _check_schema(config)
    names = tuple(config.stages)
    _check(names and all(name in stages.STAGES for name in names) and len(set(names)) == len(names), "stages",
           f"must be distinct stages out of {tuple(stages.STAGES)}, got {names}")
    for stage in stages.STAGES.values():
        check_optimizer_block(config, stage.name)
        init_from = config[stage.name].init_from
        _check(not init_from or storage.isdir(init_from), f"{stage.name}.init_from",
               f"{init_from!r} is not a directory")
        stage.validate(config)

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
    _validate_evaluation(config)

    _validate_model(config)


def _validate_evaluation(config):
    """The sample evaluation and experiment keys."""
    evaluation = config.evaluation
    _check(evaluation.temperatures and min(evaluation.temperatures) >= 0, "evaluation.temperatures",
           f"must be one or more numbers >= 0, got {evaluation.temperatures!r}")
    for key in ("samples_per_prompt", "num_prompts", "max_new_tokens", "batch_size"):
        _check(evaluation[key] > 0, f"evaluation.{key}", "must be > 0")
    experiment = config.experiment
    _check(experiment.name in ("", "controlled_sentiment"), "experiment.name",
           f"must be '' or 'controlled_sentiment', got {experiment.name!r}")
    # Scorers and plots are built after training: their specs and packages are checked now.
    specs = [("evaluation.scorer", evaluation.scorer, False), ("evaluation.judge", evaluation.judge, True),
             ("experiment.pair_scorer", experiment.pair_scorer, False)]
    if "ppo" in config.stages and config.ppo.reward != "model":
        specs.append(("ppo.reward", config.ppo.reward, False))
    for key, spec, judge in specs:
        if spec:
            scorers.check_spec(spec, key, judge=judge)
    plotted = {"evaluation.judge": evaluation.judge, "experiment.name": experiment.name}
    for key, value in plotted.items():
        _check(not value or importlib.util.find_spec("matplotlib") is not None, key,
               f"{value!r} plots its results with matplotlib, which is not installed: pip install 'dpo_jax[repro]'")
    for key in ("dpo_betas", "ppo_kl_coefs", "ppo_gt_kl_coefs", "best_of_n"):
        _check(all(v > 0 for v in experiment[key]), f"experiment.{key}", f"must be numbers > 0, got "
               f"{experiment[key]!r}")
    _check(experiment.samples_per_prompt >= 2, "experiment.samples_per_prompt", "must be >= 2 to make pairs")


def _validate_model(config):
    model = config.model
    _check(model.attention_block_size >= 0, "model.attention_block_size", "must be >= 0 (0: dense attention)")
    _check(model.logits_chunk_size >= 0, "model.logits_chunk_size", "must be >= 0 (0: full logits)")
    if model.init_from_hf:
        # The architecture is the checkpoint's: its config.json must read (a clear error if not), and
        # its fields replace the preset's in config.model, so that everything downstream (the data's
        # vocabulary check, config.json of the workdir) sees the model that is trained.
        try:
            architecture = models.hf.architecture_fields(model.init_from_hf)
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"config.model.init_from_hf: {error}") from error
        for key, value in architecture.items():
            if key in model and model[key] != value:
                model[key] = type(model[key])(value) if model[key] is not None else value
        _check(config.data.max_length <= model.max_position_embeddings, "data.max_length",
               f"exceeds the max_position_embeddings={model.max_position_embeddings} of "
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
    data = config.data
    names = data.name
    for name in names:
        dataset, _, variant = name.partition("/")
        _check(dataset in task.DATASETS, "data.name", f"{name!r} is not a known dataset; known: {task.DATASETS}")
        if dataset == "hh_rlhf":
            known = tuple(c.name for c in builders.HhRlhf.BUILDER_CONFIGS)
            _check(variant in known, "data.name", f"{name!r}: hh_rlhf needs a config, one of {known}")
    _check(names and len(set(names)) == len(names), "data.name", f"must name distinct datasets, got {data.name!r}")
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
        _check(tokenizer and storage.exists(tokenizer), "data.tokenizer",
               f"{'datasets ' + str(real) if real else 'data.pretrain_files'} need a tokenizer: a model dir or "
               f"tokenizer.json (or model.init_from_hf), got {tokenizer!r}")
    _check("pretrain" not in config.stages or data.pretrain_files or not real, "data.pretrain_files",
           "the pretrain stage needs texts: data.pretrain_files (JSON lines of {\"text\": ...})")
    _check(not data.pretrain_files or data.pretrain_eval_files, "data.pretrain_eval_files",
           "data.pretrain_files needs held-out texts as well")
    for key in ("pretrain_files", "pretrain_eval_files"):
        for path in data[key]:
            _check(storage.isfile(path), f"data.{key}", f"{path!r} is not a file")
    _check(not data.manual_dir or storage.isdir(data.manual_dir), "data.manual_dir",
           f"{data.manual_dir!r} is not a directory")
    if "preference_files" in names:
        _check(data.train_files or data.sft_train_files, "data.train_files",
               "preference_files needs data.train_files (or data.sft_train_files for SFT only)")
        for key in ("train_files", "eval_files", "sft_train_files", "sft_eval_files"):
            for path in data[key]:
                _check(storage.isfile(path), f"data.{key}", f"{path!r} is not a file")
