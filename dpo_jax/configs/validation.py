"""Config checks that run before anything compiles: every error names the offending key.

`validate(config)` first splits comma strings of list-valued keys (`schema.LIST_KEYS`) into tuples,
so `--config.dpo.loss_type=sigmoid,sft` and `("sigmoid", "sft")` mean the same, then
checks every key against the schema and every value. Every float must be finite (NaN or inf in any
key is refused before anything runs: beta=inf would skip every update, weight_decay=nan poison every
parameter), and every number in `RANGES` lie in its range. Each stage checks its own block
(`dpo_jax.stages`, `Stage.validate`).
"""

import difflib
import importlib.util
import math

from dpo_jax import models, scorers, stages, storage
from dpo_jax.configs import schema
from dpo_jax.data import builders, layouts, records, task
from dpo_jax.models import kernels
from dpo_jax.stages.base import check as _check
from dpo_jax.stages.base import check_optimizer_block

# Compute and storage dtypes of the model: what XLA runs on TPU, GPU and CPU (the compute dtype may also be
# "auto", `models.compute_dtype`).
DTYPES = ("float32", "bfloat16", "float16")
# The benchmark's TRL side: auto picks the faster of float32 and bf16 autocast on the host.
TRL_DTYPES = ("auto", "float32", "bfloat16")
ATTENTION_KERNELS = ("auto",) + kernels.IMPLEMENTATIONS
# The stages that sample in their step and whose `reward` may be a scorer spec.
ONLINE_STAGES = ("ppo", "online_dpo", "grpo")

# The range of each number that does not depend on other keys, as an interval ("(0, inf)": > 0),
# and an optional note for the message. Every float key of the schema is here (a test checks it),
# and ints whose out-of-range values would fail late or obscurely. Lists check each item.
_POSITIVE, _NON_NEGATIVE, _FINITE = "(0, inf)", "[0, inf)", "(-inf, inf)"
RANGES = {
    "train.global_batch_size": _POSITIVE,
    "train.b1": ("[0, 1)", "adam's first-moment decay"),
    "train.b2": ("[0, 1)", "adam's second-moment decay"),
    "train.weight_decay": _NON_NEGATIVE,
    "train.grad_clip_norm": (_NON_NEGATIVE, "0: no clipping"),
    "train.log_every_steps": _POSITIVE,
    "train.max_nonfinite_steps": _POSITIVE,
    **{f"{name}.learning_rate": (_POSITIVE, "for a stage that should not train, set num_steps=0")
       for name in stages.STAGES},
    "dpo.beta": _POSITIVE,
    "dpo.label_smoothing": "[0, 0.5)",
    "dpo.reference_update_alpha": "(0, 1]",
    "dpo.loss_options.loss_weights": _FINITE,
    "dpo.loss_options.simpo_gamma": _FINITE,
    "dpo.loss_options.rpo_alpha": _NON_NEGATIVE,
    "dpo.loss_options.discopop_tau": _POSITIVE,
    "dpo.loss_options.f_alpha": "(0, 1)",
    "kto.beta": _POSITIVE,
    "kto.desirable_weight": _POSITIVE,
    "kto.undesirable_weight": _POSITIVE,
    "ppo.clip_range": _POSITIVE,
    "ppo.clip_range_value": _POSITIVE,
    "ppo.gamma": "[0, 1]",
    "ppo.lam": "[0, 1]",
    "ppo.kl_coef": _NON_NEGATIVE,
    "ppo.target_kl": _POSITIVE,
    "ppo.temperature": _POSITIVE,
    "ppo.value_coef": _NON_NEGATIVE,
    "online_dpo.beta": _POSITIVE,
    "online_dpo.beta_schedule": _POSITIVE,
    "online_dpo.temperature": _POSITIVE,
    "grpo.beta": (_NON_NEGATIVE, "0: no KL penalty"),
    "grpo.epsilon": _POSITIVE,
    "grpo.epsilon_high": (_NON_NEGATIVE, "0: epsilon"),
    "grpo.temperature": _POSITIVE,
    "unlikelihood.alpha": _NON_NEGATIVE,
    "data.weights": _POSITIVE,
    "evaluation.temperatures": (_NON_NEGATIVE, "0: greedy"),
    "experiment.dpo_betas": _POSITIVE,
    "experiment.ppo_kl_coefs": _POSITIVE,
    "experiment.ppo_gt_kl_coefs": _POSITIVE,
    "experiment.ipo_betas": _POSITIVE,
    "experiment.online_dpo_betas": _POSITIVE,
    "experiment.grpo_betas": (_NON_NEGATIVE, "0: no KL penalty"),
    "experiment.best_of_n": _POSITIVE,
    "experiment.samples_per_prompt": ("[2, inf)", "to make pairs"),
    "experiment.dpo_learning_rates": _POSITIVE,
    "experiment.ppo_target_kls": _POSITIVE,
    "experiment.num_seeds": ("[1, inf)", "one run per seed"),
    "experiment.trajectory_every": (_NON_NEGATIVE, "0: only the final policy"),
    "experiment.kl_budgets": _POSITIVE,
    "evaluation.samples_per_prompt": _POSITIVE,
    "evaluation.num_prompts": _POSITIVE,
    "evaluation.max_new_tokens": _POSITIVE,
    "evaluation.batch_size": _POSITIVE,
    "eval.every_steps": _POSITIVE,
    "eval.batch_size": _POSITIVE,
    "checkpoint.every_steps": _POSITIVE,
    "checkpoint.every_minutes": (_NON_NEGATIVE, "0: off"),
    "checkpoint.max_to_keep": _POSITIVE,
    "model.vocab_size": _POSITIVE,
    "model.num_layers": _POSITIVE,
    "model.embed_dim": _POSITIVE,
    "model.num_heads": _POSITIVE,
    "model.num_kv_heads": _POSITIVE,
    "model.head_dim": (_NON_NEGATIVE, "0: embed_dim / num_heads"),
    "model.mlp_dim": _POSITIVE,
    "model.max_position_embeddings": _POSITIVE,
    "model.sliding_window": (_NON_NEGATIVE, "0: full attention"),
    "model.attention_block_size": (_NON_NEGATIVE, "0: dense attention"),
    "model.attention_kernel_block_size": (_POSITIVE, "the fused kernels' block"),
    "model.logits_chunk_size": (_NON_NEGATIVE, "0: full logits"),
    "model.norm_eps": _POSITIVE,
    "model.norm_scale_offset": _FINITE,
    "model.rope_theta": _POSITIVE,
    "model.rotary_fraction": "(0, 1]",
    "model.rope_scaling_factor": _POSITIVE,
    "model.rope_low_freq_factor": _POSITIVE,
    "model.rope_high_freq_factor": _POSITIVE,
    "model.rope_original_max_position_embeddings": _POSITIVE,
    "model.lora.rank": (_NON_NEGATIVE, "0: no adapters"),
    "model.lora.alpha": _POSITIVE,
}


def _interval(spec):
    """(low, high, low_inclusive, high_inclusive) of an interval such as "[0, 1)"."""
    low, high = spec[1:-1].split(",")
    return float(low), float(high), spec[0] == "[", spec[-1] == "]"


def _range_message(spec):
    """What a value outside `spec` is told: "must be > 0", "must be in [0, 1)"."""
    low, high, low_inclusive, _ = _interval(spec)
    if math.isinf(low) and math.isinf(high):
        return "must be a finite number"
    if math.isinf(high):
        return f"must be {'>=' if low_inclusive else '>'} {spec[1:-1].split(',')[0].strip()}"
    return f"must be in {spec}"


def _in_range(value, spec):
    low, high, low_inclusive, high_inclusive = _interval(spec)
    return ((low <= value if low_inclusive else low < value) and
            (value <= high if high_inclusive else value < high))


def _check_numbers(flat):
    """Every float (or list item) finite, every key of `RANGES` in its range; None (unset) passes."""
    for key, value in flat.items():
        items = value if isinstance(value, (tuple, list)) else (value,)
        _check(all(math.isfinite(item) for item in items if isinstance(item, float)), key,
               f"must be {'finite numbers' if items is value else 'a finite number'} (no NaN or inf), got {value!r}")
    for key, spec in RANGES.items():
        value = flat.get(key)
        if value is None:
            continue
        spec, note = spec if isinstance(spec, tuple) else (spec, "")
        items = value if isinstance(value, (tuple, list)) else (value,)
        message = _range_message(spec) + (f" ({note})" if note else "")
        _check(all(_in_range(item, spec) for item in items), key,
               f"{'each item ' if items is value else ''}{message}, got {value!r}")


def unknown_key(key, known, prefix="config"):
    """The message of an unknown `key` (a dotted path) among the `known` (leaf) keys: the close key or
    block if there is one (`--config.dpo.betta` and `config.dpo.betta = ...` in a config file get the
    same answer)."""
    known = set(known) | {name.rsplit(".", depth)[0] for name in known for depth in range(1, name.count(".") + 1)}
    parent, _, leaf = key.rpartition(".")
    siblings = [name.rpartition(".")[2] for name in known if name.rpartition(".")[0] == parent]
    close = [f"{parent}.{name}" if parent else name
             for name in difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.7)]
    close = close or difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
    if close:
        return f"unknown key (did you mean {prefix}.{close[0]}?)"
    return "unknown key (dpo_jax/configs/schema.py and dpo_jax/stages/ hold every key)"


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
        if key not in defaults:
            raise ValueError(f"config.{key}: {unknown_key(key, defaults)}")
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
    _check_numbers(flatten(config))
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
    _check(train.optimizer in ("adamw", "rmsprop"), "train.optimizer",
           f"must be adamw or rmsprop, got {train.optimizer!r}")
    _check(train.grad_accum_steps > 0 and train.global_batch_size % train.grad_accum_steps == 0,
           "train.grad_accum_steps", f"must be > 0 and divide train.global_batch_size={train.global_batch_size}")
    _check(config.checkpoint.best_mode in ("min", "max"), "checkpoint.best_mode",
           f"must be min or max, got {config.checkpoint.best_mode!r}")
    if "bench" in config:
        _check(config.bench.compute_dtype in ("auto",) + DTYPES, "bench.compute_dtype",
               f"must be auto or one of {DTYPES}, got {config.bench.compute_dtype!r}")
        _check(config.bench.trl_dtype in TRL_DTYPES, "bench.trl_dtype",
               f"must be one of {TRL_DTYPES}, got {config.bench.trl_dtype!r}")
        for key in ("rounds", "steps", "warmup_steps"):  # a warm-up step separates compiling from timing
            _check(config.bench[key] >= 1, f"bench.{key}", f"must be >= 1, got {config.bench[key]}")

    _validate_data(config)
    _validate_evaluation(config)

    _validate_model(config)


def _validate_evaluation(config):
    """The sample evaluation and experiment keys."""
    evaluation = config.evaluation
    _check(evaluation.temperatures, "evaluation.temperatures", "must be one or more numbers >= 0, got ()")
    experiment = config.experiment
    _check(experiment.name in ("", "controlled_sentiment"), "experiment.name",
           f"must be '' or 'controlled_sentiment', got {experiment.name!r}")
    methods = tuple(schema.EXPERIMENT_METHODS.values())
    unknown = [method for method in experiment.seeded_methods if method not in methods]
    _check(not unknown, "experiment.seeded_methods", f"{unknown} are not among the methods {methods}")
    # Scorers and plots are built after training: their specs and packages are checked now.
    specs = [("evaluation.scorer", evaluation.scorer, False), ("evaluation.judge", evaluation.judge, True),
             ("experiment.pair_scorer", experiment.pair_scorer, False)]
    for name in ONLINE_STAGES:
        if name in config.stages and config[name].reward != "model":
            specs.append((f"{name}.reward", config[name].reward, False))
    if "online_dpo" in config.stages and config.online_dpo.judge:
        specs.append(("online_dpo.judge", config.online_dpo.judge, True))
    for key, spec, judge in specs:
        if spec:
            scorers.check_spec(spec, key, judge=judge)
    plotted = {"evaluation.judge": evaluation.judge, "experiment.name": experiment.name}
    for key, value in plotted.items():
        _check(not value or importlib.util.find_spec("matplotlib") is not None, key,
               f"{value!r} plots its results with matplotlib, which is not installed: pip install 'dpo_jax[repro]'")


def _validate_model(config):
    model = config.model
    _check(model.dtype in ("auto",) + DTYPES, "model.dtype", f"must be auto or one of {DTYPES}, got {model.dtype!r}")
    _check(model.param_dtype in DTYPES, "model.param_dtype", f"must be one of {DTYPES}, got {model.param_dtype!r}")
    _check(model.rope_scaling != "llama3" or model.rope_high_freq_factor > model.rope_low_freq_factor,
           "model.rope_high_freq_factor", f"llama3 rope scaling needs it > model.rope_low_freq_factor="
           f"{model.rope_low_freq_factor}, got {model.rope_high_freq_factor}")
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
    _check(model.attention_kernel in ATTENTION_KERNELS, "model.attention_kernel",
           f"must be one of {ATTENTION_KERNELS}, got {model.attention_kernel!r}")
    _check(not (model.sliding_window and model.attention_kernel in kernels.IMPLEMENTATIONS[1:]),
           "model.attention_kernel", f"{model.attention_kernel} takes no sliding window (model.sliding_window="
           f"{model.sliding_window}); use auto or dense")
    block, fused = model.attention_kernel_block_size, kernels.resolve(model.attention_kernel)
    _check(fused != "splash" or block % kernels.TPU_LANES == 0, "model.attention_kernel_block_size",
           f"must be a multiple of {kernels.TPU_LANES} for splash attention, got {block}")
    _check(fused != "pallas_gpu" or (block >= 16 and not block & (block - 1)), "model.attention_kernel_block_size",
           f"must be a power of two >= 16 for pallas_gpu attention, got {block}")
    _check(model.position_embedding in ("learned", "rope"), "model.position_embedding",
           f"must be learned or rope, got {model.position_embedding!r}")
    _check(model.norm in ("layernorm", "rmsnorm"), "model.norm", f"must be layernorm or rmsnorm, got {model.norm!r}")
    _check(config.data.max_length <= model.max_position_embeddings, "data.max_length",
           f"exceeds model.max_position_embeddings={model.max_position_embeddings}")
    try:  # the model's own checks (activation, rope_scaling, LoRA targets, ...), now rather than at planning
        models.decoder_config(model)
    except ValueError as error:  # its messages start with the key, "model.activation=..."
        raise ValueError(f"config.{error}") from error


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
