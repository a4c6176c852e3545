"""Scorers and judges: VADER, external commands, Hugging Face classifiers, this codebase's reward models."""

import shlex
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import checkpointing, configs, models, scorers, workdir
from dpo_jax.data import tokenize

POSITIVE_TEXTS = ["What a wonderful, beautiful film. I loved it!", "Great acting and a superb, joyful story."]
NEGATIVE_TEXTS = ["A terrible, boring mess. I hated it.", "Awful acting and a horrible, painful plot."]
PYTHON = shlex.quote(sys.executable)


def python_command(code):
    return f"{PYTHON} -c {shlex.quote(code)}"


# ---------------------------------------------------------------------------------------------
# VADER
# ---------------------------------------------------------------------------------------------

def test_vader_ranks_positive_texts_above_negative_ones_and_ignores_the_prompt():
    scorer = scorers.make_scorer("vader")
    scores = scorer(["Review:"] * 4, POSITIVE_TEXTS + NEGATIVE_TEXTS)
    assert scores.dtype == np.float32 and scores.shape == (4,)
    assert np.all((scores >= -1) & (scores <= 1))
    assert scores[:2].min() > 0 > scores[2:].max()
    np.testing.assert_array_equal(scorer(["a different prompt, terrible"] * 4, POSITIVE_TEXTS + NEGATIVE_TEXTS),
                                  scores)


def test_vader_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vaderSentiment", None)
    monkeypatch.setitem(sys.modules, "vaderSentiment.vaderSentiment", None)
    with pytest.raises(ImportError, match=r"pip install 'dpo_jax\[repro\]'"):
        scorers.make_scorer("vader")


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------

ECHO_LENGTH = python_command("import json, sys\nfor line in sys.stdin: print(len(json.loads(line)['response']))")


def test_command_scorer_reads_one_number_per_response():
    responses = ["", "four", "a longer response, with ünïcode"]
    scores = scorers.make_scorer(f"command:{ECHO_LENGTH}")(["p1", "p2", "p3"], responses)
    assert scores.dtype == np.float32
    np.testing.assert_array_equal(scores, [len(response) for response in responses])


def test_command_scorer_sees_the_prompt():
    command = python_command("import json, sys\nfor line in sys.stdin: print(len(json.loads(line)['prompt']))")
    np.testing.assert_array_equal(scorers.make_scorer(f"command:{command}")(["ab", "abcde"], ["x", "y"]), [2, 5])


@pytest.mark.parametrize("code, message", [
    ("import sys\nsys.stderr.write('the scorer exploded')\nsys.exit(3)",
     r"exited with code 3(.|\n)*the scorer exploded"),
    ("print(1.0)", r"printed 1 lines for 2 inputs"),
    ("print(1.0)\nprint('high')", r"printed 'high' on output line 2"),
    ("print(1.0)\nprint('nan')", r"printed 'nan' on output line 2"),
])
def test_command_scorer_errors_name_the_command(code, message):
    command = python_command(code)
    with pytest.raises(scorers.ScorerError, match=message) as error:
        scorers.make_scorer(f"command:{command}")(["p", "q"], ["a", "b"])
    assert command in str(error.value)


def test_unknown_specs_name_the_spec_and_the_known_kinds():
    with pytest.raises(ValueError, match=r"'sentiment'.*vader.*command:.*hf_classifier:.*reward_model:"):
        scorers.make_scorer("sentiment")
    with pytest.raises(ValueError, match=r"'command:'"):
        scorers.make_scorer("command:")
    with pytest.raises(ValueError, match=r"'vader'.*command:.*scorer:"):
        scorers.make_judge("vader")


# ---------------------------------------------------------------------------------------------
# Judges
# ---------------------------------------------------------------------------------------------

def test_scorer_judge_prefers_the_higher_score_and_splits_ties():
    judge = scorers.make_judge(f"scorer:command:{ECHO_LENGTH}")
    preferences = judge(["p"] * 3, ["long response", "ab", "same"], ["short", "abcd", "four"])
    assert preferences.dtype == np.float32
    np.testing.assert_array_equal(preferences, [1.0, 0.0, 0.5])


def test_scorer_judge_of_vader():
    judge = scorers.make_judge("scorer:vader")
    np.testing.assert_array_equal(judge(["p", "p"], POSITIVE_TEXTS, NEGATIVE_TEXTS), [1.0, 1.0])
    np.testing.assert_array_equal(judge(["p", "p"], NEGATIVE_TEXTS, POSITIVE_TEXTS), [0.0, 0.0])


def test_command_judge_reads_probabilities():
    # P(a better) = len(a) / (len(a) + len(b)): sees both responses, in order.
    command = python_command("import json, sys\n"
                             "for line in sys.stdin:\n"
                             "    r = json.loads(line)\n"
                             "    print(len(r['a']) / (len(r['a']) + len(r['b'])) if r['prompt'] == 'p' else 'bad')")
    preferences = scorers.make_judge(f"command:{command}")(["p", "p"], ["aaa", "a"], ["a", "aaa"])
    np.testing.assert_allclose(preferences, [0.75, 0.25])


def test_command_judge_refuses_values_outside_zero_one():
    command = python_command("import sys\nfor line in sys.stdin: print(1.5)")
    with pytest.raises(scorers.ScorerError, match=r"1\.5 on output line 1.*\[0, 1\]"):
        scorers.make_judge(f"command:{command}")(["p"], ["a"], ["b"])


# ---------------------------------------------------------------------------------------------
# Hugging Face classifiers
# ---------------------------------------------------------------------------------------------

REVIEWS = ["what a wonderful film", "this was terrible and boring", "I loved every minute of it, truly",
           "bad", "awful acting, bad plot, I want my evening back"]


def _train_tokenizer(directory):
    texts = REVIEWS * 4 + ["the plot of the film was long"] * 4
    return tokenize.train_byte_level_bpe(texts, str(directory), vocab_size=300)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A tiny random GPT-2 classifier with three labels, POSITIVE not the last, and its tokenizer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import tokenizers  # pylint: disable=import-outside-toplevel

    root = tmp_path_factory.mktemp("classifier")
    bpe_dir = _train_tokenizer(root / "bpe")
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_file(f"{bpe_dir}/tokenizer.json"), eos_token="<|endoftext|>")
    model_dir = root / "model"
    tokenizer.save_pretrained(model_dir)
    torch.manual_seed(0)
    labels = ["NEGATIVE", "POSITIVE", "NEUTRAL"]
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=1, n_head=2, initializer_range=0.5,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, num_labels=len(labels),
        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
    transformers.GPT2ForSequenceClassification(config).save_pretrained(model_dir)
    return str(model_dir)


def _transformers_probabilities(model_dir, texts):
    """The oracle: each text alone (no padding) through transformers, softmax over the labels."""
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return np.stack([torch.softmax(model(**tokenizer(text, return_tensors="pt")).logits[0], -1).numpy()
                         for text in texts])


def test_hf_classifier_equals_transformers(classifier_dir):
    expected = _transformers_probabilities(classifier_dir, REVIEWS)
    assert np.ptp(expected[:, 1]) > 1e-3  # the texts get different scores, so a mix-up would show
    prompts = ["ignored prompt"] * len(REVIEWS)
    default = scorers.make_scorer(f"hf_classifier:{classifier_dir}")  # batches of padded texts
    np.testing.assert_allclose(default(prompts, REVIEWS), expected[:, 1], rtol=1e-5, atol=1e-6)
    small_batches = scorers.HFClassifierScorer(classifier_dir, "neutral", batch_size=2)
    np.testing.assert_allclose(small_batches(prompts, REVIEWS), expected[:, 2], rtol=1e-5, atol=1e-6)
    by_index = scorers.make_scorer(f"hf_classifier:{classifier_dir}@0")
    np.testing.assert_allclose(by_index(prompts, REVIEWS), expected[:, 0], rtol=1e-5, atol=1e-6)


def test_hf_classifier_unknown_label_lists_the_labels(classifier_dir):
    with pytest.raises(ValueError, match=r"no label 'joy'.*NEGATIVE.*POSITIVE.*NEUTRAL"):
        scorers.make_scorer(f"hf_classifier:{classifier_dir}@joy")


def test_label_defaults():
    assert scorers._label_index({0: "negative", 1: "positive"}, None, "m") == 1
    assert scorers._label_index({0: "POSITIVE", 1: "NEGATIVE"}, None, "m") == 0
    assert scorers._label_index({0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}, None, "m") == 2


def test_hf_classifier_command_line_is_a_command_scorer(classifier_dir):
    command = f"{PYTHON} -m dpo_jax.scorers --hf_classifier={shlex.quote(classifier_dir)}@POSITIVE --batch_size=2"
    scores = scorers.make_scorer(f"command:{command}")(["p"] * len(REVIEWS), REVIEWS)
    np.testing.assert_allclose(scores, _transformers_probabilities(classifier_dir, REVIEWS)[:, 1], rtol=1e-5,
                               atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Reward models of this codebase
# ---------------------------------------------------------------------------------------------

MAX_LENGTH, MAX_PROMPT_LENGTH = 24, 10


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    """(tokenizer dir, model config, graphdef, params) of a tiny reward model with a random head."""
    tokenizer_dir = _train_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    model_config = configs.model_config("tiny", vocab_size=300)
    decoder_config = models.decoder_config(model_config)
    graphdef, _, _ = models.abstract_scalar_model(decoder_config)
    params = models.init_scalar_params(decoder_config, models.init_params(model_config, seed=0, shardings=None),
                                       seed=1)
    # A head of the decoder's width at scale 1, so rewards differ clearly between texts.
    params["head"]["kernel"] = jax.random.normal(jax.random.key(2), params["head"]["kernel"].shape)
    return tokenizer_dir, model_config, graphdef, params


def _expected_rewards(graphdef, params, tokenizer, prompts, responses):
    """The oracle: each prompt + response + EOS alone, unpadded, the score at its last token."""
    eos_id = tokenizer.token_id(tokenizer.eos_token)
    rewards = []
    for prompt, response in zip(prompts, responses):
        prompt_ids, response_ids = tokenizer.encode(prompt, False), tokenizer.encode(response, False) + [eos_id]
        prompt_ids = prompt_ids[-MAX_PROMPT_LENGTH:]
        ids = (prompt_ids + response_ids)[:MAX_LENGTH]
        rewards.append(float(models.apply_scalar(graphdef, params, jnp.asarray([ids]))[0, -1]))
    return np.array(rewards)


PROMPTS = ["Review of the film:", "A long prompt that has to be truncated from the left, the plot of the film was",
           "What did you think?"]
RESPONSES = ["what a wonderful film", "bad", "awful acting, bad plot, I want my evening back and more and more"]


def test_reward_model_scorer_scores_the_last_token_of_each_sequence(reward_model):
    tokenizer_dir, _, graphdef, params = reward_model
    tokenizer = tokenize.load(tokenizer_dir)
    expected = _expected_rewards(graphdef, params, tokenizer, PROMPTS, RESPONSES)
    assert np.ptp(expected) > 1e-3
    scorer = scorers.RewardModelScorer(graphdef, params, tokenizer, max_length=MAX_LENGTH,
                                       max_prompt_length=MAX_PROMPT_LENGTH, batch_size=2)
    scores = scorer(PROMPTS, RESPONSES)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)


def test_reward_model_from_a_workdir(reward_model, tmp_path, tiny_config):
    tokenizer_dir, model_config, graphdef, params = reward_model
    config = tiny_config
    config.model = model_config
    config.data.update(tokenizer=tokenizer_dir, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH)
    workdir.bind_workdir(config, str(tmp_path))
    checkpoints = checkpointing.StageCheckpoints(str(tmp_path / "checkpoints" / "reward"))
    checkpoints.save(7, {"step": 7, "params": params}, force=True)
    checkpoints.wait()
    checkpoints.close()
    expected = _expected_rewards(graphdef, params, tokenize.load(tokenizer_dir), PROMPTS, RESPONSES)
    for path in (tmp_path, tmp_path / "checkpoints" / "reward"):
        scores = scorers.make_scorer(f"reward_model:{path}")(PROMPTS, RESPONSES)
        np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)


def test_reward_model_from_a_directory_that_is_no_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        scorers.RewardModelScorer.from_workdir(str(tmp_path))
