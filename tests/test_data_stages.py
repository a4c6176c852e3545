"""load_task for the stages beyond SFT and DPO: pretraining texts, pairs for reward / unlikelihood, prompts."""

import json
import os

import numpy as np
import pytest
import tokenizers

from dpo_jax.configs import validation
from dpo_jax.data import synthetic, tokenize
from dpo_jax.data.task import load_task, prepare, read_split

WORDS = "the cat dog sat ran on a mat log fast slow happily sadly".split()
MAX_LENGTH, MAX_PROMPT_LENGTH = 24, 10


def _text(rng, num_words):
    return " ".join(rng.choice(WORDS, size=num_words))


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _pairs(num_pairs, seed, num_prompts):
    """Pairs whose prompts come from `num_prompts` distinct ones, so that prompts repeat."""
    rng = np.random.default_rng(seed)
    prompts = [_text(rng, int(rng.integers(2, 14))) for _ in range(num_prompts)]
    return [{"prompt": prompts[rng.integers(num_prompts)], "chosen": " " + _text(rng, int(rng.integers(1, 9))),
             "rejected": " " + _text(rng, int(rng.integers(1, 9)))} for _ in range(num_pairs)]


def _texts(num_texts, seed):
    rng = np.random.default_rng(seed)
    return [_text(rng, int(rng.integers(1, 30))) for _ in range(num_texts)]


def _with_bos(directory, output_dir):
    """The byte-level BPE of `directory` with a post-processor that puts a BOS first (as Llama's does)."""
    tokenizer = tokenizers.Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    tokenizer.add_special_tokens(["<s>"])
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    os.makedirs(output_dir)
    tokenizer.save(os.path.join(output_dir, "tokenizer.json"))
    with open(os.path.join(output_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": "<s>", "eos_token": "<|endoftext|>"}, f)
    return output_dir


@pytest.fixture
def files_config(tiny_config, tmp_path):
    """Pairs (their prompts repeating) and pretraining texts in files, and a byte-level BPE of them."""
    train_pairs, eval_pairs = _pairs(40, 0, num_prompts=12), _pairs(16, 1, num_prompts=5)
    corpus = [p["prompt"] + p["chosen"] + p["rejected"] for p in train_pairs] + _texts(40, 2)
    tokenizer_dir = tokenize.train_byte_level_bpe(corpus, str(tmp_path / "tokenizer"), vocab_size=300)
    config = tiny_config
    config.model.vocab_size = 320
    config.data.update(
        name=("preference_files",), tokenizer=tokenizer_dir, data_dir=str(tmp_path / "tfds"), max_length=MAX_LENGTH,
        max_prompt_length=MAX_PROMPT_LENGTH,
        train_files=(_write_jsonl(tmp_path / "train.jsonl", train_pairs),),
        eval_files=(_write_jsonl(tmp_path / "test.jsonl", eval_pairs),),
        pretrain_files=(_write_jsonl(tmp_path / "pretrain.jsonl", [{"text": text} for text in _texts(30, 3)]),),
        pretrain_eval_files=(_write_jsonl(tmp_path / "pretrain_eval.jsonl", [{"text": t} for t in _texts(10, 4)]),))
    return config


def _read_jsonl(paths):
    """The records of the JSONL files `paths`, in order."""
    records = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            records.extend(json.loads(line) for line in f)
    return records


# ---------------------------------------------------------------------------------------------
# Pretraining texts
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bos", [False, True], ids=["gpt2_style", "with_bos"])
def test_pretrain_rows_are_the_tokenizers_encoding_scored_after_the_first_token(files_config, tmp_path, bos):
    if bos:
        files_config.data.tokenizer = _with_bos(files_config.data.tokenizer, str(tmp_path / "bos_tokenizer"))
    files_config.stages = ("pretrain",)
    validation.validate(files_config)
    task = load_task(files_config)
    assert task.pairs_train is None and task.sft_train is None and task.prompts_train is None

    tokenizer = tokenize.load(files_config.data.tokenizer)
    eos_id = tokenizer.token_id(tokenizer.eos_token)
    num_truncated = 0
    for split, paths in (("train", files_config.data.pretrain_files),
                         ("eval", files_config.data.pretrain_eval_files)):
        rows = getattr(task, f"pretrain_{split}")
        texts = [record["text"] for record in _read_jsonl(paths)]
        assert rows["input_ids"].shape == (len(texts), MAX_LENGTH)
        for row, text in enumerate(texts):
            full = tokenizer.encode(text) + [eos_id]  # with the BOS the tokenizer's post-processor adds, if any
            assert (full[0] == tokenizer.bos_id) == bos
            expected = full[:MAX_LENGTH]
            num_truncated += len(full) > MAX_LENGTH
            length, padding = len(expected), [0] * (MAX_LENGTH - len(expected))
            np.testing.assert_array_equal(rows["input_ids"][row, :length], expected)
            np.testing.assert_array_equal(rows["loss_mask"][row], [0] + [1] * (length - 1) + padding)
            np.testing.assert_array_equal(rows["segment_ids"][row], [1] * length + padding)
    assert 0 < num_truncated == task.num_truncated  # some texts exceed MAX_LENGTH tokens
    assert task.report["pretrain data.pretrain_files"]["examples"] == 30


def test_packed_pretrain_rows_hold_every_text_scored_after_its_first_token(files_config):
    files_config.stages = ("pretrain",)
    files_config.data.layout = "packed"
    task = load_task(files_config)
    tokenizer = tokenize.load(files_config.data.tokenizer)
    lengths = [min(len(tokenizer.encode(record["text"])) + 1, MAX_LENGTH)
               for record in _read_jsonl(files_config.data.pretrain_files)]
    rows = task.pretrain_train
    num_sequences = sum(len(set(row[row > 0].tolist())) for row in rows["segment_ids"])
    assert num_sequences == len(lengths)
    assert int(rows["loss_mask"].sum()) == sum(length - 1 for length in lengths)
    assert int((rows["segment_ids"] > 0).sum()) == sum(lengths)


def test_a_bad_text_record_names_file_and_line_or_is_skipped_and_counted(files_config, tmp_path):
    path = tmp_path / "pretrain.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = json.dumps({"txt": "the cat"})
    path.write_text("\n".join(lines) + "\n")
    files_config.stages = ("pretrain",)
    with pytest.raises(ValueError, match=f"{path}:3: missing field"):
        load_task(files_config)
    files_config.data.on_bad_example = "skip"
    report = load_task(files_config).report["pretrain data.pretrain_files"]
    assert report["examples"] == 29 and report["skipped"] == {"missing field": 1}


def test_pretrain_needs_held_out_texts_and_texts_unless_synthetic(files_config):
    files_config.stages = ("pretrain",)
    files_config.data.pretrain_eval_files = ()
    with pytest.raises(ValueError, match="data.pretrain_eval_files"):
        load_task(files_config)
    files_config.data.pretrain_files = ()
    with pytest.raises(ValueError, match="data.pretrain_files"):
        load_task(files_config)


def test_synthetic_pretrain_texts_are_the_pairs_prompt_and_chosen(tiny_config):
    tiny_config.stages = ("pretrain",)
    validation.validate(tiny_config)
    task = load_task(tiny_config)
    data_config = tiny_config.data
    for split, num, seed in (("train", data_config.num_train, tiny_config.seed),
                             ("eval", data_config.num_eval, tiny_config.seed + 1)):
        rows = getattr(task, f"pretrain_{split}")
        pairs = synthetic.make_pairs(num, seed=seed, vocab_size=tiny_config.model.vocab_size)
        assert rows["input_ids"].shape == (num, data_config.max_length)
        for row, pair in enumerate(pairs):
            expected = (pair["prompt"] + pair["chosen"])[:data_config.max_length]
            np.testing.assert_array_equal(rows["input_ids"][row, :len(expected)], expected)
            assert rows["input_ids"][row, 0] == synthetic.BOS
            assert rows["loss_mask"][row, 0] == 0 and rows["loss_mask"][row].sum() == len(expected) - 1


# ---------------------------------------------------------------------------------------------
# Pairs for the reward model and Unlikelihood
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stages", [("reward",), ("unlikelihood",), ("sft", "reward", "ppo")])
def test_preference_stages_other_than_dpo_get_the_dpo_pair_arrays(tiny_config, stages):
    dpo_only = tiny_config.copy_and_resolve_references()
    dpo_only.stages = ("dpo",)
    expected = load_task(dpo_only)
    tiny_config.stages = stages
    task = load_task(tiny_config)
    for split in ("train", "eval"):
        for key, value in getattr(expected, f"pairs_{split}").items():
            np.testing.assert_array_equal(getattr(task, f"pairs_{split}")[key], value)
    assert task.num_truncated == expected.num_truncated  # counted as the pairs, also when SFT runs
    assert (task.sft_train is not None) == ("sft" in stages)


def test_no_pair_arrays_without_a_preference_stage(tiny_config):
    tiny_config.stages = ("sft",)
    task = load_task(tiny_config)
    assert task.pairs_train is None and task.pairs_eval is None and task.sft_train is not None


# ---------------------------------------------------------------------------------------------
# Prompts (PPO rollouts, sample evaluation)
# ---------------------------------------------------------------------------------------------

def _expected_prompts(pairs, tokenizer):
    """{distinct truncated prompt ids: (truncated chosen ids, index)} of each prompt's first pair, in order."""
    eos_id = tokenizer.token_id(tokenizer.eos_token)
    first = {}
    for index, pair in enumerate(pairs):
        prompt = tokenizer.encode(pair["prompt"], add_special_tokens=False)[-MAX_PROMPT_LENGTH:]
        chosen = tokenizer.encode(pair["chosen"], add_special_tokens=False) + [eos_id]
        first.setdefault(tuple(prompt), (chosen[:MAX_LENGTH - len(prompt)], index))
    return first


def _split_examples(config, split):
    """The examples of a prepared split in the order load_task reads them (TFDS stores them shuffled by key)."""
    examples, _ = read_split(prepare("preference_files", config.data), split, config.data)
    return examples


def _check_prompts(prompts, expected):
    assert prompts["prompt_ids"].shape == (len(expected), MAX_PROMPT_LENGTH)
    assert prompts["reference_ids"].shape == (len(expected), MAX_LENGTH)
    for row, (prompt, (reference, _)) in enumerate(expected.items()):
        assert prompts["prompt_lengths"][row] == len(prompt) and prompts["reference_lengths"][row] == len(reference)
        np.testing.assert_array_equal(prompts["prompt_ids"][row],
                                      list(prompt) + [0] * (MAX_PROMPT_LENGTH - len(prompt)))
        np.testing.assert_array_equal(prompts["reference_ids"][row],
                                      list(reference) + [0] * (MAX_LENGTH - len(reference)))
    for key in prompts:
        assert prompts[key].dtype == np.int32


def test_ppo_prompts_are_the_distinct_prompts_of_the_pairs_with_their_first_chosen_reference(files_config):
    files_config.stages = ("dpo", "ppo")
    files_config.ppo.reward = "vader"  # PPO-GT: no reward stage needed
    validation.validate(files_config)
    task = load_task(files_config)
    tokenizer = tokenize.load(files_config.data.tokenizer)
    for split, dataset_split in (("train", "train"), ("eval", "test")):
        pairs = _split_examples(files_config, dataset_split)
        expected = _expected_prompts(pairs, tokenizer)
        assert len(expected) < len(pairs)  # the files repeat prompts
        assert any(len(prompt) == MAX_PROMPT_LENGTH for prompt in expected)  # and some are truncated
        prompts = getattr(task, f"prompts_{split}")
        _check_prompts(prompts, expected)
        # The same truncated tokens as the DPO rows: the chosen row of each prompt's first pair.
        chosen_rows = getattr(task, f"pairs_{split}")["chosen_input_ids"]
        for prompt, (reference, pair_index) in expected.items():
            np.testing.assert_array_equal(chosen_rows[pair_index, :len(prompt) + len(reference)],
                                          list(prompt) + list(reference))
    assert task.report["prompts train"]["from"] == "pairs"


def test_sample_evaluation_alone_builds_prompts(files_config):
    files_config.stages = ("dpo",)
    assert load_task(files_config).prompts_eval is None
    files_config.evaluation.scorer = "vader"
    task = load_task(files_config)
    _check_prompts(task.prompts_eval, _expected_prompts(_split_examples(files_config, "test"),
                                                        tokenize.load(files_config.data.tokenizer)))


@pytest.mark.parametrize("stages", [("sft", "ppo"), ("ppo",)])
def test_without_pairs_the_prompts_are_the_sft_examples(files_config, tmp_path, stages):
    sft_train = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in _pairs(30, 5, num_prompts=9)]
    sft_eval = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in _pairs(10, 6, num_prompts=4)]
    files_config.data.update(train_files=(), eval_files=(), sft_split="sft_train", sft_eval_split="sft_test",
                             sft_train_files=(_write_jsonl(tmp_path / "sft_train.jsonl", sft_train),),
                             sft_eval_files=(_write_jsonl(tmp_path / "sft_eval.jsonl", sft_eval),))
    files_config.stages = stages
    files_config.ppo.reward = "vader"  # PPO-GT: no reward stage needed
    validation.validate(files_config)
    task = load_task(files_config)
    tokenizer = tokenize.load(files_config.data.tokenizer)
    for split, dataset_split in (("train", "sft_train"), ("eval", "sft_test")):
        _check_prompts(getattr(task, f"prompts_{split}"),
                       _expected_prompts(_split_examples(files_config, dataset_split), tokenizer))
    assert task.pairs_train is None and (task.sft_train is not None) == ("sft" in stages)
    assert task.report["prompts train"]["from"] == "sft examples"
