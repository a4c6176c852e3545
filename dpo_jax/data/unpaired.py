"""Unpaired examples (KTO): a prompt, one completion, and whether the completion is desirable.

From users' files (`config.kto.train_files` / `eval_files`: .jsonl[.gz], .json or .parquet), in the
shapes people have:
    {"prompt": "...", "completion": "...", "label": true}
    {"prompt": [messages], "completion": [{"role": "assistant", "content": "..."}], "label": false}
(the second is TRL's conversational unpaired form). Without files, the preference pairs of
`config.data` are split in two: the chosen response desirable, the rejected one undesirable.

Every example also gets a mismatched completion, another example's by a fixed derangement: the
policy's and the reference's log-probs of those estimate KTO's KL reference point. Rows are padded.
"""

import numpy as np

from dpo_jax.data import layouts, records, tokenize


def unpaired_example(record, location):
    """(example for `tokenize.tokenize`, desirable) of one record."""
    if not isinstance(record, dict):
        raise records.BadExample(location, "wrong type", f"a record must be a JSON object, got {type(record).__name__}")
    if "label" not in record:
        raise records.BadExample(location, "missing field", "'label'")
    if not isinstance(record["label"], bool):
        raise records.BadExample(location, "wrong type",
                                 f"'label' must be true (desirable) or false, got {record['label']!r}")
    for key in ("prompt", "completion"):
        if key not in record or record[key] is None:
            raise records.BadExample(location, "missing field", repr(key))
    if isinstance(record["prompt"], (list, tuple)) or isinstance(record["completion"], (list, tuple)):
        prompt = records.messages_field(record["prompt"], "prompt", location)
        completion = records.final_assistant(records.messages_field(record["completion"], "completion", location),
                                             "completion", location)
        return records.example(location, pair=False, prompt_messages=prompt, chosen=completion), record["label"]
    return records.example(location, pair=False, prompt=records.text_field(record, "prompt", location),
                           chosen=records.text_field(record, "completion", location)), record["label"]


def _read_files(paths, tokenizer, data_config, bad):
    """[(prompt ids, completion ids, desirable, keep_prefix)] of unpaired files, untruncated (but only
    what truncation can keep is encoded)."""
    examples, labels = [], {}
    for path in paths:
        for location, record in records.read_records(path):
            try:
                if isinstance(record, records.BadExample):
                    raise record
                example, labels[location] = unpaired_example(record, location)
            except records.BadExample as error:
                bad.handle(error)
                continue
            examples.append(example)
    tokenized = tokenize.tokenize(examples, tokenizer, bad=bad, check_boundaries=data_config.check_boundaries,
                                  use_chat_template=data_config.chat_template, need_rejected=False,
                                  max_length=data_config.max_length, max_prompt_length=data_config.max_prompt_length)
    keep_prefix = int(tokenized.bos_id is not None)
    return [(prompt, responses[0], labels[source], keep_prefix)
            for prompt, responses, source in zip(tokenized.prompts, tokenized.responses, tokenized.sources)]


def _split_pairs(parts):
    """[(prompt, completion, desirable)] of truncated preference pairs: chosen desirable, rejected not."""
    return [(pair["prompt"], pair[side], side == "chosen", 0)
            for _, pairs in parts for pair in pairs for side in ("chosen", "rejected")]


def _derangement(count, seed):
    """index -> another index (a fixed random cycle over all of them; itself only when count == 1)."""
    order = np.random.default_rng(seed).permutation(count)
    other = np.empty(count, np.int64)
    other[order] = np.roll(order, -1)
    return other


def unpaired_arrays(config, evaluation, tokenizer, report, *, pairs):
    """(arrays, number truncated) of the train or eval unpaired examples, padded rows:
    {input_ids, loss_mask, segment_ids} [n, max_length], the same prefixed by `kl_` for the prompt
    with a mismatched completion, and `desirable` [n] int32 (1: desirable).

    pairs: () -> the truncated preference pairs of config.data (`task.stage_pairs`), read only
    when no unpaired files are given.
    """
    data_config, kto = config.data, config.kto
    paths = kto.eval_files if evaluation else kto.train_files
    split = "eval" if evaluation else "train"
    if kto.train_files:
        where = f"kto.{'eval' if evaluation else 'train'}_files"
        bad = records.BadExamples(data_config.on_bad_example)
        examples = _read_files(paths, tokenizer, data_config, bad)
        entry = bad.summary()
    else:
        where = f"pairs {split}"
        examples = _split_pairs(pairs())
        entry = {}
    if len(examples) < 2:
        raise ValueError(f"config.{where}: KTO needs at least 2 usable examples (its KL term pairs each prompt "
                         f"with another example's completion), got {len(examples)} ({entry})")
    prompts, completions, num_truncated = [], [], 0
    for prompt, completion, _, keep_prefix in examples:
        prompt, (completion,), truncated = layouts.truncate_example(
            prompt, [completion], max_length=data_config.max_length, max_prompt_length=data_config.max_prompt_length,
            keep_prefix=keep_prefix)
        prompts.append(prompt)
        completions.append(completion)
        num_truncated += truncated
    tokenize.check_vocab([{"prompt": p, "completion": c} for p, c in zip(prompts, completions)],
                         config.model, where)
    width = dict(max_length=data_config.max_length, max_prompt_length=data_config.max_length)
    arrays, _ = layouts.padded_rows(prompts, completions, **width)
    other = _derangement(len(examples), config.seed + int(evaluation))
    kl_rows, _ = layouts.padded_rows(prompts, [completions[j] for j in other], **width)
    arrays.update({f"kl_{key}": value for key, value in kl_rows.items()})
    arrays["desirable"] = np.array([desirable for _, _, desirable, _ in examples], np.int32)
    report[f"unpaired {where}"] = {
        "examples": len(examples), "desirable": int(arrays["desirable"].sum()), "truncated": num_truncated, **entry,
        **layouts.token_stats({key: arrays[key] for key in ("segment_ids",)}, len(examples))}
    return arrays, num_truncated
