"""GRPO: advantages against NumPy, the objective and its normalisations against hand computations,
and the jitted GRPO step on a tiny decoder raising a host reward."""

import functools

import jax
import numpy as np
import pytest
from rollout_cases import copy, fraction_of_rewarded_tokens, negated, prompts, tiny_models

from dpo_jax import configs, grpo, rollout, steps

NUM_GENERATIONS = 4


# ---------------------------------------------------------------------------------------------
# The math
# ---------------------------------------------------------------------------------------------

def _numpy_advantages(scores, group, scale_rewards, baseline):
    grouped = np.asarray(scores, np.float64).reshape(-1, group)
    advantages = np.empty_like(grouped)
    for row, values in enumerate(grouped):
        for i, value in enumerate(values):
            others = np.delete(values, i)
            advantages[row, i] = value - (np.mean(values) if baseline == "mean" else np.mean(others))
        if scale_rewards == "group":
            advantages[row] /= np.std(values, ddof=1) + 1e-4
    if scale_rewards == "batch":
        advantages /= np.std(grouped, ddof=1) + 1e-4
    return advantages.reshape(-1)


@pytest.mark.parametrize("scale_rewards", grpo.SCALE_REWARDS)
@pytest.mark.parametrize("baseline", grpo.BASELINES)
def test_group_advantages_equal_a_numpy_loop(scale_rewards, baseline):
    scores = np.random.RandomState(0).randn(5 * NUM_GENERATIONS).astype(np.float32)
    scores[:NUM_GENERATIONS] = 0.5  # a group of ties: advantage 0, not a division by zero
    advantages = grpo.group_advantages(scores, NUM_GENERATIONS, scale_rewards=scale_rewards, baseline=baseline)
    np.testing.assert_allclose(advantages, _numpy_advantages(scores, NUM_GENERATIONS, scale_rewards, baseline),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(advantages[:NUM_GENERATIONS], 0.0)


def test_leave_one_out_advantages_are_the_mean_ones_scaled_by_g_over_g_minus_one():
    scores = np.array([1.0, 2.0, 6.0], np.float32)
    loo = grpo.group_advantages(scores, 3, scale_rewards="none", baseline="leave_one_out")
    np.testing.assert_allclose(loo, [1.0 - 4.0, 2.0 - 3.5, 6.0 - 1.5], rtol=1e-6)
    mean = grpo.group_advantages(scores, 3, scale_rewards="none", baseline="mean")
    np.testing.assert_allclose(loo, mean * 3 / 2, rtol=1e-6)


def test_group_advantages_refuse_a_group_of_one():
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        grpo.group_advantages(np.zeros(4, np.float32), 1)


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere():
    logps = np.array([[-1.0, -2.0, -0.5]], np.float32)
    ref_logps = np.array([[-1.0, -1.0, -1.5]], np.float32)
    kl = np.asarray(grpo.k3_kl(logps, ref_logps))
    # exp(r) - r - 1 with r = ref - new: 0, e - 2, e^-1.
    np.testing.assert_allclose(kl, [[0.0, np.e - 2.0, np.exp(-1.0)]], rtol=1e-6)


def test_clipped_objective_clips_on_the_side_the_advantage_pushes():
    old = np.zeros((2, 3), np.float32)
    new = np.log(np.array([[1.5, 1.1, 0.5], [1.5, 1.1, 0.5]], np.float32))
    advantages = np.array([1.0, -1.0], np.float32)
    per_token, clip_ratios = grpo.clipped_objective(new, old, advantages, np.ones((2, 3)), epsilon_low=0.2,
                                                    epsilon_high=0.3)
    # A > 0: min(rho, clip(rho, 0.8, 1.3)) -> 1.3, 1.1, 0.5; A < 0: -min(-rho, -clip) = max(rho, clip) -> 1.5, 1.1, 0.8.
    np.testing.assert_allclose(per_token, [[-1.3, -1.1, -0.5], [1.5, 1.1, 0.8]], rtol=1e-6)
    clip_ratios = jax.device_get(clip_ratios)
    assert clip_ratios["clip_ratio/high_mean"] == pytest.approx(1 / 6)  # 1.5 with A > 0
    assert clip_ratios["clip_ratio/low_mean"] == pytest.approx(1 / 6)   # 0.5 with A < 0
    assert clip_ratios["clip_ratio/region_mean"] == pytest.approx(2 / 6)


def test_the_loss_normalisations_against_hand_sums():
    per_token = np.array([[1.0, 2.0, 3.0, 4.0], [10.0, 0.0, 0.0, 0.0]], np.float32)
    mask = np.array([[1, 1, 1, 1], [1, 0, 0, 0]], np.float32)
    loss, weight = grpo.normalise(per_token, mask, "grpo", max_new_tokens=4)
    assert (float(loss), float(weight)) == pytest.approx(((2.5 + 10.0) / 2, 2))
    loss, weight = grpo.normalise(per_token, mask, "dr_grpo", max_new_tokens=4)
    assert (float(loss), float(weight)) == pytest.approx((20.0 / (2 * 4), 2))
    loss, weight = grpo.normalise(per_token, mask, "dapo", max_new_tokens=4)
    assert (float(loss), float(weight)) == pytest.approx((20.0 / 5, 5))
    with pytest.raises(ValueError, match="grpo.loss_type"):
        grpo.normalise(per_token, mask, "bnpo", max_new_tokens=4)


# ---------------------------------------------------------------------------------------------
# The GRPO step
# ---------------------------------------------------------------------------------------------

def _grpo_config(**overrides):
    config = configs.base_config()
    config.grpo.update(dict(learning_rate=3e-3, max_new_tokens=8, num_generations=NUM_GENERATIONS, num_epochs=2,
                            num_minibatches=2, beta=0.01), **overrides)
    return config.train, config.grpo


def _setup(host_reward_fn=fraction_of_rewarded_tokens, **overrides):
    """A jitted GRPO step (no EOS, so every response has max_new_tokens), its eval step rewarded by
    the true host scorer, and step 0."""
    graphdef, policy, value_graphdef, _ = tiny_models()
    train_config, grpo_config = _grpo_config(**overrides)
    optimizer, schedule = steps.make_optimizer(train_config, rollout.updates_schedule_config(grpo_config))
    options = dict(graphdef=graphdef, value_graphdef=value_graphdef, eos_ids=(), pad_id=0)
    step = jax.jit(functools.partial(grpo.grpo_step, optimizer=optimizer, schedule=schedule, grpo_config=grpo_config,
                                     host_reward_fn=host_reward_fn, **options), donate_argnums=0)
    eval_step = jax.jit(functools.partial(rollout.eval_step, block=grpo_config,
                                          host_reward_fn=fraction_of_rewarded_tokens, **options))
    return rollout.init_online_state(policy, None, optimizer, seed=0), step, eval_step


@pytest.fixture(scope="module")
def host_reward_setup():
    return _setup()


METRIC_KEYS = {"objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
               "objective/scores", "response_length", "reward", "reward_std", "frac_reward_zero_std",
               "completions/mean_length", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean",
               "clip_ratio/region_mean", "learning_rate", "loss", "nonfinite", "grad_norm"}


def test_grpo_step_is_deterministic_finite_and_leaves_the_reference_alone(host_reward_setup):
    initial, step, _ = host_reward_setup
    first_state, first_metrics = step(copy(initial), prompts())
    second_state, second_metrics = step(copy(initial), prompts())
    assert set(first_metrics) == METRIC_KEYS
    first_metrics = jax.device_get(first_metrics)
    assert all(np.isfinite(value) for value in first_metrics.values())
    assert first_metrics["nonfinite"] == 0.0
    for first, second in zip(jax.tree.leaves(first_state), jax.tree.leaves(second_state), strict=True):
        np.testing.assert_array_equal(first, second)
    assert first_metrics == jax.device_get(second_metrics)
    for reference, start in zip(jax.tree.leaves(first_state.ref_params), jax.tree.leaves(initial.ref_params)):
        np.testing.assert_array_equal(reference, start)
    moved = [not np.array_equal(new, old) for new, old in
             zip(jax.tree.leaves(first_state.params), jax.tree.leaves(initial.params))]
    assert any(moved)
    assert first_metrics["completions/mean_length"] == 8.0
    assert abs(first_metrics["objective/kl"]) < 1e-5  # the rollout's policy is the reference
    assert first_metrics["reward"] == first_metrics["objective/scores"]


def test_the_first_update_sees_ratios_of_one():
    """One update per iteration: its ratios compare the policy to itself, so nothing is clipped and
    the k3 KL to the reference (the same parameters) is zero, up to rounding."""
    initial, step, _ = _setup(num_epochs=1, num_minibatches=1)
    _, metrics = step(initial, prompts())
    metrics = jax.device_get(metrics)
    assert metrics["clip_ratio/region_mean"] == 0.0
    assert abs(metrics["kl"]) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("sign", [1, -1], ids=["grpo", "sign_flipped"])
def test_grpo_steps_raise_the_host_reward_and_a_sign_flip_does_not(sign):
    """The flipped run trains on -reward, which a sign error in the objective amounts to; the same
    criterion must then fail, or the test could not tell."""
    initial, step, eval_step = _setup(fraction_of_rewarded_tokens if sign > 0 else
                                      negated(fraction_of_rewarded_tokens))
    held_out = prompts(seed=1)
    before = jax.device_get(eval_step(initial.params, initial.ref_params, held_out))
    state = initial
    for _ in range(12):
        state, metrics = step(state, prompts())
    after = jax.device_get(eval_step(state.params, state.ref_params, held_out))
    raised = after["objective/scores"] > before["objective/scores"] + 0.25
    assert raised == (sign > 0), (before, after)
    assert after["objective/kl"] > 0.0


def test_non_finite_scores_skip_every_update(host_reward_setup):
    initial, step, _ = host_reward_setup
    batch = prompts()
    batch["prompt_ids"] = batch["prompt_ids"].at[3, 0].set(0)  # one failed score poisons its group's advantages
    state, metrics = step(copy(initial), batch)
    assert float(metrics["nonfinite"]) == 1.0
    assert int(state.step) == 1
    for new, old in zip(jax.tree.leaves((state.params, state.opt_state)),
                        jax.tree.leaves((initial.params, initial.opt_state)), strict=True):
        np.testing.assert_array_equal(new, old)


def test_the_rollout_holds_num_generations_samples_of_each_prompt_in_consecutive_rows():
    graphdef, policy, value_graphdef, _ = tiny_models()
    _, grpo_config = _grpo_config()
    state = rollout.init_online_state(policy, None, steps.make_optimizer(*_grpo_config())[0], seed=0)
    batch = prompts(num_prompts=3)
    experience = jax.jit(functools.partial(
        rollout.rollout, graphdef=graphdef, value_graphdef=value_graphdef, block=grpo_config, eos_ids=(), pad_id=0,
        host_reward_fn=fraction_of_rewarded_tokens, num_samples=NUM_GENERATIONS))(
        state.params, state.ref_params, batch, jax.random.PRNGKey(0))
    assert experience["input_ids"].shape[0] == 3 * NUM_GENERATIONS
    np.testing.assert_array_equal(experience["prompt_ids"], np.repeat(batch["prompt_ids"], NUM_GENERATIONS, axis=0))
    # Independent draws: the samples of one prompt differ.
    responses = np.asarray(experience["response_tokens"]).reshape(3, NUM_GENERATIONS, -1)
    assert all(len({tuple(sample) for sample in group}) > 1 for group in responses)
