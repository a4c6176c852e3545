"""RLHF with PPO as one pure, jittable step: `ppo_step(state, batch) -> (state, metrics)`.

One step is one PPO iteration (Schulman et al. 2017, arXiv:1707.06347, as applied to language
models by Ziegler et al. 2019, arXiv:1909.08593, and TRL's PPOTrainer): sample a response to every
prompt of the batch from the policy; score it (a frozen reward model, or a host function such as
a ground-truth sentiment classifier: the DPO paper's PPO-GT); turn the score and a per-token KL
penalty to the frozen reference into per-token rewards; estimate advantages with GAE against the
value model; then `num_epochs` x `num_minibatches` clipped updates of policy and value model with
one optimizer. Everything is a function of `state.rng`, so the step fits the loop of SFT and DPO:
jitted with the state donated, checkpointed whole, resumed exactly.

State (a `steps.TrainState`): params = {"policy": decoder params, "value": scalar-model params};
ref_params = {"reference": frozen decoder params (the starting policy), "reward": frozen
scalar-model params, or None with a host scorer}; stage_state = {"kl_coef": float32 scalar}.

The rollout (sampling, scoring, the rows' layout) and the epochs of minibatch updates are
`dpo_jax.rollout`'s, shared with online DPO and GRPO.
"""

import functools

import jax
import jax.numpy as jnp

from dpo_jax import losses, models, rollout, steps

# Variance floor of `whiten`, as TRL's masked_whiten.
_WHITEN_EPSILON = 1e-8
# Ziegler et al.'s adaptive KL controller changes the coefficient by at most this fraction per horizon.
_KL_ERROR_CLIP = 0.2


# ---------------------------------------------------------------------------------------------
# PPO math: pure functions of [batch, time] arrays, means over the masked (response) tokens
# ---------------------------------------------------------------------------------------------

def whiten(values, mask, shift_mean=True):
    """(values - mean) / sqrt(var + 1e-8) over the masked tokens, 0 elsewhere; float32.

    mean and the unbiased variance (Bessel's correction) are taken over all masked entries of the
    batch, as TRL's `masked_whiten`; `shift_mean=False` adds the mean back (rescaling only, as TRL
    whitens rewards, so that their sign survives).
    """
    values, mask = values.astype(jnp.float32), mask.astype(jnp.float32)
    count = jnp.sum(mask)
    mean = losses.masked_mean(values, mask)
    variance = losses.masked_mean(jnp.square(values - mean), mask) * count / jnp.maximum(count - 1.0, 1.0)
    whitened = (values - mean) * jax.lax.rsqrt(variance + _WHITEN_EPSILON)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimates and returns over the response tokens: ([b, t], [b, t]) float32.

    GAE (Schulman et al. 2016, arXiv:1506.02438, eq. 16):
        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},
    computed by a reverse scan over time; returns R_t = A_t + V_t are the value model's targets.
    `mask` marks the response tokens, one contiguous run per row; outside it rewards and values count
    as 0, so the value after a response's last token (the bootstrap) is 0: the episode ends there,
    as in TRL's PPOTrainer. Advantages and returns are 0 outside the mask.
    """
    mask = mask.astype(jnp.float32)
    rewards = rewards.astype(jnp.float32) * mask
    values = values.astype(jnp.float32) * mask
    next_values = jnp.pad(values[:, 1:], ((0, 0), (0, 1)))
    deltas = rewards + gamma * next_values - values

    def backward(next_advantage, delta):
        advantage = delta + gamma * lam * next_advantage
        return advantage, advantage

    _, advantages = jax.lax.scan(backward, jnp.zeros(deltas.shape[0], jnp.float32), deltas.T, reverse=True)
    advantages = advantages.T * mask
    return advantages, (advantages + values) * mask


def kl_penalised_rewards(scores, logps, ref_logps, mask, kl_coef):
    """Per-token rewards [b, t] float32: -kl_coef * (log pi - log pi_ref) at every response token,
    plus the sequence's score at its last response token (Ziegler et al. 2019, eq. 2:
    R(x, y) = r(x, y) - beta * log(pi(y|x) / pi_ref(y|x)), the KL spread over the tokens as TRL does).
    scores: [b]; logps, ref_logps: the sampled tokens' log-probs [b, t]; mask: the response tokens."""
    mask = mask.astype(jnp.float32)
    kl_penalty = -kl_coef * (logps.astype(jnp.float32) - ref_logps.astype(jnp.float32)) * mask
    time_index = jnp.arange(mask.shape[1])
    last = jnp.max(jnp.where(mask > 0, time_index, -1), axis=1, keepdims=True)
    return kl_penalty + jnp.where(time_index == last, scores.astype(jnp.float32)[:, None], 0.0)


def policy_loss(new_logps, old_logps, advantages, mask, clip_range):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss: (loss, clipfrac, approxkl).

    loss = mean_t max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps)), rho_t = exp(new - old);
    clipfrac: the share of tokens where the clipped term is the larger one (TRL's definition);
    approxkl = mean_t 0.5 * (new - old)^2, an estimate of KL(old || new). Means over masked tokens.
    """
    mask = mask.astype(jnp.float32)
    log_ratio = new_logps.astype(jnp.float32) - old_logps.astype(jnp.float32)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = losses.masked_mean(jnp.maximum(unclipped, clipped), mask)
    clipfrac = losses.masked_mean((clipped > unclipped).astype(jnp.float32), mask)
    approxkl = losses.masked_mean(0.5 * jnp.square(log_ratio), mask)
    return loss, jax.lax.stop_gradient(clipfrac), jax.lax.stop_gradient(approxkl)


def value_loss(new_values, old_values, returns, mask, clip_range_value):
    """Clipped value loss, TRL style: (loss, clipfrac).

    loss = 0.5 * mean_t max((V_t - R_t)^2, (clip(V_t, V_old - c, V_old + c) - R_t)^2): a prediction
    may move at most c from the rollout's value before its error stops counting (the PPO2 value
    clipping of OpenAI baselines); clipfrac: the share of tokens where the clipped error is larger.
    """
    mask = mask.astype(jnp.float32)
    new_values, old_values = new_values.astype(jnp.float32), old_values.astype(jnp.float32)
    clipped_values = jnp.clip(new_values, old_values - clip_range_value, old_values + clip_range_value)
    unclipped_error = jnp.square(new_values - returns)
    clipped_error = jnp.square(clipped_values - returns)
    loss = 0.5 * losses.masked_mean(jnp.maximum(unclipped_error, clipped_error), mask)
    clipfrac = losses.masked_mean((clipped_error > unclipped_error).astype(jnp.float32), mask)
    return loss, jax.lax.stop_gradient(clipfrac)


def update_kl_coef(kl_coef, observed_kl, num_sequences, target, horizon):
    """Ziegler et al. 2019's adaptive KL controller (sec. 2.2), as TRL's AdaptiveKLController:
    error = clip(KL / target - 1, -0.2, 0.2); kl_coef <- kl_coef * (1 + error * n / horizon),
    with n the sequences of the rollout. A non-finite KL leaves the coefficient unchanged."""
    error = jnp.clip(observed_kl / target - 1.0, -_KL_ERROR_CLIP, _KL_ERROR_CLIP)
    updated = kl_coef * (1.0 + error * num_sequences / horizon)
    return jnp.where(jnp.isfinite(updated), updated, kl_coef).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Rollouts (sampling and scoring: dpo_jax.rollout)
# ---------------------------------------------------------------------------------------------

def _values(value_graphdef, params, rows):
    """V(tokens <= t) [b, T - 1]: the value of the state from which token t + 1 is sampled."""
    values = models.apply_scalar(value_graphdef, params, rows["input_ids"], rows["positions"], rows["segment_ids"])
    return values[:, :-1]


# ---------------------------------------------------------------------------------------------
# The PPO iteration
# ---------------------------------------------------------------------------------------------

def _minibatch_loss(params, ref_params, minibatch, rng, *, graphdef, value_graphdef, ppo_config):
    """policy_loss + value_coef * value_loss of a minibatch of experience, in `steps.train_step`'s
    loss convention: (loss, (metrics, weight)), means over the `weight` response tokens."""
    del ref_params, rng
    mask = minibatch["response_mask"]
    new_logps = rollout.token_logps(graphdef, params["policy"], minibatch, ppo_config.temperature)
    new_values = _values(value_graphdef, params["value"], minibatch)
    pg_loss, pg_clipfrac, approxkl = policy_loss(new_logps, minibatch["logps"], minibatch["advantages"], mask,
                                                 ppo_config.clip_range)
    vf_loss, vf_clipfrac = value_loss(new_values, minibatch["values"], minibatch["returns"], mask,
                                      ppo_config.clip_range_value)
    metrics = {"policy/approxkl_avg": approxkl, "policy/clipfrac_avg": pg_clipfrac, "loss/policy_avg": pg_loss,
               "loss/value_avg": vf_loss, "val/clipfrac_avg": vf_clipfrac}
    return pg_loss + ppo_config.value_coef * vf_loss, (metrics, jnp.sum(mask))


def ppo_step(state, batch, *, graphdef, value_graphdef, optimizer, schedule, ppo_config, eos_ids, pad_id,
             host_reward_fn=None, micro_batches=1, trainable=None):
    """One PPO iteration on a batch of prompts: (state, metrics); pure and deterministic given state.rng.

    batch: `prompt_ids` [B, P] int32 right-padded, `prompt_lengths` [B] (>= 1).
    graphdef / value_graphdef: the decoder's and the scalar model's graphs (the reward model, when
      given, is a scalar model of the value model's architecture).
    optimizer, schedule: one optax transformation over params {"policy", "value"}; the schedule
      counts optimizer updates, num_epochs * num_minibatches per iteration (build both with
      `steps.make_optimizer(train_config, rollout.updates_schedule_config(ppo_config))`).
    ppo_config: `config.ppo`. eos_ids: ids that end a response; pad_id: fills it after the end.
    host_reward_fn: (prompt_ids, prompt_lengths, response_tokens, response_lengths) numpy -> [B]
      scores, used when ref_params has no "reward" model; it must be deterministic.
    micro_batches, trainable: as `steps.train_step` (gradient accumulation; LoRA's trainable mask
      shaped like {"policy", "value"}).
    """
    rng, sample_key, update_key = jax.random.split(state.rng, 3)
    kl_coef = state.stage_state["kl_coef"]

    # ------------------------------------------------------------------ rollout and advantages
    experience = rollout.rollout(state.params, state.ref_params, batch, sample_key, graphdef=graphdef,
                                 value_graphdef=value_graphdef, block=ppo_config, eos_ids=eos_ids, pad_id=pad_id,
                                 host_reward_fn=host_reward_fn)
    mask = experience["response_mask"]
    experience["values"] = _values(value_graphdef, jax.lax.stop_gradient(state.params["value"]), experience)
    rewards = kl_penalised_rewards(experience["scores"], experience["logps"], experience["ref_logps"], mask, kl_coef)
    if ppo_config.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)
    advantages, experience["returns"] = gae(rewards, experience["values"], mask, ppo_config.gamma, ppo_config.lam)
    experience["advantages"] = whiten(advantages, mask)

    # ------------------------------------------------------------------ epochs of minibatch updates
    loss_fn = functools.partial(_minibatch_loss, graphdef=graphdef, value_graphdef=value_graphdef,
                                ppo_config=ppo_config)
    params, opt_state, update_metrics = rollout.minibatch_updates(
        state, experience, update_key, loss_fn=loss_fn, optimizer=optimizer, schedule=schedule,
        num_epochs=ppo_config.num_epochs, num_minibatches=ppo_config.num_minibatches, micro_batches=micro_batches,
        trainable=trainable)

    # ------------------------------------------------------------------ KL controller and metrics
    # The KL part of the per-token rewards, summed per sequence (before any whitening).
    metrics = {**rollout.rollout_metrics(experience, kl_coef), **rollout.summarise_updates(update_metrics),
               "kl_coef": kl_coef}
    new_kl_coef = kl_coef
    if ppo_config.adaptive_kl:
        new_kl_coef = update_kl_coef(kl_coef, metrics["objective/kl"], batch["prompt_ids"].shape[0],
                                     ppo_config.target_kl, ppo_config.kl_horizon)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng,
                         stage_state={**state.stage_state, "kl_coef": new_kl_coef}), metrics


def init_ppo_state(policy_params, value_params, reward_params, optimizer, *, seed, kl_coef):
    """Step 0 of PPO: params {"policy", "value"} with `optimizer`'s state; ref_params {"reference": a
    frozen copy of the policy, "reward": `reward_params`, None with a host scorer}.

    Every tree but the policy is copied: the state is donated each step, and a buffer shared by two
    of its leaves (the reference and the policy; a value model started from the reward model or the
    policy) cannot be donated twice.
    """
    params = {"policy": policy_params, "value": rollout.copy_tree(value_params)}
    ref_params = {"reference": rollout.copy_tree(policy_params), "reward": rollout.copy_tree(reward_params)}
    return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                            rng=jax.random.PRNGKey(seed), ref_params=ref_params,
                            stage_state={"kl_coef": jnp.asarray(kl_coef, jnp.float32)})
