"""Online and iterative DPO: pair labelling and the beta schedule against hand computations, the
jitted step on a tiny decoder (its first loss is DPO's at the reference, it raises a host reward),
the iterative rounds' snapshots, and a judge's labels."""

import functools

import jax
import numpy as np
import pytest
from rollout_cases import copy, fraction_of_rewarded_tokens, negated, prompts, tiny_models

from dpo_jax import configs, online_dpo, rollout, steps
from dpo_jax.stages import online as online_stages


def test_best_and_worst_pick_each_groups_extremes_and_a_tie_gives_one_row_twice():
    scores = np.array([0.1, 0.9, 0.5, 0.3, 0.3, 0.3, 2.0, -1.0, 0.0], np.float32)
    chosen, rejected = online_dpo.best_and_worst(scores, 3)
    np.testing.assert_array_equal(chosen, [1, 3, 6])
    np.testing.assert_array_equal(rejected, [0, 3, 7])


def test_the_beta_schedule_splits_the_iterations_into_equal_spans():
    betas = (0.5, 0.2, 0.1)
    indices = [int(online_dpo.beta_at(step, betas, 9)) for step in range(12)]
    assert indices == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2]


def test_a_judge_scores_each_pairs_first_response_by_its_preference_and_the_second_by_the_complement():
    def judge(prompts_, responses_a, responses_b):  # prefers the longer response
        assert prompts_ == ["w0", "w1"]  # one prompt per pair
        return [1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5 for a, b in zip(responses_a, responses_b)]

    decode = lambda ids: "".join(f"w{i}" for i in ids)
    host_fn = online_stages.host_judge_fn(judge, decode)
    prompt_ids = np.array([[0], [0], [1], [1]])
    responses = np.array([[5, 6, 7], [5, 6, 7], [5, 6, 7], [5, 6, 7]])
    scores = host_fn(prompt_ids, np.ones(4, int), responses, np.array([3, 1, 2, 2]))
    np.testing.assert_array_equal(scores, [1.0, 0.0, 0.5, 0.5])


# ---------------------------------------------------------------------------------------------
# The online DPO step
# ---------------------------------------------------------------------------------------------

def _online_config(**overrides):
    config = configs.base_config()
    config.online_dpo.update(dict(learning_rate=3e-3, max_new_tokens=8, num_generations=4, beta=0.1), **overrides)
    return config.train, config.online_dpo


def _setup(host_reward_fn=fraction_of_rewarded_tokens, **overrides):
    """A jitted online DPO step (no EOS), its eval step rewarded by the true host scorer, and step 0."""
    graphdef, policy, value_graphdef, _ = tiny_models()
    train_config, online_config = _online_config(**overrides)
    optimizer, schedule = steps.make_optimizer(train_config, rollout.updates_schedule_config(online_config))
    options = dict(graphdef=graphdef, value_graphdef=value_graphdef, eos_ids=(), pad_id=0)
    step = jax.jit(functools.partial(online_dpo.online_dpo_step, optimizer=optimizer, schedule=schedule,
                                     online_config=online_config, host_reward_fn=host_reward_fn, **options),
                   donate_argnums=0)
    eval_step = jax.jit(functools.partial(rollout.eval_step, block=online_config, logps_temperature=1.0,
                                          host_reward_fn=fraction_of_rewarded_tokens, **options))
    state = rollout.init_online_state(policy, None, optimizer, seed=0,
                                      extra_references=online_dpo.extra_references(online_config))
    return state, step, eval_step


METRIC_KEYS = {"objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
               "objective/scores", "objective/scores_margin", "response_length", "rewards/chosen",
               "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "beta",
               "learning_rate", "loss", "nonfinite", "grad_norm"}


@pytest.mark.parametrize("loss_type,loss_at_reference", [("sigmoid", np.log(2.0)), ("ipo", (1 / (2 * 0.1)) ** 2)])
def test_the_first_loss_is_dpos_at_the_reference_and_the_step_is_deterministic(loss_type, loss_at_reference):
    """The policy starts as the reference, so every pair's log-ratio difference is 0: the sigmoid loss
    is log 2 and IPO's (0 - 1 / (2 beta))^2, up to rounding."""
    initial, step, _ = _setup(loss_type=loss_type)
    first_state, first_metrics = step(copy(initial), prompts())
    second_state, second_metrics = step(copy(initial), prompts())
    assert set(first_metrics) == METRIC_KEYS
    first_metrics = jax.device_get(first_metrics)
    assert first_metrics["loss"] == pytest.approx(loss_at_reference, rel=1e-5)
    assert abs(first_metrics["rewards/margins"]) < 1e-5
    assert first_metrics["objective/scores_margin"] >= 0.0  # chosen is the best of its group
    assert first_metrics["beta"] == pytest.approx(0.1)
    assert first_metrics == jax.device_get(second_metrics)
    for first, second in zip(jax.tree.leaves(first_state), jax.tree.leaves(second_state), strict=True):
        np.testing.assert_array_equal(first, second)
    for reference, start in zip(jax.tree.leaves(first_state.ref_params), jax.tree.leaves(initial.ref_params)):
        np.testing.assert_array_equal(reference, start)
    assert any(not np.array_equal(new, old) for new, old in
               zip(jax.tree.leaves(first_state.params), jax.tree.leaves(initial.params)))


@pytest.mark.slow
@pytest.mark.parametrize("sign", [1, -1], ids=["online_dpo", "sign_flipped"])
def test_online_dpo_raises_the_host_reward_and_a_sign_flip_does_not(sign):
    """The flipped run swaps chosen and rejected, which a sign error in the loss amounts to; the same
    criterion must then fail, or the test could not tell."""
    initial, step, eval_step = _setup(fraction_of_rewarded_tokens if sign > 0 else
                                      negated(fraction_of_rewarded_tokens), num_epochs=2)
    held_out = prompts(seed=1)
    before = jax.device_get(eval_step(initial.params, initial.ref_params, held_out))
    state = initial
    for _ in range(12):
        state, metrics = step(state, prompts())
    after = jax.device_get(eval_step(state.params, state.ref_params, held_out))
    raised = after["objective/scores"] > before["objective/scores"] + 0.25
    assert raised == (sign > 0), (before, after)
    assert after["objective/kl"] > 0.0


@pytest.mark.slow
def test_iterative_rounds_sample_from_a_snapshot_taken_at_each_rounds_start():
    """round_steps=2: iterations 0 and 1 sample from the start, iteration 2 from the policy after
    iteration 1; with round_reference the DPO loss of a round's first update is the one at its
    reference (log 2), and the KL metrics stay against the frozen start."""
    initial, step, _ = _setup(round_steps=2, round_reference=True, beta_schedule=(0.2, 0.1), num_steps=4)
    start = copy(initial.params["policy"])
    state, losses_, betas = initial, [], []
    for iteration in range(3):
        if iteration == 2:
            after_round = copy(state.params["policy"])
        state, metrics = step(state, prompts())
        losses_.append(float(metrics["loss"]))
        betas.append(float(metrics["beta"]))
        snapshot = after_round if iteration == 2 else start
        for leaf, expected in zip(jax.tree.leaves(state.ref_params["sampler"]), jax.tree.leaves(snapshot),
                                  strict=True):
            np.testing.assert_array_equal(leaf, expected)
        for leaf, expected in zip(jax.tree.leaves(state.ref_params["reference"]), jax.tree.leaves(start)):
            np.testing.assert_array_equal(leaf, expected)
    assert losses_[0] == pytest.approx(np.log(2.0), rel=1e-5)
    assert losses_[1] != pytest.approx(np.log(2.0), rel=1e-3)  # mid-round: the policy has moved off its reference
    assert losses_[2] == pytest.approx(np.log(2.0), rel=1e-5)  # a new round: the reference is the policy again
    assert betas == pytest.approx([0.2, 0.2, 0.1])


def test_non_finite_scores_skip_the_update():
    initial, step, _ = _setup()
    batch = prompts()
    batch["prompt_ids"] = batch["prompt_ids"].at[3, 0].set(0)  # a failed score: its pair has no label
    state, metrics = step(copy(initial), batch)
    assert float(metrics["nonfinite"]) == 1.0
    assert int(state.step) == 1
    for new, old in zip(jax.tree.leaves((state.params, state.opt_state)),
                        jax.tree.leaves((initial.params, initial.opt_state)), strict=True):
        np.testing.assert_array_equal(new, old)
