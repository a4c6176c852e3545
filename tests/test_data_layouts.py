"""The padded, packed, prefix-shared and packed prefix-shared layouts give the same log-probs and loss."""

import functools

import jax
import numpy as np
import pytest

from dpo_jax import models, steps
from dpo_jax.data import layouts
from dpo_jax.models import transformer

MAX_LENGTH = 20


def _random_pairs(num_pairs, seed, vocab_size=64):
    """Pairs of varied lengths: prompts start with 1 (BOS), responses end with 2 (EOS)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(num_pairs):
        prompt = [1] + rng.integers(3, vocab_size, size=rng.integers(0, 8)).tolist()
        chosen, rejected = ([*rng.integers(3, vocab_size, size=rng.integers(0, MAX_LENGTH - len(prompt))).tolist(), 2]
                            for _ in range(2))
        pairs.append(dict(prompt=prompt, chosen=chosen, rejected=rejected))
    return pairs


def _model(config, **overrides):
    config.model.update(overrides)
    graphdef, _, _ = models.abstract_model(config.model)
    return graphdef, models.init_params(config.model, seed=1, shardings=None)


def _pair_logps(graphdef, params, arrays):
    """Sorted [(chosen, rejected)] sequence log-probs of every real pair of the arrays, and the DPO loss
    against a reference that is the same model with perturbed parameters (so rewards are not all 0)."""
    batch = jax.tree.map(np.asarray, arrays)
    logps = jax.jit(functools.partial(steps.reference_logps, graphdef=graphdef))(params, batch)
    chosen = np.asarray(logps["reference_chosen_logps"]).reshape(-1)
    rejected = np.asarray(logps["reference_rejected_logps"]).reshape(-1)
    real = arrays["pair_mask"].reshape(-1) if "pair_mask" in arrays else np.ones(chosen.shape, bool)
    return sorted(zip(chosen[real].tolist(), rejected[real].tolist()))


def test_all_layouts_give_the_same_log_probs_and_loss(tiny_config):
    """Every layout, and every path that computes the model: full logits, log-probs of the scored
    tokens only (`logits_chunk_size`), and that with the blockwise attention."""
    pairs = _random_pairs(16, seed=0)
    _, params = _model(tiny_config, position_embedding="rope")  # positions matter through the rotations
    reference_params = jax.tree.map(lambda p: p * 1.05, params)
    kwargs = dict(max_length=MAX_LENGTH, row_length=2 * MAX_LENGTH + 6, max_pairs_per_row=4)
    paths = {"full logits": dict(logits_chunk_size=0), "scored tokens": dict(logits_chunk_size=8),
             "scored tokens, blockwise attention": dict(logits_chunk_size=8, attention_block_size=8)}
    results, losses = {}, {}
    for path, overrides in paths.items():
        path_graphdef = models.abstract_model({**tiny_config.model, **overrides})[0]
        loss_fn = jax.jit(functools.partial(steps.dpo_loss, graphdef=path_graphdef, dpo_config=tiny_config.dpo))
        for layout in layouts.LAYOUTS:
            arrays = layouts.pair_arrays(pairs, layout, **kwargs)
            results[path, layout] = _pair_logps(path_graphdef, params, arrays)
            loss, (metrics, weight) = loss_fn(params, reference_params, jax.tree.map(np.asarray, arrays), None)
            losses[path, layout] = (float(loss), float(metrics["rewards/accuracies"]), float(metrics["logps/chosen"]),
                                    float(weight))
    expected = ("full logits", "padded")
    for key in results:
        np.testing.assert_allclose(results[key], results[expected], rtol=1e-5, atol=1e-5, err_msg=str(key))
        np.testing.assert_allclose(losses[key], losses[expected], rtol=1e-5, atol=1e-5, err_msg=str(key))
    assert losses[expected][3] == len(pairs)


def test_packed_prefix_shared_log_probs_match_plain_forward_passes(tiny_config):
    pairs = _random_pairs(4, seed=1)
    graphdef, params = _model(tiny_config)
    arrays = layouts.pair_arrays(pairs, "packed_prefix_shared", max_length=MAX_LENGTH, row_length=2 * MAX_LENGTH,
                                 max_pairs_per_row=4)
    got = _pair_logps(graphdef, params, arrays)
    # One sequence per forward pass, right-padded (causal attention: the padding changes nothing before it).
    forward = jax.jit(functools.partial(models.apply, graphdef))
    expected = []
    for pair in pairs:
        scores = []
        for side in ("chosen", "rejected"):
            tokens = pair["prompt"] + pair[side]
            logits = forward(params, np.array([tokens + [0] * (MAX_LENGTH - len(tokens))]))[0]
            log_probs = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
            scores.append(sum(log_probs[t - 1, tokens[t]] for t in range(len(pair["prompt"]), len(tokens))))
        expected.append(tuple(scores))
    np.testing.assert_allclose(got, sorted(expected), rtol=1e-5, atol=1e-5)


def test_prefix_shared_rows_encode_the_prompt_once_and_hide_chosen_from_rejected():
    pair = dict(prompt=[1, 10, 11], chosen=[20, 21, 2], rejected=[30, 2])
    arrays = layouts.pair_arrays([pair], "prefix_shared", max_length=8, row_length=16, max_pairs_per_row=4)
    length = 3 + 1 + 3 + 2  # prompt, its last token again, chosen, rejected
    np.testing.assert_array_equal(arrays["input_ids"][0, :length], [1, 10, 11, 20, 21, 2, 11, 30, 2])
    np.testing.assert_array_equal(arrays["positions"][0, :length], [0, 1, 2, 3, 4, 5, 2, 3, 4])
    np.testing.assert_array_equal(arrays["branch_ids"][0, :length], [0, 0, 1, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(arrays["sequence_ids"][0, :length], [-1, -1, -1, 0, 0, 0, -1, 1, 1])
    assert arrays["segment_ids"][0, length:].sum() == 0 and arrays["pair_mask"].tolist() == [[True]]
    index = np.arange(16)
    mask = transformer.attention_mask(arrays["segment_ids"], arrays["segment_ids"], index, index)[:, 0]
    mask = np.asarray(mask & transformer.branch_mask(arrays["branch_ids"]))[0]
    rejected_first = 6
    assert mask[rejected_first, :2].all()          # sees the shared prompt
    assert not mask[rejected_first, 2:6].any()     # not the chosen branch
    assert mask[rejected_first, rejected_first]    # itself


def test_pack_respects_capacity_and_item_limit_and_places_every_item():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 40, size=300).tolist()
    bins = layouts.pack(sizes, capacity=64, max_items=3)
    assert sorted(i for members in bins for i in members) == list(range(300))
    assert all(sum(sizes[i] for i in members) <= 64 and len(members) <= 3 for members in bins)
    # No more rows than best-fit decreasing, and one row fewer leaves worst-fit decreasing an item out.
    order = sorted(range(300), key=lambda i: -sizes[i])
    assert len(bins) <= len(layouts._best_fit_decreasing(sizes, order, 64, 3))
    assert layouts._worst_fit_decreasing(sizes, order, 64, 3, len(bins) - 1) is None
    # Rows in order of their first item, which is their largest.
    firsts = [sizes[members[0]] for members in bins]
    assert firsts == sorted(firsts, reverse=True)
    assert all(sizes[members[0]] == max(sizes[i] for i in members) for members in bins)
    with pytest.raises(layouts.ItemTooLongError, match="item 1 takes 65 tokens, more than a row of 64"):
        layouts.pack([3, 65], capacity=64, max_items=3)
    assert layouts.pack([], capacity=64, max_items=3) == []


@pytest.mark.parametrize("seed", range(3))
def test_pack_fills_rows_by_tokens_when_the_item_limit_allows(seed):
    # Long-tailed sizes, like HH's pairs, five per row on average by tokens and five at most: filling
    # rows one after another (best-fit decreasing) leaves the small items to rows full by count.
    rng = np.random.default_rng(seed)
    sizes = np.clip(rng.lognormal(np.log(50), 0.6, size=2000), 4, 250).astype(int).tolist()
    capacity, max_items = int(5.2 * np.mean(sizes)), 5
    bins = layouts.pack(sizes, capacity=capacity, max_items=max_items)
    fewest = max(-(-len(sizes) // max_items), -(-sum(sizes) // capacity))  # by count and by tokens
    assert len(bins) <= 1.03 * fewest  # best-fit decreasing: 1.19 * fewest


def test_packing_cuts_padding():
    pairs = _random_pairs(200, seed=2)
    kwargs = dict(max_length=MAX_LENGTH, row_length=2 * MAX_LENGTH, max_pairs_per_row=8)
    stats = {layout: layouts.token_stats(layouts.pair_arrays(pairs, layout, **kwargs), len(pairs))
             for layout in layouts.LAYOUTS}
    real_tokens = sum(2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in pairs) / len(pairs)
    np.testing.assert_allclose(stats["padded"]["tokens_per_example"], 2 * MAX_LENGTH)
    np.testing.assert_allclose(stats["padded"]["padding_fraction"], 1 - real_tokens / (2 * MAX_LENGTH))
    assert stats["packed"]["padding_fraction"] < stats["padded"]["padding_fraction"]
    assert stats["packed_prefix_shared"]["tokens_per_example"] < stats["packed"]["tokens_per_example"]


def test_truncation_keeps_bos_and_the_prompt_end_and_cuts_responses_from_the_right():
    prompt, responses, truncated = layouts.truncate_example(
        [1, 5, 6, 7, 8], [[20, 21, 22, 2], [30, 2]], max_length=6, max_prompt_length=3, keep_prefix=1)
    assert truncated
    assert prompt == [1, 7, 8]
    assert responses == [[20, 21, 22], [30, 2]]
    assert layouts.truncate_example([1, 5], [[2]], max_length=6, max_prompt_length=3)[2] is False
