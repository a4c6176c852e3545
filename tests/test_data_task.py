"""load_task on users' files: tokenised, truncated, laid out, reported; bad examples found at tokenisation."""

import json

import numpy as np
import pytest

from dpo_jax.configs import validation
from dpo_jax.data import layouts, tokenize
from dpo_jax.data.task import load_task

WORDS = "the cat dog sat ran on a mat log fast slow happily sadly".split()


def _pairs(num_pairs, seed):
    rng = np.random.default_rng(seed)
    text = lambda n: " " + " ".join(rng.choice(WORDS, size=n))
    return [{"prompt": "\n\nHuman:" + text(rng.integers(2, 12)) + "\n\nAssistant:", "chosen": text(rng.integers(1, 9)),
             "rejected": text(rng.integers(1, 9))} for _ in range(num_pairs)]


@pytest.fixture
def files_config(tiny_config, tmp_path):
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    for path, pairs in ((train, _pairs(60, 0)), (evaluation, _pairs(20, 1))):
        path.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    texts = [p["prompt"] + p["chosen"] + p["rejected"] for p in _pairs(60, 0)]
    tokenizer_dir = tokenize.train_byte_level_bpe(texts, str(tmp_path / "tokenizer"), vocab_size=300)
    config = tiny_config
    config.model.vocab_size = 300
    config.data.update(name=("preference_files",), train_files=(str(train),), eval_files=(str(evaluation),),
                       tokenizer=tokenizer_dir, data_dir=str(tmp_path / "tfds"), max_length=40, max_prompt_length=16)
    return config


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
def test_load_task_lays_out_every_pair_of_the_files(files_config, layout):
    files_config.data.layout = layout
    validation.validate(files_config)
    task = load_task(files_config)
    report = task.report["pairs preference_files/train"]
    assert report["examples"] == 60 and 0 < report["truncated"] < 60  # some prompts exceed 16 tokens
    assert task.num_truncated == report["truncated"] + task.report["pairs preference_files/test"]["truncated"]
    arrays = task.pairs_train
    if layout == "padded":
        assert arrays["chosen_input_ids"].shape == (60, 40)
        real_pairs = 60
    else:
        assert arrays["input_ids"].shape[1] == 80
        real_pairs = int(arrays["pair_mask"].sum())
        assert ("branch_ids" in arrays) == layout.endswith("prefix_shared")
    assert real_pairs == 60
    # SFT: Preferred-FT on the chosen responses of the same split.
    assert task.report["sft preference_files/train"]["examples"] == 60


def test_a_pair_longer_than_the_rows_names_the_data_and_the_row_length(files_config):
    files_config.data.update(layout="packed", row_length=40)  # a row holds any sequence, not every pair
    validation.validate(files_config)
    with pytest.raises(ValueError, match=r"preference_files/train \(pairs, layout 'packed'\): item \d+ takes \d+ "
                                         r"tokens, more than a row of 40; raise config.data.row_length"):
        load_task(files_config)
    files_config.data.row_length = 39
    with pytest.raises(ValueError, match="data.row_length"):
        validation.validate(files_config)


def test_a_boundary_failure_names_file_and_line_or_is_skipped_and_reported(files_config, tmp_path):
    path = tmp_path / "train.jsonl"
    lines = path.read_text().splitlines()
    # Byte-level BPE joins a trailing space of the prompt to the response's first word.
    lines[4] = json.dumps({"prompt": "\n\nHuman: the cat sat ", "chosen": "on a mat", "rejected": "ran"})
    path.write_text("\n".join(lines) + "\n")
    files_config.data.update(train_files=(str(path),), data_dir=str(tmp_path / "tfds2"))
    with pytest.raises(ValueError, match=f"{path}:5: token boundary"):
        load_task(files_config)
    files_config.data.update(on_bad_example="skip", data_dir=str(tmp_path / "tfds3"))
    task = load_task(files_config)
    report = task.report["pairs preference_files/train"]
    assert report["examples"] == 59 and report["skipped_when_tokenised"] == {"token boundary": 1}
    assert report["skipped_examples"][0].startswith(f"{path}:5: token boundary")


def test_config_errors_name_the_data_key(files_config):
    for key, value, match in (("layout", "ragged", "data.layout"), ("row_length", 30, "data.row_length"),
                              ("on_bad_example", "ignore", "data.on_bad_example"),
                              ("name", ("hh_rlhf/nope",), "data.name"), ("weights", (1.0, 2.0), "data.weights"),
                              ("tokenizer", "/nonexistent", "data.tokenizer")):
        config = files_config.copy_and_resolve_references()
        config.data[key] = value
        with pytest.raises(ValueError, match=match):
            validation.validate(config)
