"""Data: preference pairs and SFT examples as token arrays in a layout, batched by grain.

    task = dpo_jax.data.load_task(config)   # the arrays of config.data, for config.model's vocabulary

Datasets are TFDS builders (`builders`; importing this package registers them, so
`tfds.builder("hh_rlhf/harmless-base", data_dir=...)` works), prepared once to array_record and
read back as random-access data sources; `config.data.name = "synthetic"` is the built-in task of
the quickstart. Several names separated by commas make a weighted mixture (`config.data.weights`).
Each split is tokenised (`tokenize`), truncated and laid out (`layouts`) once, identically in
every process; `loader` then serves each process its share of every batch.
"""

import dataclasses
import os
from typing import Dict, List, Optional, Tuple

import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from jax.experimental import multihost_utils

from dpo_jax.data import builders, layouts, records, synthetic, tokenize  # builders: registers the datasets

DATASETS = ("synthetic", "hh_rlhf", "stanford_shp", "ultrafeedback_binarized", "tldr_comparisons", "imdb_prefixes",
            "preference_files")


@dataclasses.dataclass
class Task:
    """Token arrays of one task: DPO pairs and SFT rows, train and eval (None for a stage not run);
    `num_truncated`: examples truncated (as DPO sees them, or SFT when it runs alone).

    A mixture's components are concatenated; `*_mixture` then lists (start, stop, weight) of each
    component's units for the loader. `report` holds, per dataset and split, the counts of
    examples, skipped examples by reason, truncated examples, and the layout's padding figures.
    """
    dpo_train: Optional[Dict[str, np.ndarray]]
    dpo_eval: Optional[Dict[str, np.ndarray]]
    sft_train: Optional[Dict[str, np.ndarray]]
    sft_eval: Optional[Dict[str, np.ndarray]]
    num_truncated: int
    report: Dict[str, dict] = dataclasses.field(default_factory=dict)
    dpo_mixture: Optional[List[Tuple[int, int, float]]] = None
    sft_mixture: Optional[List[Tuple[int, int, float]]] = None


def dataset_names(data_config):
    return [name.strip() for name in data_config.name.split(",")]


def _files(value):
    return [path.strip() for path in value.split(",") if path.strip()]


def builder(name, data_config):
    """The TFDS builder of one dataset name of `config.data` (preference_files: of its *_files keys)."""
    kwargs = dict(data_dir=data_config.data_dir or None, file_format="array_record",
                  on_bad_example=data_config.on_bad_example)
    if name == "preference_files":
        files = {"train": _files(data_config.train_files), "test": _files(data_config.eval_files),
                 "sft_train": _files(data_config.sft_train_files), "sft_test": _files(data_config.sft_eval_files)}
        return tfds.builder(name, config=builders.FilesConfig.of({k: v for k, v in files.items() if v}), **kwargs)
    return tfds.builder(name, **kwargs)


def prepare(name, data_config):
    """The builder of `name`, prepared (by process 0; the others wait for it)."""
    dataset_builder = builder(name, data_config)
    if jax.process_index() == 0:
        download_config = tfds.download.DownloadConfig(manual_dir=data_config.manual_dir or None)
        dataset_builder.download_and_prepare(download_config=download_config)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"dpo_jax.data: {name} prepared")
        dataset_builder = builder(name, data_config)
    return dataset_builder


def _decoded(example):
    text = lambda value: value.decode("utf-8") if isinstance(value, bytes) else value
    messages = example["prompt_messages"]
    return {"prompt": text(example["prompt"]), "chosen": text(example["chosen"]),
            "rejected": text(example["rejected"]), "source": text(example["source"]),
            "prompt_messages": [{"role": text(role), "content": text(content)}
                                for role, content in zip(messages["role"], messages["content"])]}


def read_split(dataset_builder, split, data_config):
    """The decoded examples of a prepared split, and its preparation counts (from the metadata)."""
    if split not in dataset_builder.info.splits:
        raise ValueError(f"{dataset_builder.info.full_name} has no split {split!r} (it has "
                         f"{sorted(dataset_builder.info.splits)}; were its raw files in data.manual_dir?)")
    counts = dict(dataset_builder.info.metadata.get(split, {}))
    if counts.get("skipped") and data_config.on_bad_example == "error":
        raise ValueError(f"{dataset_builder.info.full_name}/{split} was prepared with on_bad_example='skip', which "
                         f"skipped {counts['skipped']} (e.g. {counts['skipped_examples'][:3]}); with "
                         f"config.data.on_bad_example='error' delete {dataset_builder.data_dir} to see the errors")
    source = dataset_builder.as_data_source(split)
    return [_decoded(example) for example in source.__getitems__(range(len(source)))], counts


def _truncated_pairs(tokenized, data_config, need_rejected):
    """(pairs {prompt, chosen[, rejected]}, number truncated) after truncation."""
    pairs, num_truncated = [], 0
    for prompt, responses in zip(tokenized.prompts, tokenized.responses):
        prompt, responses, truncated = layouts.truncate_example(
            prompt, responses, max_length=data_config.max_length, max_prompt_length=data_config.max_prompt_length,
            keep_prefix=int(tokenized.bos_id is not None))
        num_truncated += truncated
        pairs.append(dict(prompt=prompt, chosen=responses[0], **({"rejected": responses[1]} if need_rejected else {})))
    return pairs, num_truncated


def _layout_kwargs(data_config):
    return dict(max_length=data_config.max_length, max_pairs_per_row=data_config.max_pairs_per_row,
                row_length=data_config.row_length or 2 * data_config.max_length)


def _split_arrays(pairs, data_config, stage):
    if stage == "dpo":
        return layouts.pair_arrays(pairs, data_config.layout, **_layout_kwargs(data_config))
    return layouts.sft_arrays([p["prompt"] for p in pairs], [p["chosen"] for p in pairs], data_config.layout,
                              **_layout_kwargs(data_config))


def _check_vocab(pairs, vocab_size, where):
    largest = max(max(max(ids, default=0) for ids in pair.values()) for pair in pairs)
    if largest >= vocab_size:
        raise ValueError(f"{where}: token id {largest} is outside config.model.vocab_size={vocab_size} "
                         "(does data.tokenizer belong to the model?)")


def _dataset_splits(name, data_config, stage):
    """The (train, eval) split names a stage reads from dataset `name`."""
    if stage == "dpo":
        return data_config.train_split, data_config.eval_split
    return data_config.sft_split or data_config.train_split, data_config.sft_eval_split or data_config.eval_split


def _real_dataset_pairs(name, data_config, stage, split, tokenizer):
    """Truncated token pairs of one split of a TFDS dataset, and its report entry."""
    dataset_builder = prepare(name, data_config)
    examples, counts = read_split(dataset_builder, split, data_config)
    bad = records.BadExamples(data_config.on_bad_example)
    tokenized = tokenize.tokenize(examples, tokenizer, bad=bad, check_boundaries=data_config.check_boundaries,
                                  use_chat_template=data_config.chat_template, need_rejected=stage == "dpo")
    if not tokenized.prompts:
        raise ValueError(f"{name}/{split}: no usable examples for {stage} (skipped: {dict(bad.counts)}; "
                         f"first: {bad.kept[:3]})")
    pairs, num_truncated = _truncated_pairs(tokenized, data_config, need_rejected=stage == "dpo")
    return pairs, {
        "examples": len(pairs), "truncated": num_truncated,
        "skipped_when_prepared": counts.get("skipped", {}), "skipped_when_tokenised": dict(bad.counts),
        "skipped_examples": counts.get("skipped_examples", []) + bad.kept,
        **{key: value for key, value in counts.items()
           if key not in ("skipped", "skipped_examples", "examples", "on_bad_example")}}


def _synthetic_pairs(config, evaluation):
    data_config = config.data
    pairs = synthetic.make_pairs(data_config.num_eval if evaluation else data_config.num_train,
                                 seed=config.seed + int(evaluation), vocab_size=config.model.vocab_size)
    truncated_pairs, num_truncated = [], 0
    for pair in pairs:
        prompt, responses, truncated = layouts.truncate_example(
            pair["prompt"], [pair["chosen"], pair["rejected"]], max_length=data_config.max_length,
            max_prompt_length=data_config.max_prompt_length)
        num_truncated += truncated
        truncated_pairs.append(dict(prompt=prompt, chosen=responses[0], rejected=responses[1]))
    return truncated_pairs, {"examples": len(pairs), "truncated": num_truncated}


def _stage_arrays(config, stage, evaluation, tokenizer, report):
    """(arrays, mixture, number truncated) of a stage's train or eval data, over all of config.data's datasets."""
    data_config = config.data
    names = dataset_names(data_config)
    weights = list(data_config.weights) or [1.0] * len(names)
    parts, num_truncated = [], 0
    for name in names:
        if name == "synthetic":
            split = "eval" if evaluation else "train"
            pairs, entry = _synthetic_pairs(config, evaluation)
        else:
            split = _dataset_splits(name, data_config, stage)[int(evaluation)]
            pairs, entry = _real_dataset_pairs(name, data_config, stage, split, tokenizer)
        _check_vocab(pairs, config.model.vocab_size, f"{name}/{split}")
        arrays = _split_arrays(pairs, data_config, stage)
        report[f"{stage} {name}/{split}"] = {**entry, **layouts.token_stats(arrays, len(pairs))}
        num_truncated += entry["truncated"]
        parts.append(arrays)
    arrays = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    sizes = np.cumsum([0] + [len(next(iter(part.values()))) for part in parts])
    mixture = None if len(parts) == 1 or evaluation else [
        (int(start), int(stop), float(weight)) for start, stop, weight in zip(sizes[:-1], sizes[1:], weights)]
    return arrays, mixture, num_truncated


def load_task(config) -> Task:
    """Builds the token arrays of `config.data` for `config.model`'s vocabulary, for the stages in `config.stages`."""
    data_config = config.data
    names = dataset_names(data_config)
    tokenizer = None
    if any(name != "synthetic" for name in names):
        tokenizer = tokenize.load(data_config.tokenizer or config.model.init_from_hf)
    report, arrays, mixtures, num_truncated = {}, {}, {}, 0
    for stage in ("dpo", "sft"):
        if stage not in config.stages:
            continue
        arrays[f"{stage}_train"], mixtures[stage], truncated_train = _stage_arrays(config, stage, False, tokenizer,
                                                                                   report)
        arrays[f"{stage}_eval"], _, truncated_eval = _stage_arrays(config, stage, True, tokenizer, report)
        # The same examples serve both stages: count them once, as DPO sees them when it runs.
        if stage == "dpo" or "dpo" not in config.stages:
            num_truncated = truncated_train + truncated_eval
    for key, entry in report.items():
        logging.info("data %s: %s", key, entry)
    return Task(dpo_train=arrays.get("dpo_train"), dpo_eval=arrays.get("dpo_eval"), sft_train=arrays.get("sft_train"),
                sft_eval=arrays.get("sft_eval"), num_truncated=num_truncated, report=report,
                dpo_mixture=mixtures.get("dpo"), sft_mixture=mixtures.get("sft"))
