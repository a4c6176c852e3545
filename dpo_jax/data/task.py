"""A run's token arrays: preference pairs, SFT examples, unpaired examples, pretraining texts and prompts.

    task = dpo_jax.data.task.load_task(config)   # the arrays config.stages read, for config.model's vocabulary

Each stage names the kind of arrays it reads (`dpo_jax.stages`: pairs, sft, unpaired, pretrain,
prompts); this module builds those kinds only. Datasets are TFDS builders (`builders`), prepared
once to array_record and read back as random-access data sources; `config.data.name = ("synthetic",)`
is the built-in task of the quickstart. Several names make a weighted mixture (`config.data.weights`).
Each split is tokenised (`tokenize`), truncated and laid out (`layouts`) once, identically in every
process; `loader` then serves each process its share of every batch. Pretraining texts
(`config.data.pretrain_files`) and unpaired files (`config.kto.train_files`, `unpaired`) are read
here directly: they need no preparation.
"""

import dataclasses
import functools
from typing import Dict, List, Optional, Tuple

import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from jax.experimental import multihost_utils

from dpo_jax import models, stages
from dpo_jax.data import builders, layouts, records, synthetic, tokenize, unpaired  # builders: registers the datasets

DATASETS = ("synthetic", "hh_rlhf", "stanford_shp", "ultrafeedback_binarized", "tldr_comparisons", "imdb_prefixes",
            "preference_files")


@dataclasses.dataclass
class Task:
    """Token arrays of one task, train and eval (None where no stage of config.stages needs them):
    - `pairs_*`: preference pairs (stages dpo, reward, unlikelihood); `sft_*`: SFT rows;
    - `unpaired_*`: unpaired examples (stage kto), each with a mismatched completion for KTO's KL term;
    - `pretrain_*`: whole texts laid out as SFT rows, the first token as prompt: the loss is on
      every later token;
    - `prompts_*` (stage ppo, and sample evaluation when `config.evaluation.scorer` or `judge` is set):
      {prompt_ids [n, max_prompt_length], prompt_lengths [n], reference_ids [n, max_length],
      reference_lengths [n]}, int32, right-padded with 0: the distinct (truncated) prompts of the
      pairs, or of the SFT examples when no preference stage runs (IMDb prefixes have no pairs), in
      order of first occurrence, with the chosen response of that occurrence as reference.
    `num_truncated`: examples truncated (the pairs when a preference stage runs, else the SFT
    examples, else the pretraining texts). `tokenizer`: config.data's (None for the synthetic task,
    which is token ids already).

    A mixture's components are concatenated; `*_mixture` then lists (start, stop, weight) of each
    component's units for the loader. `report` holds, per stage's data and split, the counts of
    examples, skipped examples by reason, truncated examples, and the layout's padding figures.
    """
    pairs_train: Optional[Dict[str, np.ndarray]] = None
    pairs_eval: Optional[Dict[str, np.ndarray]] = None
    sft_train: Optional[Dict[str, np.ndarray]] = None
    sft_eval: Optional[Dict[str, np.ndarray]] = None
    num_truncated: int = 0
    report: Dict[str, dict] = dataclasses.field(default_factory=dict)
    pairs_mixture: Optional[List[Tuple[int, int, float]]] = None
    sft_mixture: Optional[List[Tuple[int, int, float]]] = None
    unpaired_train: Optional[Dict[str, np.ndarray]] = None
    unpaired_eval: Optional[Dict[str, np.ndarray]] = None
    pretrain_train: Optional[Dict[str, np.ndarray]] = None
    pretrain_eval: Optional[Dict[str, np.ndarray]] = None
    prompts_train: Optional[Dict[str, np.ndarray]] = None
    prompts_eval: Optional[Dict[str, np.ndarray]] = None
    tokenizer: Optional[models.Tokenizer] = None

    def arrays(self, kind):
        """(train arrays, eval arrays, train mixture or None) of a data kind (`stages.base.DATA_KINDS`)."""
        return getattr(self, f"{kind}_train"), getattr(self, f"{kind}_eval"), getattr(self, f"{kind}_mixture", None)


def builder(name, data_config):
    """The TFDS builder of one dataset name of `config.data` (preference_files: of its *_files keys)."""
    kwargs = dict(data_dir=data_config.data_dir or None, file_format="array_record",
                  on_bad_example=data_config.on_bad_example)
    if name == "preference_files":
        files = {"train": data_config.train_files, "test": data_config.eval_files,
                 "sft_train": data_config.sft_train_files, "sft_test": data_config.sft_eval_files}
        return tfds.builder(name, config=builders.FilesConfig.of({k: list(v) for k, v in files.items() if v}),
                            **kwargs)
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


def truncated_pairs(tokenized, data_config, need_rejected):
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


def _split_arrays(pairs, data_config, kind, where):
    try:
        if kind == "pairs":
            return layouts.pair_arrays(pairs, data_config.layout, **_layout_kwargs(data_config))
        return layouts.sft_arrays([p["prompt"] for p in pairs], [p["chosen"] for p in pairs], data_config.layout,
                                  **_layout_kwargs(data_config))
    except layouts.ItemTooLongError as error:
        raise ValueError(f"{where} ({kind}, layout {data_config.layout!r}): {error}; raise config.data.row_length "
                         f"(0 = 2 * data.max_length fits any pair)") from error


def _dataset_splits(name, data_config, kind):
    """The (train, eval) split names of dataset `name` that pairs or SFT examples come from."""
    if kind == "pairs":
        return data_config.train_split, data_config.eval_split
    return data_config.sft_split or data_config.train_split, data_config.sft_eval_split or data_config.eval_split


def _real_dataset_pairs(name, data_config, kind, split, tokenizer):
    """Truncated token pairs of one split of a TFDS dataset, and its report entry."""
    dataset_builder = prepare(name, data_config)
    examples, counts = read_split(dataset_builder, split, data_config)
    bad = records.BadExamples(data_config.on_bad_example)
    tokenized = tokenize.tokenize(examples, tokenizer, bad=bad, check_boundaries=data_config.check_boundaries,
                                  use_chat_template=data_config.chat_template, need_rejected=kind == "pairs",
                                  max_length=data_config.max_length, max_prompt_length=data_config.max_prompt_length)
    if not tokenized.prompts:
        raise ValueError(f"{name}/{split}: no usable {kind} examples (skipped: {dict(bad.counts)}; "
                         f"first: {bad.kept[:3]})")
    pairs, num_truncated = truncated_pairs(tokenized, data_config, need_rejected=kind == "pairs")
    return pairs, {
        "examples": len(pairs), "truncated": num_truncated,
        "skipped_when_prepared": counts.get("skipped", {}), "skipped_when_tokenised": dict(bad.counts),
        "skipped_examples": counts.get("skipped_examples", []) + bad.kept,
        **{key: value for key, value in counts.items()
           if key not in ("skipped", "skipped_examples", "examples", "on_bad_example")}}


def _synthetic_examples(config, evaluation):
    """The synthetic task's untruncated token-id pairs {prompt, chosen, rejected} (train or eval)."""
    data_config = config.data
    return synthetic.make_pairs(data_config.num_eval if evaluation else data_config.num_train,
                                seed=config.seed + int(evaluation), vocab_size=config.model.vocab_size)


def _synthetic_pairs(config, evaluation):
    data_config = config.data
    pairs = _synthetic_examples(config, evaluation)
    truncated_pairs, num_truncated = [], 0
    for pair in pairs:
        prompt, responses, truncated = layouts.truncate_example(
            pair["prompt"], [pair["chosen"], pair["rejected"]], max_length=data_config.max_length,
            max_prompt_length=data_config.max_prompt_length)
        num_truncated += truncated
        truncated_pairs.append(dict(prompt=prompt, chosen=responses[0], rejected=responses[1]))
    return truncated_pairs, {"examples": len(pairs), "truncated": num_truncated}


def stage_pairs(config, kind, evaluation, tokenizer, report, label):
    """[(name/split, truncated pairs)] of the train or eval data, one per dataset of config.data
    (kind "pairs": preference pairs; "sft": SFT examples, pairs without `rejected`); each dataset's
    counts go to `report` under "<label> <name>/<split>"."""
    data_config = config.data
    parts = []
    for name in data_config.name:
        if name == "synthetic":
            split = "eval" if evaluation else "train"
            pairs, entry = _synthetic_pairs(config, evaluation)
        else:
            split = _dataset_splits(name, data_config, kind)[int(evaluation)]
            pairs, entry = _real_dataset_pairs(name, data_config, kind, split, tokenizer)
        tokenize.check_vocab(pairs, config.model, f"{name}/{split}")
        report[f"{label} {name}/{split}"] = entry
        parts.append((f"{name}/{split}", pairs))
    return parts


def _laid_out(parts, config, kind, evaluation, report):
    """(arrays, mixture, number truncated) of `_stage_pairs`' parts: each laid out, then concatenated."""
    data_config = config.data
    weights = list(data_config.weights) or [1.0] * len(parts)
    arrays_of_parts, num_truncated = [], 0
    for where, pairs in parts:
        arrays = _split_arrays(pairs, data_config, kind, where)
        entry = report[f"{kind} {where}"]
        entry.update(layouts.token_stats(arrays, len(pairs)))
        num_truncated += entry["truncated"]
        arrays_of_parts.append(arrays)
    arrays = {key: np.concatenate([part[key] for part in arrays_of_parts]) for key in arrays_of_parts[0]}
    sizes = np.cumsum([0] + [len(next(iter(part.values()))) for part in arrays_of_parts])
    mixture = None if len(parts) == 1 or evaluation else [
        (int(start), int(stop), float(weight)) for start, stop, weight in zip(sizes[:-1], sizes[1:], weights)]
    return arrays, mixture, num_truncated


def _prompt_arrays(parts, data_config):
    """`layouts.prompt_arrays` of the distinct prompts of `_stage_pairs`' parts, in order of first
    occurrence, each with the chosen response of that occurrence as reference."""
    references = {}
    for _, pairs in parts:
        for pair in pairs:
            references.setdefault(tuple(pair["prompt"]), pair["chosen"])
    return layouts.prompt_arrays(list(references), list(references.values()),
                                 max_prompt_length=data_config.max_prompt_length, max_length=data_config.max_length)


# ---------------------------------------------------------------------------------------------
# Pretraining texts
# ---------------------------------------------------------------------------------------------

def _read_texts(paths, bad):
    """(location, text) of the {"text": ...} records of `paths`; bad records go to `bad`."""
    texts = []
    for path in paths:
        for location, record in records.read_records(path):
            try:
                if isinstance(record, records.BadExample):
                    raise record
                if not isinstance(record, dict):
                    raise records.BadExample(location, "wrong type",
                                             f"a record must be a JSON object, got {type(record).__name__}")
                text = records.text_field(record, "text", location)
                if not text.strip():
                    raise records.BadExample(location, "empty text")
            except records.BadExample as error:
                bad.handle(error)
                continue
            texts.append((location, text))
    return texts


def _text_ids(texts, tokenizer, bad):
    """Token ids of whole texts [(location, text)], by tokenize.py's rules: text from data is encoded
    as text (a special token's text too), a prompt's BOS once where the tokenizer's post-processor
    puts one, a response's EOS once at the end (an end-of-generation id inside is bad)."""
    eos_id = tokenizer.token_id(tokenizer.eos_token)
    end_ids = set(tokenizer.eos_ids) | {eos_id}
    bos_id = tokenize.added_bos(tokenizer)
    sequences = []
    for (location, _), ids in zip(texts, tokenizer.encode_text([text for _, text in texts])):
        if any(token in end_ids for token in ids[:-1]):
            bad.handle(records.BadExample(location, "end-of-generation token inside a text",
                                          f"{[tokenizer.tokenizer.id_to_token(t) for t in ids if t in end_ids]}"))
            continue
        if not ids or ids[-1] not in end_ids:
            ids = ids + [eos_id]
        if bos_id is not None and ids[:1] != [bos_id]:
            ids = [bos_id] + ids
        if len(ids) < 2:
            bad.handle(records.BadExample(location, "empty text", "no token to predict after the first"))
            continue
        sequences.append(ids)
    return sequences


def _pretrain_arrays(config, evaluation, tokenizer, report):
    """(arrays, number truncated) of the pretraining texts, train or eval: `data.pretrain_files` /
    `pretrain_eval_files`, or with `data.name="synthetic"` the synthetic pairs' prompt + chosen ids."""
    data_config = config.data
    files_key = "pretrain_eval_files" if evaluation else "pretrain_files"
    entry = {}
    if data_config.pretrain_files:
        paths = data_config[files_key]
        if not paths:
            raise ValueError(f"config.data.{files_key}: the pretrain stage evaluates on held-out texts; "
                             "name their files")
        where = f"data.{files_key}"
        bad = records.BadExamples(data_config.on_bad_example)
        sequences = _text_ids(_read_texts(paths, bad), tokenizer, bad)
        if not sequences:
            raise ValueError(f"config.{where}: no usable texts (skipped: {dict(bad.counts)}; first: {bad.kept[:3]})")
        entry = {"skipped": dict(bad.counts), "skipped_examples": bad.kept}
    elif tuple(data_config.name) == ("synthetic",):
        where = "synthetic/" + ("eval" if evaluation else "train")
        sequences = [pair["prompt"] + pair["chosen"] for pair in _synthetic_examples(config, evaluation)]
    else:
        raise ValueError("config.data.pretrain_files: the pretrain stage needs texts ({\"text\": ...} JSONL files); "
                         "only data.name='synthetic' brings its own")
    # The first token is the prompt, so that every later token is predicted and scored.
    pairs, num_truncated = [], 0
    for ids in sequences:
        prompt, responses, truncated = layouts.truncate_example(
            ids[:1], [ids[1:]], max_length=data_config.max_length, max_prompt_length=data_config.max_prompt_length)
        num_truncated += truncated
        pairs.append(dict(prompt=prompt, chosen=responses[0]))
    tokenize.check_vocab(pairs, config.model, where)
    arrays = _split_arrays(pairs, data_config, "sft", where)
    report[f"pretrain {where}"] = {"examples": len(pairs), "truncated": num_truncated, **entry,
                                   **layouts.token_stats(arrays, len(pairs))}
    return arrays, num_truncated


# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------

def load_task(config) -> Task:
    """Builds the token arrays that `config.stages` read, for `config.model`'s vocabulary (and the prompts of
    sample evaluation when `config.evaluation.scorer` or `judge` is set)."""
    data_config = config.data
    kinds = {stages.STAGES[name].data for name in config.stages}
    if config.evaluation.scorer or config.evaluation.judge:
        kinds.add("prompts")
    tokenizer = None
    if (any(name != "synthetic" for name in data_config.name) or ("pretrain" in kinds and data_config.pretrain_files)
            or ("unpaired" in kinds and config.kto.train_files)):  # text to tokenise
        tokenizer = tokenize.load(data_config.tokenizer or config.model.init_from_hf)
    report, fields, truncated = {}, {}, {}
    # Prompts are the pairs' when a preference stage runs, else the SFT examples' (IMDb prefixes have no pairs).
    prompt_source = "pairs" if "pairs" in kinds else "sft"
    for kind in ("pairs", "sft"):
        laid_out = kind in kinds
        with_prompts = "prompts" in kinds and kind == prompt_source
        if not (laid_out or with_prompts):
            continue
        for evaluation, split in ((False, "train"), (True, "eval")):
            parts = stage_pairs(config, kind, evaluation, tokenizer, report, label=kind if laid_out else "prompts")
            if laid_out:
                fields[f"{kind}_{split}"], mixture, split_truncated = _laid_out(parts, config, kind, evaluation,
                                                                                report)
                if not evaluation:
                    fields[f"{kind}_mixture"] = mixture
                truncated[kind] = truncated.get(kind, 0) + split_truncated
            if with_prompts:
                fields[f"prompts_{split}"] = _prompt_arrays(parts, data_config)
                report[f"prompts {split}"] = {"prompts": len(fields[f"prompts_{split}"]["prompt_lengths"]),
                                              "from": "pairs" if kind == "pairs" else "sft examples"}
    for evaluation, split in ((False, "train"), (True, "eval")):
        if "unpaired" in kinds:
            read_pairs = functools.partial(stage_pairs, config, "pairs", evaluation, tokenizer, {}, label="pairs")
            fields[f"unpaired_{split}"], split_truncated = unpaired.unpaired_arrays(config, evaluation, tokenizer,
                                                                                    report, pairs=read_pairs)
            truncated["unpaired"] = truncated.get("unpaired", 0) + split_truncated
        if "pretrain" in kinds:
            fields[f"pretrain_{split}"], split_truncated = _pretrain_arrays(config, evaluation, tokenizer, report)
            truncated["pretrain"] = truncated.get("pretrain", 0) + split_truncated
    for key, entry in report.items():
        logging.info("data %s: %s", key, entry)
    # Pairs and SFT examples are often the same examples: count them once, as the pairs when a
    # preference stage runs, else as SFT sees them, else the unpaired examples, else the pretraining texts.
    num_truncated = next((truncated[kind] for kind in ("pairs", "sft", "unpaired", "pretrain") if kind in truncated), 0)
    return Task(num_truncated=num_truncated, report=report, tokenizer=tokenizer, **fields)
