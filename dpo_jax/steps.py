"""Pure step functions: `(state, batch) -> (state, metrics)` for SFT and DPO, and their evals.

SFT and DPO share one train step; they differ only in their loss function (as in Tunix's DPO
trainer, a thin layer over SFT). Everything here is a pure function of arrays, jitted by
`train.py` with explicit shardings and the state donated.

Batches use the padded layout of `dpo_jax.data.layouts`: SFT batches hold `input_ids`,
`loss_mask`, `segment_ids` [batch, time]; DPO batches hold the same keys prefixed by `chosen_`
and `rejected_`.
"""

import functools
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dpo_jax import losses, models


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # optimizer steps taken in this stage
    params: Any              # policy parameters (nested dict of arrays)
    opt_state: Any           # optax state of `params`
    rng: jax.Array           # advanced every step, for stochastic variants
    ref_params: Optional[Any] = None  # frozen reference (DPO with a live reference); no optimizer state


def init_state(params, optimizer, *, seed, live_reference):
    """Step 0 of a stage starting from `params`; with a live reference, a frozen copy of them."""
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
        rng=jax.random.PRNGKey(seed),
        # A real copy: the policy's buffers are donated each step, the reference's are not.
        ref_params=jax.tree.map(jnp.copy, params) if live_reference else None)


def make_optimizer(train_config, stage_config):
    """The optax transformation and learning-rate schedule of a stage."""
    warmup = optax.linear_schedule(0.0, stage_config.learning_rate, max(stage_config.warmup_steps, 1))
    decay_steps = max(stage_config.num_steps - stage_config.warmup_steps, 1)
    after_warmup = {
        "constant": optax.constant_schedule(stage_config.learning_rate),
        "linear": optax.linear_schedule(stage_config.learning_rate, 0.0, decay_steps),
        "cosine": optax.cosine_decay_schedule(stage_config.learning_rate, decay_steps),
    }[stage_config.schedule]
    schedule = optax.join_schedules([warmup, after_warmup], [stage_config.warmup_steps])
    if train_config.optimizer == "adamw":
        optimizer = optax.adamw(schedule, b1=train_config.b1, b2=train_config.b2,
                                weight_decay=train_config.weight_decay)
    else:  # rmsprop, as in the DPO paper
        optimizer = optax.rmsprop(schedule)
    if train_config.grad_clip_norm:
        optimizer = optax.chain(optax.clip_by_global_norm(train_config.grad_clip_norm), optimizer)
    return optimizer, schedule


# ---------------------------------------------------------------------------------------------
# Log-probs of a batch
# ---------------------------------------------------------------------------------------------

def _shifted_logits(graphdef, params, batch, prefix=""):
    """Logits predicting tokens 1..T-1, with their labels and loss mask (the prompt is never scored)."""
    input_ids = batch[prefix + "input_ids"]
    logits = models.apply(graphdef, params, input_ids, segment_ids=batch[prefix + "segment_ids"])
    return logits[:, :-1], input_ids[:, 1:], batch[prefix + "loss_mask"][:, 1:]


def _pair_rows(batch):
    """Chosen and rejected stacked into one batch [2 * pairs, time], for a single forward pass."""
    return {key: jnp.concatenate([batch["chosen_" + key], batch["rejected_" + key]], axis=0)
            for key in ("input_ids", "loss_mask", "segment_ids")}


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------

def sft_loss(params, ref_params, batch, rng, *, graphdef):
    """Mean next-token NLL over the response tokens of the batch."""
    del ref_params, rng
    logits, labels, mask = _shifted_logits(graphdef, params, batch)
    mask = mask.astype(jnp.float32)
    nll = -jnp.sum(losses.token_logps(logits, labels) * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return nll, {"nll": nll}


def _policy_and_reference(graphdef, params, ref_params, batch):
    """Policy and reference logits of chosen and rejected, each model in one forward pass."""
    rows = _pair_rows(batch)
    logits, labels, mask = _shifted_logits(graphdef, params, rows)
    reference_logits, _, _ = _shifted_logits(graphdef, jax.lax.stop_gradient(ref_params), rows)
    return logits, reference_logits, labels, mask


def _loss_options(dpo_config):
    """Variant options that are set (unset ones are None in the config)."""
    return {key: value for key, value in dpo_config.loss_options.items() if value is not None}


def _preference_loss(logits, reference_logits, labels, mask, dpo_config):
    policy_logps = losses.sequence_logps(logits, labels, mask)
    reference_logps = losses.sequence_logps(reference_logits, labels, mask)
    lengths = jnp.sum(mask, axis=-1).astype(jnp.float32)
    pairs = logits.shape[0] // 2
    per_example, metrics = losses.preference_loss(
        policy_logps[:pairs], policy_logps[pairs:], reference_logps[:pairs], reference_logps[pairs:],
        loss_type=dpo_config.loss_type, beta=dpo_config.beta, label_smoothing=dpo_config.label_smoothing,
        chosen_lengths=lengths[:pairs], rejected_lengths=lengths[pairs:], **_loss_options(dpo_config))
    return per_example.mean(), metrics


def dpo_loss(params, ref_params, batch, rng, *, graphdef, dpo_config):
    """The preference loss of `dpo_config.loss_type` against the frozen reference."""
    del rng
    forward = _policy_and_reference(graphdef, params, ref_params, batch)
    return _preference_loss(*forward, dpo_config)


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------

def train_step(state: TrainState, batch, *, loss_fn, optimizer, schedule):
    """One optimizer step of `loss_fn(params, ref_params, batch, rng) -> (loss, metrics)`."""
    rng, step_rng = jax.random.split(state.rng)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.ref_params, batch,
                                                                      step_rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads),
               "learning_rate": schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics


def sft_eval_step(params, ref_params, batch, *, graphdef):
    loss, metrics = sft_loss(params, ref_params, batch, None, graphdef=graphdef)
    return {**metrics, "loss": loss}


def dpo_eval_step(params, ref_params, batch, *, graphdef, dpo_config):
    """DPO metrics plus `kl`: exact KL(policy || reference) summed over each response, averaged over sequences."""
    logits, reference_logits, labels, mask = _policy_and_reference(graphdef, params, ref_params, batch)
    loss, metrics = _preference_loss(logits, reference_logits, labels, mask, dpo_config)
    kl = losses.sequence_kl(logits, reference_logits, mask).mean()
    return {**metrics, "loss": loss, "kl": kl}


def stage_functions(stage, graphdef, config):
    """(loss_fn, eval_fn) of a stage, closed over the model graph and the stage's config."""
    if stage == "sft":
        return (functools.partial(sft_loss, graphdef=graphdef),
                functools.partial(sft_eval_step, graphdef=graphdef))
    return (functools.partial(dpo_loss, graphdef=graphdef, dpo_config=config.dpo),
            functools.partial(dpo_eval_step, graphdef=graphdef, dpo_config=config.dpo))
