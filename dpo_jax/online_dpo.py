"""Online and iterative DPO as one pure, jittable step: `online_dpo_step(state, batch) -> (state, metrics)`.

Online DPO (Guo et al. 2024, arXiv:2402.04792; TRL's OnlineDPOTrainer): each iteration samples
`num_generations` responses to every prompt of the batch from the current policy, labels its best
and worst by their scores (a frozen reward model, a host scorer, or a judge's preference between
two), and takes DPO updates on those fresh pairs against the frozen reference. Unlike offline DPO
the pairs follow the policy, which is what closes much of the gap to PPO (Xu et al. 2024,
arXiv:2404.10719).

Iterative DPO (`round_steps` > 0; Xu et al. 2023, arXiv:2312.16682; Yuan et al. 2024,
arXiv:2401.10020): the pairs are sampled from a snapshot of the policy taken at the start of each
round of `round_steps` iterations, so that each round is offline DPO on pairs of the latest
policy; with `round_reference` the round's DPO reference is that snapshot too.

State (a `steps.TrainState`): params = {"policy"}; ref_params = {"reference": the frozen starting
policy, which the KL metrics are to; "reward" (None with a host scorer); and, iterative, "sampler":
the round's snapshot}.
A group whose scores all tie yields a pair of one response with itself, whose loss has no gradient.
"""

import functools

import jax
import jax.numpy as jnp

from dpo_jax import losses, rollout

LOSS_TYPES = ("sigmoid", "ipo")


def best_and_worst(scores, num_generations):
    """Row indices [b] of each group's highest and lowest score among its `num_generations`
    consecutive rows (the first of equal ones: a tied group gives the same row twice)."""
    grouped = scores.reshape(-1, num_generations)
    first = jnp.arange(grouped.shape[0]) * num_generations
    return first + jnp.argmax(grouped, axis=1), first + jnp.argmin(grouped, axis=1)


def beta_at(step, betas, num_steps):
    """Index into `betas` for iteration `step`: the iterations split into len(betas) equal spans
    (TRL's list of betas, one per epoch), the last one kept after them."""
    return jnp.minimum(step * len(betas) // max(num_steps, 1), len(betas) - 1).astype(jnp.int32)


def _betas(config):
    return tuple(float(beta) for beta in config.beta_schedule) or (float(config.beta),)


def _sampler(config):
    """The ref_params tree that samples the pairs: None (the policy), or the round's snapshot."""
    return "sampler" if config.round_steps else None


def _pair_loss(params, ref_params, pairs, rng, *, graphdef, online_config):
    """The DPO loss of a minibatch of pairs, in `steps.train_step`'s convention (mean over pairs)."""
    del ref_params, rng
    rows = {key: jnp.concatenate([pairs[f"chosen_{key}"], pairs[f"rejected_{key}"]])
            for key in ("input_ids", "positions", "segment_ids", "response_mask")}
    sums = jnp.sum(rollout.token_logps(graphdef, params["policy"], rows) * rows["response_mask"], axis=1)
    lengths = jnp.sum(rows["response_mask"], axis=1)
    policy_chosen, policy_rejected = jnp.split(sums, 2)
    chosen_lengths, rejected_lengths = jnp.split(lengths, 2)

    def with_beta(beta):
        per_pair, metrics = losses.preference_loss(
            policy_chosen, policy_rejected, pairs["reference_chosen_logps"], pairs["reference_rejected_logps"],
            loss_type=online_config.loss_type, beta=beta, chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths)
        return jnp.mean(per_pair), metrics

    branches = [functools.partial(with_beta, beta) for beta in _betas(online_config)]
    loss, metrics = jax.lax.switch(pairs["beta_index"][0], branches)
    # A pair labelled by a failed (non-finite) score is no label: the update is skipped as non-finite.
    loss = jnp.where(jnp.all(jnp.isfinite(pairs["scores_margin"])), loss, jnp.nan)
    return loss, (metrics, jnp.asarray(policy_chosen.shape[0], jnp.float32))


def _refresh_round_snapshot(state, online_config):
    """At the first iteration of each round, the round's snapshot becomes the policy."""
    name = _sampler(online_config)
    if name is None:
        return state.ref_params
    snapshot = state.ref_params[name]
    refreshed = jax.lax.cond(
        (state.step > 0) & (state.step % online_config.round_steps == 0),
        lambda: jax.tree.map(lambda p, s: p.astype(s.dtype), state.params["policy"], snapshot), lambda: snapshot)
    return {**state.ref_params, name: refreshed}


def online_dpo_step(state, batch, *, graphdef, value_graphdef, optimizer, schedule, online_config, eos_ids, pad_id,
                    host_reward_fn=None, micro_batches=1, trainable=None):
    """One online DPO iteration on a batch of prompts: (state, metrics); pure and deterministic given
    state.rng. Arguments as `grpo.grpo_step`; each prompt gives one pair, so `num_minibatches`
    divides the batch's prompts. host_reward_fn: scores of the rollout's rows (a judge's scores
    are its preference of each pair's first response and its complement)."""
    rng, sample_key, update_key = jax.random.split(state.rng, 3)
    state = state.replace(ref_params=_refresh_round_snapshot(state, online_config))
    num_generations = online_config.num_generations
    # Log-probs of the model itself (temperature 1): the implicit rewards DPO compares are of those.
    experience = rollout.rollout(state.params, state.ref_params, batch, sample_key, graphdef=graphdef,
                                 value_graphdef=value_graphdef, block=online_config, eos_ids=eos_ids, pad_id=pad_id,
                                 host_reward_fn=host_reward_fn, num_samples=num_generations, logps_temperature=1.0,
                                 sampler=_sampler(online_config) or "policy")
    chosen, rejected = best_and_worst(experience["scores"], num_generations)
    mask = experience["response_mask"]
    reference_logps = experience["ref_logps"]
    if online_config.round_steps and online_config.round_reference:
        reference_logps = rollout.token_logps(graphdef, state.ref_params["sampler"], experience)
    reference_sums = jnp.sum(reference_logps * mask, axis=1)
    pairs = {f"{side}_{key}": experience[key][rows] for side, rows in (("chosen", chosen), ("rejected", rejected))
             for key in ("input_ids", "positions", "segment_ids", "response_mask")}
    num_steps = online_config.num_steps
    beta_index = beta_at(state.step, _betas(online_config), num_steps)
    scores_margin = experience["scores"][chosen] - experience["scores"][rejected]
    pairs.update(reference_chosen_logps=reference_sums[chosen], reference_rejected_logps=reference_sums[rejected],
                 scores_margin=scores_margin, beta_index=jnp.full(chosen.shape, beta_index))
    loss_fn = functools.partial(_pair_loss, graphdef=graphdef, online_config=online_config)
    params, opt_state, update_metrics = rollout.minibatch_updates(
        state, pairs, update_key, loss_fn=loss_fn, optimizer=optimizer, schedule=schedule,
        num_epochs=online_config.num_epochs, num_minibatches=online_config.num_minibatches,
        micro_batches=micro_batches, trainable=trainable)
    beta = jnp.asarray(_betas(online_config), jnp.float32)[beta_index]
    metrics = {**rollout.rollout_metrics(experience, beta), **rollout.summarise_updates(update_metrics),
               "objective/scores_margin": jnp.mean(scores_margin),
               "beta": beta}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics


def extra_references(online_config):
    """The policy copies besides the reference that the state holds: iterative DPO's snapshot."""
    return (_sampler(online_config),) if online_config.round_steps else ()
