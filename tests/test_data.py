"""The synthetic task, the padded layout and the grain loader."""

import numpy as np
import pytest

from dpo_jax.data import layouts, loader, synthetic
from dpo_jax.data.task import load_task


def test_synthetic_pairs_are_deterministic_and_labelled_by_mood_fraction():
    pairs = synthetic.make_pairs(200, seed=7)
    assert pairs == synthetic.make_pairs(200, seed=7)
    assert pairs != synthetic.make_pairs(200, seed=8)
    half = (64 - synthetic.FIRST_WORD) // 2

    def on_mood_fraction(prompt, response):
        words = np.array(response[:-1])
        positive = words < synthetic.FIRST_WORD + half
        return (positive if prompt[1] == synthetic.POSITIVE else ~positive).mean()

    for pair in pairs:
        assert pair["chosen"][-1] == synthetic.EOS and pair["rejected"][-1] == synthetic.EOS
        assert on_mood_fraction(pair["prompt"], pair["chosen"]) > on_mood_fraction(pair["prompt"], pair["rejected"])


def test_padded_row_masks_only_the_response_and_keeps_the_prompt_end():
    prompt, response = [1, 4, 10, 11, 12, 3], [20, 21, 2]
    row, truncated = layouts.padded_row(prompt, response, max_length=8, max_prompt_length=4, pad_id=2)
    assert truncated
    # The prompt keeps its last 4 tokens; the response is cut from the right to fit 8 tokens.
    np.testing.assert_array_equal(row["input_ids"], [10, 11, 12, 3, 20, 21, 2, 2])
    np.testing.assert_array_equal(row["loss_mask"], [0, 0, 0, 0, 1, 1, 1, 0])
    # Masks come from lengths: the real EOS (== pad id here) is scored, the padding is not.
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 1, 1, 1, 1, 0])


def test_load_task_shapes(tiny_config):
    task = load_task(tiny_config)
    length = tiny_config.data.max_length
    assert task.pairs_train["chosen_input_ids"].shape == (tiny_config.data.num_train, length)
    assert task.sft_eval["input_ids"].shape == (tiny_config.data.num_eval, length)
    np.testing.assert_array_equal(task.sft_train["input_ids"], task.pairs_train["chosen_input_ids"])


def test_train_batches_are_a_function_of_the_step():
    arrays = {"x": np.arange(10)}
    batches = loader.train_batches(arrays, global_batch_size=4, seed=3)
    again = loader.train_batches(arrays, global_batch_size=4, seed=3)
    for step in (0, 1, 7, 100):
        np.testing.assert_array_equal(batches[step]["x"], again[step]["x"])
    # Every epoch is a permutation of the data.
    seen = np.concatenate([batches[step]["x"] for step in range(5)])[:10]
    assert sorted(seen.tolist()) == list(range(10))


def test_loader_rejects_a_batch_larger_than_the_data():
    with pytest.raises(ValueError, match="fewer examples than one global batch"):
        loader.train_batches({"x": np.arange(3)}, global_batch_size=4, seed=0)


def test_a_mixture_draws_its_components_in_proportion_to_the_weights():
    arrays = {"x": np.arange(40)}  # component 0: rows 0-9, component 1: rows 10-39
    batches = loader.train_batches(arrays, global_batch_size=8, seed=1, mixture=[(0, 10, 3.0), (10, 40, 1.0)])
    drawn = np.concatenate([batches[step]["x"] for step in range(200)])
    np.testing.assert_allclose(np.mean(drawn < 10), 0.75, atol=0.02)
    # Each component still goes through all its rows before repeating one.
    first = [x for x in drawn if x < 10][:10]
    assert sorted(first) == list(range(10))


def test_each_process_reads_only_its_share_of_the_same_global_batches(monkeypatch):
    arrays = {"x": np.arange(64)}
    whole = loader.train_batches(arrays, global_batch_size=8, seed=5)
    shares = []
    for process in range(2):
        monkeypatch.setattr(loader.jax, "process_count", lambda: 2)
        monkeypatch.setattr(loader.jax, "process_index", lambda process=process: process)
        shares.append(loader.train_batches(arrays, global_batch_size=8, seed=5))
    for step in (0, 3, 11):  # 11: a later epoch
        local = [share[step]["x"] for share in shares]
        assert len(local[0]) == len(local[1]) == 4 and not set(local[0]) & set(local[1])
        assert sorted(np.concatenate(local)) == sorted(whole[step]["x"])


def test_a_resumed_loader_sees_exactly_the_batches_of_an_uninterrupted_run():
    arrays = {"x": np.arange(50), "y": np.arange(50) * 2}
    uninterrupted = loader.train_batches(arrays, global_batch_size=8, seed=9)
    seen = [uninterrupted[step]["x"] for step in range(20)]  # 3+ epochs
    resumed = loader.train_batches(arrays, global_batch_size=8, seed=9)  # a new process, as after a restart
    for step in range(12, 20):
        np.testing.assert_array_equal(resumed[step]["x"], seen[step])
    assert not all(np.array_equal(a, b) for a, b in zip(seen, [
        loader.train_batches(arrays, global_batch_size=8, seed=10)[step]["x"] for step in range(20)]))
