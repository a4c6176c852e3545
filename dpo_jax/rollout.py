"""Sampling and scoring inside a jitted train step, shared by the online stages: PPO, online DPO, GRPO.

A rollout samples `num_samples` responses to every prompt of a batch from the policy with the
KV-cached sampler, lays prompt and response out as model rows, and scores each response with a
frozen reward model or a host function (a scorer: the ground-truth reward of the paper's PPO-GT).
Everything is a function of the key it is given, so a step that rolls out stays deterministic,
checkpointable and exactly resumable.

Layout: a rollout row is the prompt, left-aligned, then the response, [rows, prompt width +
max_new_tokens]; with several samples per prompt, the samples of prompt i are rows i * n ... i * n +
n - 1. Per-token quantities live in the frame of the shifted logits [rows, row - 1], where index t
is the prediction of token t + 1 (the action) from tokens <= t (the state), and `response_mask`
marks the response tokens' predictions.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import losses, models, steps
from dpo_jax.models import sampling
from dpo_jax.models.scalar import last_token_scores


def rollout_rows(prompt_ids, prompt_lengths, response_tokens, response_lengths):
    """Model rows [b, P + N] of right-padded prompts [b, P] followed by sampled responses [b, N].

    The prompt is left-aligned (as the sampler does), so every response starts at column P and the
    rows hold prompt and response contiguously. Returns `input_ids`, `positions` (running count of
    real tokens - 1), `segment_ids` (1 real token, 0 padding: the models' convention) [b, P + N], and
    `response_mask` [b, P + N - 1] float32 aligned with the shifted logits: 1 at t when token t + 1
    is a response token (the EOS included).
    """
    batch, prompt_width = prompt_ids.shape
    num_new = response_tokens.shape[1]
    shift = prompt_width - prompt_lengths
    left_aligned = jax.vmap(jnp.roll)(prompt_ids, shift)
    prompt_real = jnp.arange(prompt_width)[None, :] >= shift[:, None]
    response_real = jnp.arange(num_new)[None, :] < response_lengths[:, None]
    segment_ids = jnp.concatenate([prompt_real, response_real], axis=1).astype(jnp.int32)
    return {
        "input_ids": jnp.concatenate([left_aligned, response_tokens], axis=1).astype(jnp.int32),
        "positions": jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0).astype(jnp.int32),
        "segment_ids": segment_ids,
        "response_mask": jnp.concatenate([jnp.zeros((batch, prompt_width - 1), bool), response_real],
                                         axis=1).astype(jnp.float32),
    }


def token_logps(graphdef, params, rows, temperature=1.0):
    """log pi(token t + 1 | tokens <= t) [b, T - 1] of logits / temperature (as TRL: with the sampling
    temperature, the ratios and the KL are those of the policy the rollout came from)."""
    logits = models.apply(graphdef, params, rows["input_ids"], rows["positions"], rows["segment_ids"])
    return losses.token_logps(logits[:, :-1].astype(jnp.float32) / temperature, rows["input_ids"][:, 1:])


def host_scores(host_reward_fn, prompt_ids, prompt_lengths, response_tokens, response_lengths):
    """`host_reward_fn` on the host (numpy in, [b] float32 out), called from inside the jitted step."""
    def call(*arrays):
        scores = host_reward_fn(*(np.asarray(array) for array in arrays))
        return np.asarray(scores, np.float32).reshape(prompt_ids.shape[0])

    # "sequential": under an outer vmap, each call still sees one whole batch, as documented.
    return jax.pure_callback(call, jax.ShapeDtypeStruct((prompt_ids.shape[0],), jnp.float32), prompt_ids,
                             prompt_lengths, response_tokens, response_lengths, vmap_method="sequential")


def reward_model_scores(value_graphdef, reward_params, rows):
    """A scalar model's score of each row at its last real token [b]."""
    row_scores = models.apply_scalar(value_graphdef, reward_params, rows["input_ids"], rows["positions"],
                                     rows["segment_ids"])
    return last_token_scores(row_scores, jnp.where(rows["segment_ids"] > 0, 0, -1), 1)[:, 0]


def rollout(params, ref_params, batch, sample_key, *, graphdef, value_graphdef, block, eos_ids, pad_id,
            host_reward_fn, num_samples=1, logps_temperature=None, sampler="policy"):
    """Samples `num_samples` responses per prompt and scores them, all without gradients: a dict of
    [b * num_samples, ...] arrays (the rows, `logps`, `ref_logps`, `scores`, `response_lengths`,
    `prompt_ids`, `prompt_lengths`).

    params["policy"] is the policy; ref_params["reference"] the frozen reference, ref_params["reward"]
    a reward model (a scalar model of `value_graphdef`) or None, then `host_reward_fn` scores.
    block: the stage's config block (`temperature`, `max_new_tokens`). logps_temperature: the
    temperature of `logps` and `ref_logps` (default the sampling one). sampler: which tree samples,
    "policy" or a key of ref_params (iterative DPO's round snapshot).
    """
    if block.temperature <= 0:
        raise ValueError(f"temperature must be > 0 (an online stage needs a stochastic policy), got "
                         f"{block.temperature}")
    params, ref_params = jax.lax.stop_gradient((params, ref_params))
    repeat = lambda x: jnp.repeat(x, num_samples, axis=0)
    prompt_ids, prompt_lengths = repeat(batch["prompt_ids"]), repeat(batch["prompt_lengths"])
    sampling_params = params["policy"] if sampler == "policy" else ref_params[sampler]
    generation = sampling.generate_traced(
        graphdef, sampling_params, prompt_ids, prompt_lengths, jax.random.split(sample_key, prompt_ids.shape[0]),
        max_new_tokens=block.max_new_tokens, temperature=float(block.temperature), top_k=0, top_p=1.0,
        eos_ids=tuple(int(i) for i in eos_ids), pad_id=int(pad_id), use_lora=True)
    rows = rollout_rows(prompt_ids, prompt_lengths, generation.tokens, generation.lengths)
    if ref_params.get("reward") is not None:
        scores = reward_model_scores(value_graphdef, ref_params["reward"], rows)
    elif host_reward_fn is not None:
        scores = host_scores(host_reward_fn, prompt_ids, prompt_lengths, generation.tokens, generation.lengths)
    else:
        raise ValueError('A rollout needs a reward: ref_params["reward"] (a reward model) or host_reward_fn')
    temperature = block.temperature if logps_temperature is None else logps_temperature
    # The policy's own forward pass, not the sampler's log-probs: an update's first ratios are then 1
    # up to rounding (the KV-cached decode may differ from a full forward pass in the last bits).
    return {**rows, "scores": scores, "response_lengths": generation.lengths, "prompt_ids": prompt_ids,
            "prompt_lengths": prompt_lengths, "response_tokens": generation.tokens,
            "logps": token_logps(graphdef, params["policy"], rows, temperature),
            "ref_logps": token_logps(graphdef, ref_params["reference"], rows, temperature)}


def rollout_metrics(experience, kl_coef=None):
    """TRL's `objective/*` metrics of a rollout (sequence sums, averaged over sequences); with
    `kl_coef`, also `objective/non_score_reward` = -kl_coef * KL and `objective/rlhf_reward` = score
    plus that, the KL-regularised reward the online stages maximise."""
    mask = experience["response_mask"]
    metrics = {
        "objective/kl": jnp.mean(jnp.sum((experience["logps"] - experience["ref_logps"]) * mask, axis=1)),
        # -log pi of the samples: a one-sample estimate of each response's entropy, as TRL logs it.
        "objective/entropy": jnp.mean(-jnp.sum(experience["logps"] * mask, axis=1)),
        "objective/scores": jnp.mean(experience["scores"]),
        "response_length": jnp.mean(experience["response_lengths"].astype(jnp.float32)),
    }
    if kl_coef is not None:
        metrics["objective/non_score_reward"] = -kl_coef * metrics["objective/kl"]
        metrics["objective/rlhf_reward"] = metrics["objective/non_score_reward"] + metrics["objective/scores"]
    return metrics


def eval_step(params, ref_params, batch, *, graphdef, value_graphdef, block, eos_ids, pad_id, host_reward_fn=None,
              seed=0, logps_temperature=None):
    """Held-out metrics of an online stage's policy: one response per prompt, sampled with a fixed key
    (`seed`) so that evaluations at different steps see the same sampling noise. Returns
    `objective/scores`, `objective/kl`, `objective/entropy`, `response_length` (means over the
    prompts) and `loss` = -mean score, the number a lower-is-better checkpoint rule reads."""
    experience = rollout(params, ref_params, batch, jax.random.PRNGKey(seed), graphdef=graphdef,
                         value_graphdef=value_graphdef, block=block, eos_ids=eos_ids, pad_id=pad_id,
                         host_reward_fn=host_reward_fn, logps_temperature=logps_temperature)
    metrics = rollout_metrics(experience)
    return {**metrics, "loss": -metrics["objective/scores"]}


# ---------------------------------------------------------------------------------------------
# Updates: epochs of minibatches over one rollout's experience
# ---------------------------------------------------------------------------------------------

def minibatch_updates(state, experience, key, *, loss_fn, optimizer, schedule, num_epochs, num_minibatches,
                      micro_batches=1, trainable=None):
    """`num_epochs` x `num_minibatches` optimizer updates of `loss_fn` (in `steps.train_step`'s
    convention) over `experience` (arrays with a leading axis of units: rows, or pairs), each epoch
    in a fresh random order. Returns (params, opt_state, per-update metrics stacked [updates]).

    The optimizer's schedule counts updates (`updates_schedule_config`): update u of iteration s is
    schedule step s * updates + u.
    """
    num_units = jax.tree.leaves(experience)[0].shape[0]
    if num_units % num_minibatches:
        raise ValueError(f"The rollout's {num_units} rows (or pairs) are not divisible by "
                         f"num_minibatches={num_minibatches}")
    shuffle_key, update_key = jax.random.split(key)
    updates_per_iteration = num_epochs * num_minibatches
    orders = jax.vmap(lambda k: jax.random.permutation(k, num_units))(jax.random.split(shuffle_key, num_epochs))
    minibatch_indices = orders.reshape(updates_per_iteration, num_units // num_minibatches)
    update = functools.partial(steps.train_step, loss_fn=loss_fn, optimizer=optimizer, schedule=schedule,
                               micro_batches=micro_batches, trainable=trainable)

    def one_update(update_state, indices):
        return update(update_state, jax.tree.map(lambda x: x[indices], experience))

    # train_step's state, with its step counting optimizer updates so that `schedule` reads them.
    update_state = steps.TrainState(step=state.step * updates_per_iteration, params=state.params,
                                    opt_state=state.opt_state, rng=update_key)
    update_state, update_metrics = jax.lax.scan(one_update, update_state, minibatch_indices)
    return update_state.params, update_state.opt_state, update_metrics


def summarise_updates(update_metrics):
    """Per-update metrics [updates] -> the iteration's: means, but `loss` of the last update and
    `nonfinite` 1 if any update was skipped."""
    metrics = {name: jnp.mean(values) for name, values in update_metrics.items() if name not in ("loss", "nonfinite")}
    return {**metrics, "loss": update_metrics["loss"][-1], "nonfinite": jnp.max(update_metrics["nonfinite"])}


def updates_schedule_config(block):
    """A stage block with `num_steps` and `warmup_steps` counted in optimizer updates, for
    `steps.make_optimizer`: each iteration makes num_epochs * num_minibatches updates, and optax
    schedules count updates, so a decaying schedule built on iterations would end too early."""
    updates_per_iteration = block.num_epochs * block.num_minibatches
    schedule_config = block.copy_and_resolve_references()
    schedule_config.num_steps = block.num_steps * updates_per_iteration
    schedule_config.warmup_steps = block.warmup_steps * updates_per_iteration
    return schedule_config


def init_online_state(policy_params, reward_params, optimizer, *, seed, extra_references=()):
    """Step 0 of an online stage without a value model (GRPO, online DPO): params {"policy"};
    ref_params {"reference": a frozen copy of the policy, "reward": `reward_params` (None with a
    host scorer), and a copy of the policy under each name of `extra_references`}."""
    params = {"policy": policy_params}
    ref_params = {"reference": copy_tree(policy_params), "reward": copy_tree(reward_params),
                  **{name: copy_tree(policy_params) for name in extra_references}}
    return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                            rng=jax.random.PRNGKey(seed), ref_params=ref_params)


def copy_tree(tree):
    """Fresh buffers: a donated state cannot hold one buffer in two of its leaves."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
