"""The sample-based evaluation harness: sampling, sequence KL, Best-of-N, result files and plots."""

import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_models import random_model

from dpo_jax import evaluation, models, scorers

VOCAB = 8
PROMPTS = np.array([[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 1, 2]])
PROMPT_LENGTHS = np.array([3, 2, 4])
NEW_TOKENS = 2  # vocab 8 and two new tokens: 64 responses per prompt, few enough to enumerate


def _params(seed):
    graphdef, state = nnx.split(random_model("tiny", seed=seed, vocab_size=VOCAB), nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


GRAPHDEF, POLICY = _params(0)
_, REFERENCE = _params(1)


def decode(ids):
    return " ".join(str(token) for token in ids)


def token_sum(prompts, responses):
    """A scorer: the sum of the token ids a response's text names."""
    return np.array([sum(int(token) for token in response.split()) for response in responses], np.float32)


def _sample(params=POLICY, seed=0, **options):
    options = dict(temperature=1.0, samples_per_prompt=4, max_new_tokens=NEW_TOKENS, eos_ids=(), pad_id=0,
                   batch_size=3) | options
    return evaluation.sample_responses(GRAPHDEF, params, PROMPTS, PROMPT_LENGTHS, rng=jax.random.key(seed), **options)


def _rows(samples):
    """(prompt ids, prompt lengths, response ids, response lengths) of every sample, one row each."""
    per_prompt = samples.lengths.shape[1]
    return (np.repeat(PROMPTS, per_prompt, axis=0), np.repeat(PROMPT_LENGTHS, per_prompt),
            samples.tokens.reshape(-1, samples.tokens.shape[-1]), samples.lengths.ravel())


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

def test_samples_depend_on_the_seed_only():
    samples = _sample()
    assert samples.tokens.shape == (3, 4, NEW_TOKENS) and samples.lengths.shape == (3, 4)
    assert samples.logps.shape == (3, 4)
    again = _sample(batch_size=1)  # other batches, one padded: the same samples
    np.testing.assert_array_equal(again.tokens, samples.tokens)
    np.testing.assert_allclose(again.logps, samples.logps, rtol=1e-5)
    assert not np.array_equal(_sample(seed=1).tokens, samples.tokens)


def test_sample_logps_are_temperature_one_logps_of_the_samples():
    """At any sampling temperature, `logps` is log pi(y|x) of the unscaled model, as a forward pass gives it."""
    for temperature in (1.0, 0.5):
        samples = _sample(temperature=temperature)
        forward = evaluation.sequence_logps(GRAPHDEF, POLICY, *_rows(samples), batch_size=5)
        np.testing.assert_allclose(samples.logps.ravel(), forward, rtol=1e-5, atol=1e-5)


def test_policies_sampled_with_one_seed_share_their_random_numbers():
    """Common random numbers: a slightly different policy draws mostly the same first tokens with
    the same seed, far more often than two draws of one policy with different seeds agree."""
    perturbed = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(9), x.shape), POLICY)
    options = dict(samples_per_prompt=64, batch_size=3)
    first_tokens = _sample(**options).tokens[..., 0]
    same_seed = np.mean(_sample(perturbed, **options).tokens[..., 0] == first_tokens)
    other_seed = np.mean(_sample(seed=5, **options).tokens[..., 0] == first_tokens)
    assert same_seed > 0.9 and other_seed < 0.6, (same_seed, other_seed)


# ---------------------------------------------------------------------------------------------
# KL
# ---------------------------------------------------------------------------------------------

def _evaluate(params=POLICY, reference=REFERENCE, **options):
    options = dict(decode=decode, scorer=token_sum, temperatures=(1.0,), samples_per_prompt=4,
                   max_new_tokens=NEW_TOKENS, eos_ids=(), pad_id=0, seed=0, batch_size=3) | options
    return evaluation.evaluate_policy(GRAPHDEF, params, reference, PROMPTS, PROMPT_LENGTHS, **options)


def test_kl_of_a_policy_to_itself_is_zero():
    result = _evaluate(reference=POLICY)
    assert abs(result["kl"]) < 1e-6 and result["kl_standard_error"] < 1e-6


def _exact_kl():
    """Mean over the prompts of the exact KL(pi || pi_ref) of two-token responses: every response enumerated."""
    responses = np.array(list(itertools.product(range(VOCAB), repeat=NEW_TOKENS)))
    kls = []
    for prompt, length in zip(PROMPTS, PROMPT_LENGTHS):
        sequences = np.concatenate([np.tile(prompt[:length], (len(responses), 1)), responses], axis=1)

        def response_logps(params):
            logps = jax.nn.log_softmax(models.apply(GRAPHDEF, params, jnp.asarray(sequences)).astype(jnp.float32))
            steps = np.arange(length - 1, length - 1 + NEW_TOKENS)
            picked = np.asarray(logps)[np.arange(len(responses))[:, None], steps, responses]
            return picked.astype(np.float64).sum(axis=1)

        policy, reference = response_logps(POLICY), response_logps(REFERENCE)
        assert math.isclose(np.exp(policy).sum(), 1.0, rel_tol=1e-5)
        log_ratios = policy - reference
        kls.append((np.exp(policy) * log_ratios, np.exp(policy) * log_ratios ** 2))
    kl = np.mean([terms.sum() for terms, _ in kls])
    variance = np.mean([squares.sum() - terms.sum() ** 2 for terms, squares in kls])  # within prompts
    return kl, math.sqrt(variance)


def test_monte_carlo_kl_matches_the_exact_kl():
    exact_kl, log_ratio_std = _exact_kl()
    samples_per_prompt = 1000
    # Temperatures without 1.0: the KL samples are drawn for it, at temperature 1.
    result = _evaluate(temperatures=(0.5,), samples_per_prompt=samples_per_prompt, batch_size=3)
    standard_error = result["kl_standard_error"]
    expected_error = log_ratio_std / math.sqrt(3 * samples_per_prompt)
    assert 0.7 < standard_error / expected_error < 1.3, (standard_error, expected_error)
    assert exact_kl > 10 * standard_error  # the check below can tell a wrong estimate from noise
    assert abs(result["kl"] - exact_kl) < 4 * standard_error, (result["kl"], exact_kl, standard_error)


def test_sequence_kl_is_the_mean_log_ratio():
    estimate, standard_error = evaluation.sequence_kl(np.array([-1.0, -2.0, -3.0]), np.array([-2.0, -2.0, -2.0]))
    assert estimate == pytest.approx(0.0)
    assert standard_error == pytest.approx(1.0 / math.sqrt(3))


# ---------------------------------------------------------------------------------------------
# Scores and win rates
# ---------------------------------------------------------------------------------------------

def test_evaluate_policy_scores_the_decoded_samples_at_each_temperature():
    eos = 7
    references = ["3", "0 0", "7 7"]  # one reference response per prompt
    result = _evaluate(temperatures=(0.5, 1.0), eos_ids=(eos,), judge=scorers.scorer_judge(token_sum),
                       reference_responses=references)
    assert set(result["temperatures"]) == {"0.5", "1.0"}
    for temperature, stats in result["temperatures"].items():
        samples = _sample(temperature=float(temperature), eos_ids=(eos,))
        texts, wins = [], []
        for prompt_index, (tokens, lengths) in enumerate(zip(samples.tokens, samples.lengths)):
            for sample_tokens, length in zip(tokens, lengths):
                ids = list(sample_tokens[:length])
                text = decode(ids[:-1] if ids[-1] == eos else ids)  # EOS is not part of the text
                texts.append(text)
                reference_score = sum(int(token) for token in references[prompt_index].split())
                sample_score = sum(int(token) for token in text.split())
                wins.append(0.5 if sample_score == reference_score else float(sample_score > reference_score))
        for ids in samples.responses:  # a response ends at its first EOS, or at max_new_tokens
            assert eos not in ids[:-1] and (ids[-1:] == [eos] or len(ids) == NEW_TOKENS)
        scores = token_sum(None, texts)
        assert stats["score"] == pytest.approx(scores.mean())
        assert stats["score_std"] == pytest.approx(scores.std())
        assert stats["win_rate"] == pytest.approx(np.mean(wins))
        assert stats["response_length"] == pytest.approx(samples.lengths.mean())
        assert stats["num_samples"] == 12
    assert "kl" in result


def test_evaluate_policy_without_judge_or_reference():
    result = _evaluate(reference=None)
    assert "kl" not in result and "win_rate" not in result["temperatures"]["1.0"]


# ---------------------------------------------------------------------------------------------
# Best-of-N
# ---------------------------------------------------------------------------------------------

def test_best_of_n_keeps_the_response_the_reward_ranks_highest():
    n = 4
    seen = {}

    def ground_truth(prompts, responses):
        seen["prompts"], seen["responses"] = list(prompts), list(responses)
        return np.arange(len(responses), dtype=np.float32)

    def reward(prompts, responses):  # the first token's id, the second breaking ties
        return np.array([8 * int(text.split()[0]) + int(text.split()[1]) for text in responses], np.float32)

    result = evaluation.best_of_n(GRAPHDEF, POLICY, PROMPTS, PROMPT_LENGTHS, n=n, decode=decode, reward_scorer=reward,
                                  scorer=ground_truth, max_new_tokens=NEW_TOKENS, eos_ids=(), pad_id=0, seed=0,
                                  batch_size=3)
    samples = _sample(samples_per_prompt=n)
    best = [max(prompt_samples.tolist()) for prompt_samples in samples.tokens]  # lexicographic = the reward's order
    assert seen["responses"] == [decode(tokens) for tokens in best] == result["responses"]
    assert seen["prompts"] == [decode(prompt[:length]) for prompt, length in zip(PROMPTS, PROMPT_LENGTHS)]
    assert result["score"] == pytest.approx(1.0) and result["n"] == n
    assert result["kl"] == evaluation.best_of_n_kl(n)


@pytest.mark.parametrize("n", [1, 2, 4, 16])
def test_best_of_n_kl_is_the_limit_of_the_exact_kl(n):
    """Best-of-n over M equally likely responses with distinct rewards keeps the k-th best with
    probability (k/M)^n - ((k-1)/M)^n; its exact KL to the uniform policy stays below the formula and
    tends to it as M grows (continuous rewards)."""
    bound = evaluation.best_of_n_kl(n)
    for size in (10, 100_000):
        ranks = np.arange(1, size + 1)
        kept = (ranks / size) ** n - ((ranks - 1) / size) ** n
        exact = np.sum(kept[kept > 0] * np.log(kept[kept > 0] * size))
        assert exact <= bound + 1e-12
    assert exact == pytest.approx(bound, abs=1e-3)
    assert evaluation.best_of_n_kl(1) == 0.0


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------

def _result_rows():
    rows = []
    for method, offset in (("DPO", 0.0), ("PPO", -0.1)):
        for temperature, kl in ((0.25, 2.0), (0.5, 5.0), (1.0, 9.0)):
            rows.append(dict(method=method, setting=f"T={temperature:g}", temperature=temperature, kl=kl,
                             score=0.5 + offset + kl / 20, win_rate=0.6 + offset - temperature / 10, beta=0.1))
    rows.append(dict(method="Best-of-N", setting="N=4", kl=evaluation.best_of_n_kl(4), score=np.float32(0.7),
                     win_rate=None, responses=["a", "b"]))
    return rows


def _assert_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000  # axes, labels, lines and a legend, not an empty canvas


def test_results_files_and_plots(tmp_path):
    rows = _result_rows()
    json_path, markdown_path = evaluation.write_results(rows, str(tmp_path / "out"))
    with open(json_path, encoding="utf-8") as f:
        loaded = json.load(f)
    assert [row["method"] for row in loaded] == [row["method"] for row in rows]
    assert loaded[0]["score"] == rows[0]["score"] and loaded[-1]["responses"] == ["a", "b"]
    with open(markdown_path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) == 2 + len(rows)
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:5] == ["method", "setting", "kl", "score", "win_rate"] and "responses" not in header
    assert all(line.startswith("| ") and line.count("|") == len(header) + 1 for line in lines[2:])
    assert lines[-1].startswith("| Best-of-N | N=4 |")
    evaluation.plot_frontier(rows, str(tmp_path / "frontier.png"))
    evaluation.plot_win_rates(rows, str(tmp_path / "win_rates.png"))
    _assert_png(tmp_path / "frontier.png")
    _assert_png(tmp_path / "win_rates.png")


def test_evaluation_rows_one_per_temperature():
    result = {"temperatures": {"0.5": {"score": 1.0, "score_std": 0.1}, "1.0": {"score": 2.0, "score_std": 0.2}},
              "kl": 3.0, "kl_standard_error": 0.1}
    rows = evaluation.evaluation_rows("DPO", result, beta=0.1)
    assert rows == [dict(method="DPO", setting="T=0.5", temperature=0.5, kl=3.0, score=1.0, score_std=0.1, beta=0.1),
                    dict(method="DPO", setting="T=1", temperature=1.0, kl=3.0, score=2.0, score_std=0.2, beta=0.1)]
