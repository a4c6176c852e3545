"""GRPO as one pure, jittable step: `grpo_step(state, batch) -> (state, metrics)`.

Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300), with the
loss normalisations of Dr. GRPO (Liu et al. 2025, arXiv:2503.20783) and DAPO (Yu et al. 2025,
arXiv:2503.14476) under TRL's GRPOTrainer names, and RLOO's leave-one-out baseline (Ahmadian et
al. 2024, arXiv:2402.14740). One step is one iteration: sample `num_generations` responses to every
prompt of the batch from the policy; score each (a frozen reward model or a host scorer; no value
network); an advantage per response from its group's scores; then `num_epochs` x
`num_minibatches` updates of the clipped ratio objective, with a k3 KL penalty to the frozen
reference when `beta` > 0.

State (a `steps.TrainState`): params = {"policy": decoder params}; ref_params = {"reference": the
frozen starting policy, "reward": a frozen scalar model, or None with a host scorer}. The rollout
and the update epochs are `dpo_jax.rollout`'s, shared with PPO and online DPO.
"""

import functools

import jax
import jax.numpy as jnp

from dpo_jax import losses, rollout

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
BASELINES = ("mean", "leave_one_out")
# Added to the standard deviation before dividing by it, as TRL's GRPOTrainer.
_STD_EPSILON = 1e-4


def group_advantages(scores, num_generations, *, scale_rewards="group", baseline="mean"):
    """Per-response advantages [b * G] float32 from their scores [b * G], G = num_generations
    consecutive responses per prompt.

    baseline "mean": the group's mean score (GRPO); "leave_one_out": the mean of the group's other
    G - 1 scores (RLOO), which leaves the advantage an unbiased estimate.
    scale_rewards (TRL's): "group" divides by the group's standard deviation (GRPO), "batch" by the
    whole batch's, "none" does not divide (Dr. GRPO: the division biases towards easy and hard
    prompts). Standard deviations are unbiased (Bessel), and 1e-4 is added to them.
    """
    if num_generations < 2:
        raise ValueError(f"num_generations must be >= 2 to compare responses within a group, got {num_generations}")
    if scale_rewards not in SCALE_REWARDS or baseline not in BASELINES:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS} and baseline one of {BASELINES}, got "
                         f"{scale_rewards!r} and {baseline!r}")
    grouped = scores.astype(jnp.float32).reshape(-1, num_generations)
    if baseline == "mean":
        centred = grouped - jnp.mean(grouped, axis=1, keepdims=True)
    else:
        others = (jnp.sum(grouped, axis=1, keepdims=True) - grouped) / (num_generations - 1)
        centred = grouped - others
    if scale_rewards == "group":
        centred = centred / (jnp.std(grouped, axis=1, keepdims=True, ddof=1) + _STD_EPSILON)
    elif scale_rewards == "batch":
        centred = centred / (jnp.std(grouped, ddof=1) + _STD_EPSILON)
    return centred.reshape(-1)


def k3_kl(logps, ref_logps):
    """Per-token KL(pi || pi_ref) estimates exp(r) - r - 1 with r = log pi_ref - log pi (Schulman's
    k3: unbiased and non-negative), as GRPO's penalty."""
    log_ratio = ref_logps.astype(jnp.float32) - logps.astype(jnp.float32)
    return jnp.exp(log_ratio) - log_ratio - 1.0


def clipped_objective(new_logps, old_logps, advantages, mask, *, epsilon_low, epsilon_high):
    """The per-token clipped surrogate loss [b, t] = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A),
    rho = exp(new - old), A [b] broadcast over the response, and TRL's clip ratios: the share of
    response tokens clipped below (rho < 1 - eps_low with A < 0), above (rho > 1 + eps_high with
    A > 0), and either (`region`)."""
    mask = mask.astype(jnp.float32)
    ratio = jnp.exp(new_logps.astype(jnp.float32) - old_logps.astype(jnp.float32))
    advantages = advantages[:, None]
    per_token = -jnp.minimum(ratio * advantages, jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high) * advantages)
    low = ((ratio < 1.0 - epsilon_low) & (advantages < 0)).astype(jnp.float32)
    high = ((ratio > 1.0 + epsilon_high) & (advantages > 0)).astype(jnp.float32)
    clip_ratios = {"clip_ratio/low_mean": losses.masked_mean(low, mask),
                   "clip_ratio/high_mean": losses.masked_mean(high, mask),
                   "clip_ratio/region_mean": losses.masked_mean(jnp.maximum(low, high), mask)}
    return per_token, jax.lax.stop_gradient(clip_ratios)


def normalise(per_token, mask, loss_type, max_new_tokens):
    """A batch's loss from per-token losses, in `steps.train_step`'s convention: (loss, weight), the
    loss a mean over `weight` units, so that micro-batches combine to the whole minibatch's.

    grpo: each response's token mean, averaged over responses (weight: responses);
    dr_grpo: the token sum over responses x max_new_tokens, a constant, so that no response's
      tokens count more for being short (weight: responses);
    dapo: the token mean over every response token of the minibatch (weight: tokens).
    """
    mask = mask.astype(jnp.float32)
    token_sums, token_counts = jnp.sum(per_token * mask, axis=1), jnp.sum(mask, axis=1)
    num_responses = jnp.asarray(per_token.shape[0], jnp.float32)
    if loss_type == "grpo":
        return jnp.mean(token_sums / jnp.maximum(token_counts, 1.0)), num_responses
    if loss_type == "dr_grpo":
        return jnp.sum(token_sums) / (num_responses * max_new_tokens), num_responses
    if loss_type == "dapo":
        total = jnp.sum(token_counts)
        return jnp.sum(token_sums) / jnp.maximum(total, 1.0), total
    raise ValueError(f"grpo.loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def _minibatch_loss(params, ref_params, minibatch, rng, *, graphdef, grpo_config):
    del ref_params, rng
    mask = minibatch["response_mask"]
    new_logps = rollout.token_logps(graphdef, params["policy"], minibatch, grpo_config.temperature)
    per_token, metrics = clipped_objective(new_logps, minibatch["logps"], minibatch["advantages"], mask,
                                           epsilon_low=grpo_config.epsilon,
                                           epsilon_high=grpo_config.epsilon_high or grpo_config.epsilon)
    token_kl = k3_kl(new_logps, minibatch["ref_logps"])
    if grpo_config.beta:
        per_token = per_token + grpo_config.beta * token_kl
    metrics["kl"] = jax.lax.stop_gradient(losses.masked_mean(token_kl, mask))  # TRL's: per response token
    loss, weight = normalise(per_token, mask, grpo_config.loss_type, grpo_config.max_new_tokens)
    return loss, (metrics, weight)


def grpo_step(state, batch, *, graphdef, value_graphdef, optimizer, schedule, grpo_config, eos_ids, pad_id,
              host_reward_fn=None, micro_batches=1, trainable=None):
    """One GRPO iteration on a batch of prompts: (state, metrics); pure and deterministic given state.rng.

    batch: `prompt_ids` [B, P] int32 right-padded, `prompt_lengths` [B] (>= 1); the rollout has
    B * num_generations rows, which `num_minibatches` must divide.
    value_graphdef: the reward model's graph (a scalar model), when ref_params["reward"] is one.
    optimizer, schedule: over params {"policy"}, the schedule counting updates
      (`rollout.updates_schedule_config`). Other arguments as `ppo.ppo_step`.
    """
    rng, sample_key, update_key = jax.random.split(state.rng, 3)
    num_generations = grpo_config.num_generations
    experience = rollout.rollout(state.params, state.ref_params, batch, sample_key, graphdef=graphdef,
                                 value_graphdef=value_graphdef, block=grpo_config, eos_ids=eos_ids, pad_id=pad_id,
                                 host_reward_fn=host_reward_fn, num_samples=num_generations)
    experience["advantages"] = group_advantages(experience["scores"], num_generations,
                                                scale_rewards=grpo_config.scale_rewards,
                                                baseline=grpo_config.baseline)
    loss_fn = functools.partial(_minibatch_loss, graphdef=graphdef, grpo_config=grpo_config)
    update_inputs = {key: experience[key] for key in ("input_ids", "positions", "segment_ids", "response_mask",
                                                      "logps", "ref_logps", "advantages")}
    params, opt_state, update_metrics = rollout.minibatch_updates(
        state, update_inputs, update_key, loss_fn=loss_fn, optimizer=optimizer, schedule=schedule,
        num_epochs=grpo_config.num_epochs, num_minibatches=grpo_config.num_minibatches,
        micro_batches=micro_batches, trainable=trainable)
    grouped_scores = experience["scores"].reshape(-1, num_generations)
    metrics = {
        **rollout.rollout_metrics(experience, grpo_config.beta), **rollout.summarise_updates(update_metrics),
        # TRL's GRPOTrainer names.
        "reward": jnp.mean(experience["scores"]),
        "reward_std": jnp.mean(jnp.std(grouped_scores, axis=1, ddof=1)),
        "frac_reward_zero_std": jnp.mean((jnp.std(grouped_scores, axis=1) == 0).astype(jnp.float32)),
        "completions/mean_length": jnp.mean(experience["response_lengths"].astype(jnp.float32)),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics
