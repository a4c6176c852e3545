"""PPO: the math against hand computations and a NumPy GAE, and the jitted PPO step on a tiny decoder."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rollout_cases import NUM_PROMPTS, copy, fraction_of_rewarded_tokens, prompts, tiny_models

from dpo_jax import configs, models, ppo, rollout, steps

# ---------------------------------------------------------------------------------------------
# The math
# ---------------------------------------------------------------------------------------------

def _response_masks(rng, batch, time):
    """Contiguous response runs [start, end) per row, some starting at 0 or ending at `time`."""
    mask = np.zeros((batch, time), np.float32)
    for row in range(batch):
        start = rng.randint(0, time - 1)
        end = rng.randint(start + 1, time + 1)
        mask[row, start:end] = 1.0
    return mask


def _numpy_gae(rewards, values, mask, gamma, lam):
    """The textbook loop over each row's response tokens, bootstrapping 0 after the last one."""
    advantages = np.zeros_like(rewards)
    for row in range(rewards.shape[0]):
        tokens = np.flatnonzero(mask[row])
        next_advantage, next_value = 0.0, 0.0
        for t in tokens[::-1]:
            delta = rewards[row, t] + gamma * next_value - values[row, t]
            next_advantage = delta + gamma * lam * next_advantage
            next_value = values[row, t]
            advantages[row, t] = next_advantage
    return advantages, (advantages + values) * mask


def test_gae_equals_a_numpy_loop_over_the_response_tokens():
    rng = np.random.RandomState(0)
    shape = (6, 11)
    rewards, values = rng.randn(*shape).astype(np.float32), rng.randn(*shape).astype(np.float32)
    mask = _response_masks(rng, *shape)
    advantages, returns = jax.jit(ppo.gae, static_argnums=(3, 4))(rewards, values, mask, 0.9, 0.8)
    expected_advantages, expected_returns = _numpy_gae(rewards, values, mask, 0.9, 0.8)
    np.testing.assert_allclose(advantages, expected_advantages, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(returns, expected_returns, rtol=1e-5, atol=1e-5)


def test_whiten_standardises_the_masked_tokens_only():
    rng = np.random.RandomState(1)
    values = (3.0 + 2.0 * rng.randn(4, 9)).astype(np.float32)
    mask = _response_masks(rng, 4, 9)
    selected = values[mask > 0]
    whitened = np.asarray(ppo.whiten(values, mask))
    np.testing.assert_allclose(whitened[mask > 0], (selected - selected.mean()) / selected.std(ddof=1), rtol=1e-4)
    assert np.all(whitened[mask == 0] == 0.0)
    rescaled = np.asarray(ppo.whiten(values, mask, shift_mean=False))
    np.testing.assert_allclose(rescaled[mask > 0], (selected - selected.mean()) / selected.std(ddof=1)
                               + selected.mean(), rtol=1e-4)


def test_policy_loss_clips_the_ratio_on_the_side_the_advantage_pushes():
    old = np.zeros((1, 4), np.float32)
    # Token ratios 1.5, 0.5, 0.5, 1.5 with advantages +1, +1, -1, -1, clip range 0.2:
    # A > 0 caps the gain at 1.2 (clipped); A > 0 with a falling ratio keeps 0.5 (not clipped);
    # A < 0 with a falling ratio caps at 0.8 (clipped); A < 0 with a rising ratio keeps 1.5.
    new = np.log(np.array([[1.5, 0.5, 0.5, 1.5]], np.float32))
    advantages = np.array([[1.0, 1.0, -1.0, -1.0]], np.float32)
    loss, clipfrac, approxkl = ppo.policy_loss(new, old, advantages, np.ones((1, 4)), 0.2)
    np.testing.assert_allclose(loss, np.mean([-1.2, -0.5, 0.8, 1.5]), rtol=1e-6)
    np.testing.assert_allclose(clipfrac, 0.5)
    np.testing.assert_allclose(approxkl, np.mean(0.5 * new[0] ** 2), rtol=1e-6)
    # A masked token counts for nothing.
    masked_loss, masked_clipfrac, _ = ppo.policy_loss(new, old, advantages, np.array([[1, 1, 0, 0]]), 0.2)
    np.testing.assert_allclose(masked_loss, np.mean([-1.2, -0.5]), rtol=1e-6)
    np.testing.assert_allclose(masked_clipfrac, 0.5)


def test_value_loss_takes_the_larger_of_the_clipped_and_unclipped_errors():
    old_values = np.zeros((1, 3), np.float32)
    returns = np.array([[1.0, 1.0, -1.0]], np.float32)
    # Predictions 0.5 (clipped to 0.2: error 0.64 > 0.25), 1.0 (clipped to 0.2: 0.64 > 0), -0.1 (inside the range).
    new_values = np.array([[0.5, 1.0, -0.1]], np.float32)
    loss, clipfrac = ppo.value_loss(new_values, old_values, returns, np.ones((1, 3)), 0.2)
    np.testing.assert_allclose(loss, 0.5 * np.mean([0.64, 0.64, 0.81]), rtol=1e-5)
    np.testing.assert_allclose(clipfrac, 2 / 3, rtol=1e-6)


def test_kl_controller_raises_the_coefficient_above_the_target_and_lowers_it_below():
    up = float(ppo.update_kl_coef(0.1, 9.0, 64, 6.0, 10000))
    down = float(ppo.update_kl_coef(0.1, 5.7, 64, 6.0, 10000))
    np.testing.assert_allclose(up, 0.1 * (1 + 0.2 * 64 / 10000), rtol=1e-6)   # the error is clipped to +0.2
    np.testing.assert_allclose(down, 0.1 * (1 - 0.05 * 64 / 10000), rtol=1e-6)
    assert float(ppo.update_kl_coef(0.1, float("nan"), 64, 6.0, 10000)) == np.float32(0.1)


def test_kl_penalised_rewards_add_the_score_at_the_last_response_token():
    logps = np.array([[-1.0, -2.0, -0.5, -3.0], [-1.0, -1.0, -1.0, -1.0]], np.float32)
    ref_logps = np.array([[-1.5, -1.0, -0.5, -9.0], [-2.0, -1.0, -1.0, -1.0]], np.float32)
    mask = np.array([[0, 1, 1, 0], [1, 1, 1, 1]], np.float32)
    rewards = ppo.kl_penalised_rewards(np.array([2.0, -1.0]), logps, ref_logps, mask, 0.1)
    expected = [[0.0, -0.1 * (-2.0 + 1.0), 0.0 + 2.0, 0.0],
                [-0.1 * (-1.0 + 2.0), 0.0, 0.0, -1.0]]
    np.testing.assert_allclose(rewards, expected, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Rollout rows
# ---------------------------------------------------------------------------------------------

def test_rollout_rows_hold_prompt_then_response_with_a_mask_on_the_predicted_tokens():
    rows = rollout.rollout_rows(jnp.array([[5, 6, 0], [7, 0, 0]]), jnp.array([2, 1]),
                            jnp.array([[9, 10, 11], [12, 3, 0]]), jnp.array([3, 2]))
    np.testing.assert_array_equal(rows["input_ids"], [[0, 5, 6, 9, 10, 11], [0, 0, 7, 12, 3, 0]])
    np.testing.assert_array_equal(rows["segment_ids"], [[0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]])
    np.testing.assert_array_equal(rows["positions"][rows["segment_ids"] > 0], [0, 1, 2, 3, 4, 0, 1, 2])
    np.testing.assert_array_equal(rows["response_mask"], [[0, 0, 1, 1, 1], [0, 0, 1, 1, 0]])


def test_rollout_rows_give_each_sequence_the_log_probs_it_has_alone():
    graphdef, policy, _, _ = tiny_models()
    prompt_ids, prompt_lengths = jnp.array([[5, 6, 0], [7, 0, 0]]), jnp.array([2, 1])
    responses, response_lengths = jnp.array([[9, 10, 11], [12, 3, 0]]), jnp.array([3, 2])
    rows = rollout.rollout_rows(prompt_ids, prompt_lengths, responses, response_lengths)
    apply = jax.jit(models.apply, static_argnums=0)
    logits = apply(graphdef, policy, rows["input_ids"], rows["positions"], rows["segment_ids"])
    row_logps = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    for row, sequence in enumerate([[5, 6, 9, 10, 11], [7, 12, 3]]):
        alone = jax.nn.log_softmax(apply(graphdef, policy, jnp.array([sequence]))[0, :-1], axis=-1)
        predicted = np.flatnonzero(rows["response_mask"][row])
        num_response = len(predicted)
        np.testing.assert_allclose(row_logps[row, predicted], alone[-num_response:], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The PPO step
# ---------------------------------------------------------------------------------------------

def _ppo_config(**overrides):
    config = configs.base_config()
    config.ppo.update(dict(learning_rate=3e-3, max_new_tokens=8, num_epochs=2, num_minibatches=2, kl_coef=0.01),
                      **overrides)
    return config.train, config.ppo


@pytest.fixture(scope="module")
def host_reward_setup():
    """A jitted PPO step (no EOS, so every response has max_new_tokens) rewarded by the host scorer."""
    graphdef, policy, value_graphdef, value = tiny_models()
    train_config, ppo_config = _ppo_config()
    optimizer, schedule = steps.make_optimizer(train_config, rollout.updates_schedule_config(ppo_config))
    options = dict(graphdef=graphdef, value_graphdef=value_graphdef, ppo_config=ppo_config, eos_ids=(), pad_id=0,
                   host_reward_fn=fraction_of_rewarded_tokens)
    step = jax.jit(functools.partial(ppo.ppo_step, optimizer=optimizer, schedule=schedule, **options),
                   donate_argnums=0)
    state = ppo.init_ppo_state(policy, value, None, optimizer, seed=0, kl_coef=ppo_config.kl_coef)
    eval_options = {key: value for key, value in options.items() if key != "ppo_config"}
    return state, step, jax.jit(functools.partial(rollout.eval_step, block=ppo_config, **eval_options))


METRIC_KEYS = {"objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
               "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
               "val/clipfrac_avg", "kl_coef", "response_length", "learning_rate", "loss", "nonfinite", "grad_norm"}


@pytest.mark.slow
def test_ppo_step_is_deterministic_finite_and_leaves_the_reference_alone(host_reward_setup):
    initial, step, _ = host_reward_setup
    first_state, first_metrics = step(copy(initial), prompts())
    second_state, second_metrics = step(copy(initial), prompts())
    assert set(first_metrics) == METRIC_KEYS
    assert all(np.isfinite(value) for value in jax.device_get(first_metrics).values())
    assert float(first_metrics["nonfinite"]) == 0.0
    for first, second in zip(jax.tree.leaves(first_state), jax.tree.leaves(second_state), strict=True):
        np.testing.assert_array_equal(first, second)
    assert jax.device_get(first_metrics) == jax.device_get(second_metrics)
    assert int(first_state.step) == 1
    # The frozen reference is what the policy was; the policy and the value model moved.
    for reference, start in zip(jax.tree.leaves(first_state.ref_params), jax.tree.leaves(initial.ref_params)):
        np.testing.assert_array_equal(reference, start)
    for name in ("policy", "value"):
        moved = [not np.array_equal(new, old) for new, old in
                 zip(jax.tree.leaves(first_state.params[name]), jax.tree.leaves(initial.params[name]))]
        assert any(moved), name
    # The policy starts as the reference: no KL in the first rollout, hence no KL penalty (up to
    # rounding: the two forward passes are separate computations of one compiled program).
    assert abs(float(first_metrics["objective/kl"])) < 1e-5
    assert abs(float(first_metrics["objective/non_score_reward"])) < 1e-6
    assert float(first_metrics["response_length"]) == _ppo_config()[1].max_new_tokens


@pytest.mark.slow
def test_ppo_steps_raise_the_host_reward(host_reward_setup):
    initial, step, eval_step = host_reward_setup
    state, batch = copy(initial), prompts()
    held_out = prompts(seed=1)
    before = jax.device_get(eval_step(initial.params, initial.ref_params, held_out))
    scores = []
    for _ in range(15):
        state, metrics = step(state, batch)
        scores.append(float(metrics["objective/scores"]))
    after = jax.device_get(eval_step(state.params, state.ref_params, held_out))
    # At the start about 1 token in 64 is rewarded; a sign error would push the share towards 0.
    assert np.mean(scores[-3:]) > scores[0] + 0.25, scores
    assert after["objective/scores"] > before["objective/scores"] + 0.25, (before, after)
    assert after["objective/kl"] > 0.0 and abs(before["objective/kl"]) < 1e-5
    assert after["loss"] == -after["objective/scores"]


@pytest.mark.slow
def test_non_finite_scores_skip_every_update(host_reward_setup):
    initial, step, _ = host_reward_setup
    batch = prompts()
    batch["prompt_ids"] = batch["prompt_ids"].at[3, 0].set(0)  # one failed score poisons the whitened advantages
    state, metrics = step(copy(initial), batch)
    assert float(metrics["nonfinite"]) == 1.0
    assert int(state.step) == 1
    for new, old in zip(jax.tree.leaves((state.params, state.opt_state, state.stage_state)),
                        jax.tree.leaves((initial.params, initial.opt_state, initial.stage_state)), strict=True):
        np.testing.assert_array_equal(new, old)


def test_eval_step_is_deterministic(host_reward_setup):
    initial, _, eval_step = host_reward_setup
    first = jax.device_get(eval_step(initial.params, initial.ref_params, prompts(seed=2)))
    second = jax.device_get(eval_step(initial.params, initial.ref_params, prompts(seed=2)))
    assert first == second
    assert set(first) == {"objective/scores", "objective/kl", "objective/entropy", "response_length", "loss"}


@pytest.mark.slow
def test_first_update_sees_ratios_of_one_and_the_kl_controller_adapts():
    """One update per iteration: its ratios compare the policy to itself (approxkl and clipfrac 0);
    the reward model path scores every response with the model's constant head (bias, zero kernel)."""
    graphdef, policy, value_graphdef, value = tiny_models()
    train_config, ppo_config = _ppo_config(num_epochs=1, num_minibatches=1, adaptive_kl=True, target_kl=6.0,
                                           kl_horizon=100)
    optimizer, schedule = steps.make_optimizer(train_config, ppo_config)
    constant_reward = 1.75
    reward = {**copy(value), "head": {"kernel": jnp.zeros_like(value["head"]["kernel"]),
                                       "bias": jnp.full_like(value["head"]["bias"], constant_reward)}}
    state = ppo.init_ppo_state(policy, value, reward, optimizer, seed=3, kl_coef=0.2)
    step = jax.jit(functools.partial(ppo.ppo_step, graphdef=graphdef, value_graphdef=value_graphdef,
                                     optimizer=optimizer, schedule=schedule, ppo_config=ppo_config, eos_ids=(3,),
                                     pad_id=0), donate_argnums=0)
    state, metrics = step(state, prompts())
    metrics = jax.device_get(metrics)
    assert metrics["objective/scores"] == constant_reward
    # Ratios of one up to rounding: the rollout's log-probs and the update's are the same function,
    # computed once forward only and once under the gradient, which XLA may round differently.
    assert abs(metrics["policy/approxkl_avg"]) < 1e-6 and metrics["policy/clipfrac_avg"] == 0.0
    # The mean of whole token counts over the batch, each between 1 (an immediate EOS) and max_new_tokens.
    total_tokens = metrics["response_length"] * NUM_PROMPTS
    assert total_tokens == pytest.approx(round(total_tokens), abs=1e-3)
    assert NUM_PROMPTS <= round(total_tokens) <= NUM_PROMPTS * ppo_config.max_new_tokens
    # KL 0 is below the target: the coefficient falls by the clipped error, 20% of n / horizon.
    np.testing.assert_allclose(state.stage_state["kl_coef"], 0.2 * (1 - 0.2 * NUM_PROMPTS / 100), rtol=1e-6)
    assert metrics["kl_coef"] == np.float32(0.2)


def test_init_state_copies_the_frozen_trees():
    _, policy, _, value = tiny_models()
    train_config, ppo_config = _ppo_config()
    optimizer, _ = steps.make_optimizer(train_config, ppo_config)
    # The value model starts from the policy's decoder and is also the reward model: all shared buffers.
    state = ppo.init_ppo_state(policy, value, value, optimizer, seed=0, kl_coef=0.05)
    pointers = [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves((state.params, state.ref_params))]
    assert len(set(pointers)) == len(pointers)
    assert float(state.stage_state["kl_coef"]) == np.float32(0.05)
    assert ppo.init_ppo_state(policy, value, None, optimizer, seed=0, kl_coef=0.05).ref_params["reward"] is None


def test_optimizer_schedule_counts_the_updates_of_every_iteration():
    _, ppo_config = _ppo_config(num_steps=10, warmup_steps=2, num_epochs=3, num_minibatches=4)
    schedule_config = rollout.updates_schedule_config(ppo_config)
    assert (schedule_config.num_steps, schedule_config.warmup_steps) == (120, 24)
    assert (ppo_config.num_steps, ppo_config.warmup_steps) == (10, 2)
