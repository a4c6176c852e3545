"""Batched generation with the KV cache, checked against decoding by full forward passes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_models import random_model, run

from dpo_jax.models import sampling

PROMPTS = np.array([[5, 9, 2, 0, 0, 0, 0], [7, 1, 3, 3, 8, 6, 4], [11, 12, 13, 14, 15, 0, 0]])
LENGTHS = np.array([3, 7, 5])


def _split(model):
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


def _full_logits(model, sequences, width=24):
    """Logits [batch, width, vocab] of whole sequences, right-padded to one width (one compilation)."""
    input_ids = np.zeros((len(sequences), width), np.int32)
    segment_ids = np.zeros((len(sequences), width), np.int32)
    for row, sequence in enumerate(sequences):
        input_ids[row, :len(sequence)] = sequence
        segment_ids[row, :len(sequence)] = 1
    return np.asarray(run(model, jnp.asarray(input_ids), segment_ids=jnp.asarray(segment_ids)))


def _greedy_without_cache(model, num_tokens):
    """The oracle: re-run the whole sequences for each new token and take the argmax."""
    sequences = [list(prompt[:length]) for prompt, length in zip(PROMPTS, LENGTHS)]
    for _ in range(num_tokens):
        logits = _full_logits(model, sequences)
        for sequence, row_logits in zip(sequences, logits):
            sequence.append(int(np.argmax(row_logits[len(sequence) - 1])))
    return [sequence[length:] for sequence, length in zip(sequences, LENGTHS)]


def _generate(model, **kwargs):
    options = dict(rng=jax.random.key(0), max_new_tokens=10, length_bucket=8)
    return sampling.generate(*_split(model), PROMPTS, LENGTHS, **(options | kwargs))


@pytest.mark.parametrize("preset, overrides", [
    ("tiny", {}),                               # learned positions
    ("tiny-mistral", dict(sliding_window=4)),   # rope, grouped-query attention, a window the decode crosses
    ("tiny-gptj", {}),                          # partial rotary, parallel residual
])
def test_greedy_with_cache_equals_greedy_without(preset, overrides):
    model = random_model(preset, **overrides)
    result = _generate(model, temperature=0.0)
    assert result.tokens.tolist() == _greedy_without_cache(model, 10)
    np.testing.assert_array_equal(result.lengths, [10, 10, 10])


def test_logps_are_the_models_log_probabilities_of_the_samples():
    model = random_model("tiny-llama")
    result = _generate(model, temperature=1.0)
    logits = _full_logits(model, [np.concatenate([prompt[:length], tokens])
                                  for prompt, length, tokens in zip(PROMPTS, LENGTHS, result.tokens)])
    for row, length in enumerate(LENGTHS):
        logp = jax.nn.log_softmax(logits[row, length - 1:length + 9], axis=-1)
        np.testing.assert_allclose(result.logps[row], logp[np.arange(10), result.tokens[row]], atol=1e-4)


def test_sampling_is_reproducible_and_per_sequence():
    model = random_model("tiny-llama")
    keys = jax.random.split(jax.random.key(3), 3)
    first = _generate(model, rng=keys)
    np.testing.assert_array_equal(_generate(model, rng=keys).tokens, first.tokens)
    assert not np.array_equal(_generate(model, rng=jax.random.split(jax.random.key(4), 3)).tokens, first.tokens)
    # A sequence's sample depends on its own key, not on the other sequences of the batch.
    alone = sampling.generate(*_split(model), PROMPTS[1:2], LENGTHS[1:2], rng=keys[1:2], max_new_tokens=10,
                              length_bucket=8)
    np.testing.assert_array_equal(alone.tokens[0], first.tokens[1])


@pytest.mark.parametrize("filters", [dict(top_k=1), dict(top_p=1e-6)])
def test_top_k_1_and_tiny_top_p_are_greedy(filters):
    model = random_model("tiny-qwen2")
    np.testing.assert_array_equal(_generate(model, temperature=1.5, **filters).tokens,
                                  _generate(model, temperature=0.0).tokens)


def test_top_k_samples_only_the_k_most_likely_tokens():
    model = random_model("tiny")
    top_k = 3
    result = _generate(model, temperature=5.0, top_k=top_k)  # a high temperature would otherwise roam freely
    logits = _full_logits(model, [np.concatenate([prompt[:length], tokens])
                                  for prompt, length, tokens in zip(PROMPTS, LENGTHS, result.tokens)])
    for row, length in enumerate(LENGTHS):
        step_logits = logits[row, length - 1:length + 9]
        sampled = step_logits[np.arange(10), result.tokens[row]]
        assert (np.sum(step_logits > sampled[:, None], axis=-1) < top_k).all()  # rank among the top k


def test_generation_stops_at_eos():
    model = random_model("tiny")
    greedy = _generate(model, temperature=0.0).tokens
    eos = int(greedy[0, 2])  # the third token of the first sequence ends it
    result = _generate(model, temperature=0.0, eos_ids=(eos,), pad_id=63)
    for row in range(3):
        hits = np.flatnonzero(greedy[row] == eos)
        length = hits[0] + 1 if hits.size else 10
        assert result.lengths[row] == length
        np.testing.assert_array_equal(result.tokens[row, :length], greedy[row, :length])
        assert (result.tokens[row, length:] == 63).all() and (result.logps[row, length:] == 0).all()


def test_one_compilation_per_length_bucket():
    model = random_model("tiny")
    graphdef, params = _split(model)
    before = sampling.generate_traced._cache_size()  # pylint: disable=protected-access
    for width in (3, 5, 8):  # all in the bucket of 8
        sampling.generate(graphdef, params, PROMPTS[:, :width], np.minimum(LENGTHS, width), rng=jax.random.key(0),
                          max_new_tokens=4, length_bucket=8)
    assert sampling.generate_traced._cache_size() == before + 1  # pylint: disable=protected-access


def test_bad_requests_are_refused():
    model = random_model("tiny")
    with pytest.raises(ValueError, match="prompt_lengths"):
        sampling.generate(*_split(model), PROMPTS, [0, 7, 5], rng=jax.random.key(0), max_new_tokens=4)
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        sampling.generate(*_split(model), PROMPTS, LENGTHS, rng=jax.random.key(0), max_new_tokens=125)
