"""The generated review corpus: deterministic, of varied sentiment by VADER, and usable as it is written."""

import json
import os

import numpy as np
import pytest

from dpo_jax.configs import validation
from dpo_jax.data import reviews, tokenize
from dpo_jax.data.task import load_task, prepare, read_split

vader = pytest.importorskip("vaderSentiment.vaderSentiment", reason="vaderSentiment (the repro extra) scores sentiment")


@pytest.fixture(scope="module")
def analyzer():
    return vader.SentimentIntensityAnalyzer()


def test_reviews_are_deterministic_in_the_seed_and_independent_of_the_count():
    first = reviews.make_reviews(40, seed=3)
    assert first == reviews.make_reviews(40, seed=3)
    assert reviews.make_reviews(10, seed=3) == first[:10]
    assert reviews.make_reviews(40, seed=4) != first
    assert len(set(first)) == 40


def test_sentiment_words_are_vaders_and_the_neutral_words_are_not(analyzer):
    lexicon = analyzer.lexicon
    for word in reviews.POSITIVE_ADJECTIVES + reviews.POSITIVE_VERBS:
        assert lexicon.get(word, 0) > 0, word
    for word in reviews.NEGATIVE_ADJECTIVES + reviews.NEGATIVE_VERBS:
        assert lexicon.get(word, 0) < 0, word
    for phrase in reviews.POSITIVE_NOUNS:
        assert analyzer.polarity_scores(f"It is {phrase}.")["compound"] > 0.05, phrase
    for phrase in reviews.NEGATIVE_NOUNS:
        assert analyzer.polarity_scores(f"It is {phrase}.")["compound"] < -0.05, phrase
    neutral_phrases = (tuple(reviews.ASPECTS) + reviews.FILM_NOUNS + reviews.CHARACTERS + reviews.ACTIONS
                       + reviews.PLACES + reviews.DECADES + reviews.ACTORS + reviews.OCCASIONS + reviews.DURATIONS
                       + reviews.INTENSIFIERS)
    for phrase in neutral_phrases:
        for word in phrase.lower().split():
            assert word not in lexicon, (phrase, word)


def test_reviews_are_clearly_positive_clearly_negative_and_neutral_by_vader(analyzer):
    compound = np.array([analyzer.polarity_scores(review)["compound"] for review in reviews.make_reviews(1000, seed=0)])
    assert np.mean(compound > 0.05) > 0.2
    assert np.mean(compound < -0.05) > 0.2
    assert np.mean(compound > 0.5) > 0.1 and np.mean(compound < -0.5) > 0.1  # strongly so, too
    assert np.mean(np.abs(compound) <= 0.05) > 0.02  # and some neutral reviews


def test_split_review_is_a_word_prefix_and_a_continuation_to_a_sentence_end():
    for index, review in enumerate(reviews.make_reviews(200, seed=1)):
        num_words = 2 + index % 7
        prompt, completion = reviews.split_review(review, num_words)
        assert prompt.split(" ") == review.split(" ")[:num_words]
        assert completion.startswith(" ") and not completion.startswith("  ")
        assert review.startswith(prompt + completion)
        completion_words = completion.split()
        at_end = len(prompt + completion) == len(review)
        assert at_end or (len(completion_words) >= reviews.COMPLETION_MIN_WORDS and completion[-1] in ".!?")
        # It stops at the first sentence end once long enough.
        assert not any(word[-1] in ".!?" for word in completion_words[reviews.COMPLETION_MIN_WORDS - 1:-1])


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


SIZES = dict(num_pretrain=300, num_sft_train=48, num_sft_eval=16, seed=0, vocab_size=512)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return reviews.write_corpus(str(tmp_path_factory.mktemp("corpus")), **SIZES)


def test_the_corpus_files_hold_the_reviews_in_order(corpus):
    texts = reviews.make_reviews(300 + 16 + 48 + 16, seed=0)
    assert [r["text"] for r in _read_jsonl(corpus["pretrain"])] == texts[:300]
    assert [r["text"] for r in _read_jsonl(corpus["pretrain_eval"])] == texts[300:316]  # num_sft_eval by default
    for name, reviews_of_split in (("sft_train", texts[316:364]), ("sft_eval", texts[364:])):
        rows = _read_jsonl(corpus[name])
        assert len(rows) == len(reviews_of_split)
        for row, review in zip(rows, reviews_of_split):
            assert set(row) == {"prompt", "completion"}
            assert 2 <= len(row["prompt"].split(" ")) <= 8
            assert review.startswith(row["prompt"] + row["completion"]) and row["completion"].startswith(" ")
    with open(os.path.join(os.path.dirname(corpus["pretrain"]), reviews.MANIFEST), encoding="utf-8") as f:
        assert json.load(f)["seed"] == 0
    assert not [name for name in os.listdir(os.path.dirname(corpus["pretrain"])) if name.endswith(".tmp")]


def test_the_tokenizer_round_trips_and_load_task_reads_the_corpus(corpus, tiny_config, tmp_path):
    tokenizer = tokenize.load(corpus["tokenizer"])
    assert tokenizer.tokenizer.get_vocab_size() <= SIZES["vocab_size"]
    rows = _read_jsonl(corpus["sft_train"]) + _read_jsonl(corpus["sft_eval"])
    for row in rows:
        for text in (row["prompt"], row["completion"]):
            assert tokenizer.decode(tokenizer.encode(text)) == text
    # Through the preference_files builder, with the boundary check on (its default): every SFT example kept.
    config = tiny_config
    config.stages = ("pretrain", "sft")
    config.model.vocab_size = SIZES["vocab_size"]
    config.data.update(name=("preference_files",), tokenizer=corpus["tokenizer"], data_dir=str(tmp_path / "tfds"),
                       sft_train_files=(corpus["sft_train"],), sft_eval_files=(corpus["sft_eval"],),
                       sft_split="sft_train", sft_eval_split="sft_test", pretrain_files=(corpus["pretrain"],),
                       pretrain_eval_files=(corpus["pretrain_eval"],), max_length=80, max_prompt_length=24)
    assert config.data.check_boundaries
    validation.validate(config)
    task = load_task(config)
    for split, size in (("sft_train", 48), ("sft_test", 16)):
        report = task.report[f"sft preference_files/{split}"]
        assert report["examples"] == size and report["truncated"] == 0 and not report["skipped_when_tokenised"]
    assert task.pretrain_train["input_ids"].shape == (300, 80) and task.pretrain_eval["input_ids"].shape == (16, 80)
    # A row is the prompt's tokens, then the completion's, scored: as the tokenizer encodes the whole text.
    eos_id = tokenizer.token_id(tokenizer.eos_token)
    examples, _ = read_split(prepare("preference_files", config.data), "sft_train", config.data)
    for row, example in enumerate(examples):
        prompt_length = len(tokenizer.encode(example["prompt"]))
        whole = tokenizer.encode(example["prompt"] + example["chosen"]) + [eos_id]
        np.testing.assert_array_equal(task.sft_train["input_ids"][row, :len(whole)], whole)
        assert task.sft_train["loss_mask"][row].argmax() == prompt_length
        assert task.sft_train["loss_mask"][row].sum() == len(whole) - prompt_length


def test_a_rerun_with_the_same_parameters_does_not_regenerate(tmp_path, monkeypatch):
    out_dir = str(tmp_path / "corpus")
    small = dict(SIZES, num_pretrain=40, num_sft_train=8, num_sft_eval=4)
    paths = reviews.write_corpus(out_dir, **small)
    modified = {name: os.path.getmtime(path) for name, path in paths.items()}

    def fail(*args, **kwargs):
        raise AssertionError("regenerated")
    monkeypatch.setattr(reviews, "make_reviews", fail)
    assert reviews.write_corpus(out_dir, **small) == paths
    assert {name: os.path.getmtime(path) for name, path in paths.items()} == modified
    with pytest.raises(AssertionError, match="regenerated"):  # other parameters: made anew
        reviews.write_corpus(out_dir, **dict(small, seed=1))
    # The interrupted regeneration left no manifest, so even the old parameters regenerate now.
    with pytest.raises(AssertionError, match="regenerated"):
        reviews.write_corpus(out_dir, **small)
    monkeypatch.undo()
    paths = reviews.write_corpus(out_dir, **dict(small, seed=1))
    assert [r["text"] for r in _read_jsonl(paths["pretrain"])] == reviews.make_reviews(40, seed=1)
