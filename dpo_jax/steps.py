"""Pure step functions: `(state, batch) -> (state, metrics)` for SFT and DPO, and their evals.

SFT and DPO share one train step; they differ only in their loss function (as in Tunix's DPO
trainer, a thin layer over SFT). So do the DPO paper's baselines trained on the same batches:
pretraining (the SFT loss on whole texts), a Bradley-Terry reward model and Unlikelihood.
Everything here is a pure function of arrays, jitted by `train.py` with explicit shardings and
the state donated.

Batches come in the layouts of `dpo_jax.data.layouts`. SFT batches hold `input_ids`, `loss_mask`,
`segment_ids` [batch, time] (packed: also `positions`). Padded DPO batches hold the same keys
prefixed by `chosen_` and `rejected_`; packed DPO batches hold rows of several pairs, `positions`,
`sequence_ids` (which pair's chosen or rejected response a token is), `pair_mask` (which pair
slots are real) and, with a shared prompt, `branch_ids`. Every layout gives the same log-probs.
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
    stage_state: Optional[Any] = None  # what a stage carries between steps besides the above (PPO: the KL coefficient)


def init_state(params, optimizer, *, seed, live_reference, reference_dtype=None):
    """Step 0 of a stage starting from `params`; with a live reference, a frozen copy of them
    (in `reference_dtype`, e.g. bfloat16 to halve its memory)."""
    # A real copy: the policy's buffers are donated each step, the reference's are not.
    copy = lambda p: jnp.array(p, dtype=reference_dtype or p.dtype, copy=True)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
        rng=jax.random.PRNGKey(seed), ref_params=jax.tree.map(copy, params) if live_reference else None)


def make_optimizer(train_config, stage_config, trainable=None):
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
    if trainable is not None and not all(jax.tree.leaves(trainable)):
        # Frozen parameters (the base weights under LoRA) get zero updates and no optimizer state;
        # clipping sees only the trainable gradients.
        labels = jax.tree.map(lambda train: "train" if train else "freeze", trainable)
        optimizer = optax.multi_transform({"train": optimizer, "freeze": optax.set_to_zero()}, labels)
    return optimizer, schedule


# ---------------------------------------------------------------------------------------------
# Log-probs of a batch
# ---------------------------------------------------------------------------------------------

def _model_inputs(batch, prefix=""):
    """The keyword arguments of `models.apply` / `models.apply_scalar` for a batch's rows: ids,
    positions, segments and, for prefix-shared rows, the branch ids."""
    return dict(input_ids=batch[prefix + "input_ids"], positions=batch.get(prefix + "positions"),
                segment_ids=batch[prefix + "segment_ids"], branch_ids=batch.get("branch_ids"))


def _shifted_logits(graphdef, params, batch, prefix="", *, use_lora=True):
    """Logits predicting tokens 1..T-1, with their labels and loss mask (the prompt is never scored)."""
    logits = models.apply(graphdef, params, **_model_inputs(batch, prefix), use_lora=use_lora)
    return logits[:, :-1], batch[prefix + "input_ids"][:, 1:], batch[prefix + "loss_mask"][:, 1:]


def _token_logps(graphdef, params, batch, *, use_lora=True, with_stats=False):
    """[rows, T-1] log-probs of tokens 1..T-1 where the loss mask scores them (0 elsewhere); with the
    model's `logits_chunk_size`, only those tokens' logits are computed (`models.apply_token_logps`).
    `with_stats`: also their prediction statistics (`losses.token_logps_and_stats`)."""
    return models.apply_token_logps(graphdef, params, **_model_inputs(batch), loss_mask=batch["loss_mask"],
                                    use_lora=use_lora, with_stats=with_stats)


def _token_metrics(stats, num_tokens):
    """TRL's token-level metrics of scored tokens' statistics: the share predicted right, and the entropy."""
    return {"mean_token_accuracy": jnp.sum(stats["correct"]) / jnp.maximum(num_tokens, 1.0),
            "entropy": jnp.sum(stats["entropy"]) / jnp.maximum(num_tokens, 1.0)}


def _pair_rows(batch):
    """Chosen and rejected stacked into one batch [2 * pairs, time], for a single forward pass."""
    return {key: jnp.concatenate([batch["chosen_" + key], batch["rejected_" + key]], axis=0)
            for key in ("input_ids", "loss_mask", "segment_ids")}


def _dpo_rows(batch):
    """The model rows of a DPO batch, with `sequence_ids` (2k / 2k+1: a token of the row's k-th
    pair's chosen / rejected response; -1: not scored). Padded: chosen rows, then rejected rows."""
    if "chosen_input_ids" not in batch:
        return {**batch, "loss_mask": (batch["sequence_ids"] >= 0).astype(jnp.int32)}
    rows = _pair_rows(batch)
    pairs = batch["chosen_input_ids"].shape[0]
    side = (jnp.arange(2 * pairs) >= pairs).astype(jnp.int32)[:, None]
    return {**rows, "sequence_ids": jnp.where(rows["loss_mask"] > 0, side, -1)}


def _num_sequence_slots(batch):
    """How many `sequence_ids` a row of the batch's `_dpo_rows` can hold."""
    return 2 if "chosen_input_ids" in batch else 2 * batch["pair_mask"].shape[-1]


def _chosen_and_rejected(per_slot, batch):
    """([pairs], [pairs]) of chosen and rejected from per-slot values [rows, slots] (0 in slots with
    no tokens). Padded: chosen rows fill slot 0 and rejected rows slot 1, so their halves add up."""
    if "chosen_input_ids" in batch:
        per_slot = per_slot[:per_slot.shape[0] // 2] + per_slot[per_slot.shape[0] // 2:]
    per_slot = per_slot.reshape(-1, 2)
    return per_slot[:, 0], per_slot[:, 1]


def _pair_sums(per_token, batch, rows):
    """Sums of a per-token quantity [rows, T-1] over each pair's chosen and rejected tokens: ([pairs], [pairs])."""
    slots = rows["sequence_ids"][:, 1:, None] == jnp.arange(_num_sequence_slots(batch))
    sums = jnp.sum(jnp.where(slots, per_token.astype(jnp.float32)[..., None], 0.0), axis=1)  # [rows, slots]
    return _chosen_and_rejected(sums, batch)


def _pair_lengths(batch, rows):
    """Response token counts of each pair's chosen and rejected: ([pairs], [pairs]) float32."""
    return _pair_sums(jnp.ones(rows["sequence_ids"][:, 1:].shape, jnp.float32), batch, rows)


def _reference(params, ref_params, dpo_config):
    """(reference params, use_lora) of a live reference: LoRA-DPO's is the policy's own weights with
    the adapters switched off. No gradient flows into it."""
    if dpo_config.reference == "lora":
        return jax.lax.stop_gradient(params), False
    return jax.lax.stop_gradient(ref_params), True


def _reference_pair_logps(graphdef, params, ref_params, batch, rows, dpo_config):
    """The reference's (chosen, rejected) log-probs: precomputed ones from the batch, or a live
    forward; (None, None) for a reference-free loss, which runs no reference."""
    if not losses.uses_reference(dpo_config.loss_type):
        return None, None
    if "reference_chosen_logps" in batch:
        return batch["reference_chosen_logps"].reshape(-1), batch["reference_rejected_logps"].reshape(-1)
    reference, use_lora = _reference(params, ref_params, dpo_config)
    return _pair_sums(_token_logps(graphdef, reference, rows, use_lora=use_lora), batch, rows)


def reference_logps(params, batch, *, graphdef):
    """Sequence log-probs of chosen and rejected under `params`, one per pair slot of the batch's
    units ([pairs], packed: [rows, pairs per row]): the precomputed-reference pass."""
    rows = _dpo_rows(batch)
    chosen, rejected = _pair_sums(_token_logps(graphdef, params, rows), batch, rows)
    shape = batch["pair_mask"].shape if "pair_mask" in batch else chosen.shape
    return {"reference_chosen_logps": chosen.reshape(shape), "reference_rejected_logps": rejected.reshape(shape)}


# ---------------------------------------------------------------------------------------------
# Losses: (params, ref_params, batch, rng) -> (loss, (metrics, weight)), where loss and metrics
# are means over `weight` units (tokens for SFT, pairs for DPO), so that micro-batches and
# devices combine exactly by weighted sums.
# ---------------------------------------------------------------------------------------------

def sft_loss(params, ref_params, batch, rng, *, graphdef):
    """Mean next-token NLL over the response tokens of the batch."""
    del ref_params, rng
    num_tokens = jnp.sum(batch["loss_mask"][:, 1:].astype(jnp.float32))
    token_logps, stats = _token_logps(graphdef, params, batch, with_stats=True)
    nll = -jnp.sum(token_logps) / jnp.maximum(num_tokens, 1.0)
    return nll, ({"nll": nll, **_token_metrics(stats, num_tokens)}, num_tokens)


def _mean_over_pairs(pair_loss, inputs, batch):
    """(loss, (metrics, pairs)) of `pair_loss(*inputs) -> (per-pair losses, batch-mean metrics)`,
    `inputs` being [pairs] arrays: averaged over the batch's pairs (packed: the real ones)."""
    per_example, metrics = pair_loss(*inputs)
    if "pair_mask" not in batch:
        return per_example.mean(), (metrics, jnp.asarray(per_example.shape[0], jnp.float32))
    # Packed rows have empty pair slots. The metrics are batch means, so they are taken per pair
    # (a batch of one each) and averaged over the real pairs only.
    pair_mask = batch["pair_mask"].reshape(-1).astype(jnp.float32)
    per_pair_metrics = jax.vmap(lambda *pair: pair_loss(*(x[None] for x in pair))[1])(*inputs)
    metrics = jax.tree.map(lambda values: losses.masked_mean(values, pair_mask), per_pair_metrics)
    return losses.masked_mean(per_example, pair_mask), (metrics, jnp.sum(pair_mask))


def preference_options(dpo_config):
    """`losses.preference_loss` keyword arguments of a `config.dpo` block: beta, label smoothing, the loss
    type (several make a mixture) and the variant options that are set (unset ones are None or empty)."""
    options = {key: value for key, value in dpo_config.loss_options.items() if value not in (None, ())}
    loss_type = tuple(dpo_config.loss_type)
    return dict(beta=dpo_config.beta, label_smoothing=dpo_config.label_smoothing,
                loss_type=loss_type if len(loss_type) > 1 else loss_type[0], **options)


def _prediction_metrics(stats, batch, rows):
    """TRL's `logits/chosen`, `logits/rejected` (the mean logit of each pair's response tokens),
    `mean_token_accuracy` and `entropy` (over both responses' tokens), averaged over the batch's
    pairs (packed: the real ones)."""
    chosen_lengths, rejected_lengths = _pair_lengths(batch, rows)
    chosen_logits, rejected_logits = _pair_sums(stats["logit_mean"], batch, rows)
    per_pair = {"logits/chosen": chosen_logits / jnp.maximum(chosen_lengths, 1.0),
                "logits/rejected": rejected_logits / jnp.maximum(rejected_lengths, 1.0)}
    for name, key in (("mean_token_accuracy", "correct"), ("entropy", "entropy")):
        chosen, rejected = _pair_sums(stats[key], batch, rows)
        per_pair[name] = (chosen + rejected) / jnp.maximum(chosen_lengths + rejected_lengths, 1.0)
    pair_mask = batch["pair_mask"].reshape(-1).astype(jnp.float32) if "pair_mask" in batch else None
    return {name: values.mean() if pair_mask is None else losses.masked_mean(values, pair_mask)
            for name, values in per_pair.items()}


def _preference_loss(policy_token_logps, reference_logps, rows, batch, dpo_config):
    """Loss and metrics averaged over the batch's pairs (packed: the real ones), and their number."""
    policy_chosen, policy_rejected = _pair_sums(policy_token_logps, batch, rows)
    chosen_lengths, rejected_lengths = _pair_lengths(batch, rows)
    options = preference_options(dpo_config)
    inputs = (policy_chosen, policy_rejected, *reference_logps, chosen_lengths, rejected_lengths)

    def pair_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, chosen_lengths,
                  rejected_lengths):
        return losses.preference_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                                      chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, **options)

    return _mean_over_pairs(pair_loss, inputs, batch)


def dpo_loss(params, ref_params, batch, rng, *, graphdef, dpo_config):
    """The preference loss of `dpo_config.loss_type` against the frozen (or precomputed) reference."""
    del rng
    rows = _dpo_rows(batch)
    reference_logps = _reference_pair_logps(graphdef, params, ref_params, batch, rows, dpo_config)
    token_logps, stats = _token_logps(graphdef, params, rows, with_stats=True)
    loss, (metrics, weight) = _preference_loss(token_logps, reference_logps, rows, batch, dpo_config)
    return loss, ({**metrics, **_prediction_metrics(stats, batch, rows)}, weight)


def reward_pair_scores(params, batch, *, graphdef):
    """The scalar model's rewards of each pair's chosen and rejected responses ([pairs], [pairs];
    packed: every pair slot, empty ones 0): its score at a response's last token, the EOS."""
    rows = _dpo_rows(batch)
    scores = models.apply_scalar(graphdef, params, **_model_inputs(rows))
    return _chosen_and_rejected(
        models.scalar.last_token_scores(scores, rows["sequence_ids"], _num_sequence_slots(batch)), batch)


def reward_loss(params, ref_params, batch, rng, *, graphdef):
    """Bradley-Terry loss of the scalar model `graphdef` (a reward model) on DPO pairs, any layout."""
    del ref_params, rng
    chosen_rewards, rejected_rewards = reward_pair_scores(params, batch, graphdef=graphdef)
    return _mean_over_pairs(losses.bradley_terry_loss, (chosen_rewards, rejected_rewards), batch)


def unlikelihood_loss(params, ref_params, batch, rng, *, graphdef, alpha):
    """The Unlikelihood baseline on DPO pairs: per-token NLL of the chosen response plus `alpha` times
    the per-token unlikelihood -log(1 - p) of the rejected one (`losses.unlikelihood_loss`)."""
    del ref_params, rng
    rows = _dpo_rows(batch)
    token_logps = _token_logps(graphdef, params, rows)
    chosen_logps, rejected_logps = _pair_sums(token_logps, batch, rows)
    _, rejected_log_one_minus = _pair_sums(losses.log1m_exp(token_logps), batch, rows)
    chosen_lengths, rejected_lengths = _pair_lengths(batch, rows)

    def pair_loss(chosen_logps, rejected_log_one_minus, chosen_lengths, rejected_lengths, rejected_logps):
        return losses.unlikelihood_loss(chosen_logps, rejected_log_one_minus, chosen_lengths, rejected_lengths,
                                        alpha=alpha, rejected_logps=rejected_logps)

    return _mean_over_pairs(
        pair_loss, (chosen_logps, rejected_log_one_minus, chosen_lengths, rejected_lengths, rejected_logps), batch)


def _row_logps(graphdef, params, batch, prefix="", *, use_lora=True):
    """Summed response log-probs [rows] of a batch's padded rows whose keys start with `prefix`."""
    rows = {key: batch[prefix + key] for key in ("input_ids", "loss_mask", "segment_ids")}
    return jnp.sum(_token_logps(graphdef, params, rows, use_lora=use_lora).astype(jnp.float32), axis=1)


def kto_loss(params, ref_params, batch, rng, *, graphdef, kto_config):
    """KTO on unpaired examples (`losses.kto_loss`) against a live frozen reference: each row's
    completion, and for the KL reference point the same prompt with a mismatched completion
    (`kl_*` rows, no gradient)."""
    del rng
    reference = jax.lax.stop_gradient(ref_params)
    per_example, metrics = losses.kto_loss(
        _row_logps(graphdef, params, batch), _row_logps(graphdef, reference, batch), batch["desirable"],
        _row_logps(graphdef, jax.lax.stop_gradient(params), batch, "kl_"),
        _row_logps(graphdef, reference, batch, "kl_"), beta=kto_config.beta,
        desirable_weight=kto_config.desirable_weight, undesirable_weight=kto_config.undesirable_weight)
    return per_example.mean(), (metrics, jnp.asarray(per_example.shape[0], jnp.float32))


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------

def _micro_batches(batch, count):
    """[batch, ...] -> [count, batch / count, ...], micro-batch i holding rows i, i + count, ...,
    so that every device holds an equal share of every micro-batch."""
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1), batch)


def _weighted_grads(loss_fn, params, ref_params, batch, rng, micro_batches):
    """Weighted sums (loss, metrics, grads) and the total weight, over `micro_batches` in sequence."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def one(micro_batch, micro_rng):
        (loss, (metrics, weight)), grads = grad_fn(params, ref_params, micro_batch, micro_rng)
        scale = lambda tree: jax.tree.map(lambda x: x * weight, tree)
        return scale((loss, metrics, grads)), weight

    if micro_batches == 1:
        return one(batch, rng)

    def accumulate(totals, inputs):
        sums, weight = one(*inputs)
        return jax.tree.map(jnp.add, totals, (sums, weight)), None

    rngs = jax.random.split(rng, micro_batches)
    micro = _micro_batches(batch, micro_batches)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(one, jax.tree.map(lambda x: x[0], micro), rngs[0]))
    totals, _ = jax.lax.scan(accumulate, zeros, (micro, rngs))
    return totals


def train_step(state: TrainState, batch, *, loss_fn, optimizer, schedule, micro_batches=1, axis_name=None,
               reference_update=None, trainable=None):
    """One optimizer step of `loss_fn`, exact under micro-batching and data parallelism.

    micro_batches: gradient accumulation; the update equals the one of the whole batch.
    axis_name: the pmap / shard_map axis to combine over (None under jit with shardings, where
      XLA partitions the global computation itself).
    reference_update: (tau, alpha) for TR-DPO: every tau steps the reference moves to
      alpha * policy + (1 - alpha) * reference (Gorbatovski et al. 2024, arXiv:2404.09656).
    trainable: bools shaped like the params (LoRA: only the adapters); the gradient norm and the
      finiteness check cover those, so XLA can skip the frozen weights' gradients.
    """
    rng, step_rng = jax.random.split(state.rng)
    (loss, metrics, grads), weight = _weighted_grads(loss_fn, state.params, state.ref_params, batch, step_rng,
                                                     micro_batches)
    if axis_name is not None:
        (loss, metrics, grads), weight = jax.lax.psum(((loss, metrics, grads), weight), axis_name)
    loss, metrics, grads = jax.tree.map(lambda x: x / weight, (loss, metrics, grads))
    # A non-finite loss, gradient or updated parameter skips the update (the batch is still consumed),
    # so one bad batch cannot poison the parameters; the host counts these steps from `nonfinite`.
    trained = lambda tree: ([leaf for leaf, train in zip(jax.tree.leaves(tree), jax.tree.leaves(trainable)) if train]
                            if trainable is not None else jax.tree.leaves(tree))
    grad_norm = optax.global_norm(trained(grads))

    def update(params, opt_state):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    # The updated parameters must be finite too: finite gradients can still make them NaN or inf (an
    # overflowing update). Only their norm is taken here, one reduction over the update's elementwise
    # math (XLA:CPU keeps one parameter-sized temporary for it); the update itself then runs in place
    # in the cond.
    # One pass for each check: a norm is non-finite if any element is, or if the squares overflow
    # float32 (|x| > 1e19), a step whose Adam moments would be poisoned anyway.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    finite &= jnp.isfinite(optax.global_norm(trained(update(state.params, state.opt_state)[0])))
    # A cond rather than a select of old and new values: the update then runs in place in the
    # donated buffers, without copying the optimizer state every step.
    params, opt_state = jax.lax.cond(finite, update, lambda *kept: kept, state.params, state.opt_state)
    ref_params = state.ref_params
    if reference_update is not None:
        tau, alpha = reference_update
        mixed = jax.tree.map(lambda p, r: (alpha * p + (1.0 - alpha) * r).astype(r.dtype), params, ref_params)
        ref_params = jax.lax.cond((state.step + 1) % tau == 0, lambda: mixed, lambda: ref_params)
    metrics = {**metrics, "loss": loss, "grad_norm": grad_norm,
               "learning_rate": schedule(state.step), "nonfinite": 1.0 - finite.astype(jnp.float32)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng,
                         ref_params=ref_params), metrics


def pmap_train_step(*, loss_fn, optimizer, schedule, axis_name="devices", **options):
    """The same train step for pmap-based code: data parallel, the state replicated on every device
    and the batch split on a leading device axis. (`jax.jit` with shardings is the main path.)"""
    return jax.pmap(functools.partial(train_step, loss_fn=loss_fn, optimizer=optimizer, schedule=schedule,
                                      axis_name=axis_name, **options), axis_name=axis_name, donate_argnums=0)


def _loss_metrics(loss_fn, params, ref_params, batch, **options):
    """A loss function's metrics and its loss on an eval batch (no rng: evals are deterministic)."""
    loss, (metrics, _) = loss_fn(params, ref_params, batch, None, **options)
    return {**metrics, "loss": loss}


def sft_eval_step(params, ref_params, batch, *, graphdef):
    return _loss_metrics(sft_loss, params, ref_params, batch, graphdef=graphdef)


def reward_eval_step(params, ref_params, batch, *, graphdef):
    """The reward model's Bradley-Terry loss and `rewards/*` metrics (`rewards/accuracies`: held-out
    preference accuracy)."""
    return _loss_metrics(reward_loss, params, ref_params, batch, graphdef=graphdef)


def unlikelihood_eval_step(params, ref_params, batch, *, graphdef, alpha):
    return _loss_metrics(unlikelihood_loss, params, ref_params, batch, graphdef=graphdef, alpha=alpha)


def kto_eval_step(params, ref_params, batch, *, graphdef, kto_config):
    return _loss_metrics(kto_loss, params, ref_params, batch, graphdef=graphdef, kto_config=kto_config)


def dpo_eval_step(params, ref_params, batch, *, graphdef, dpo_config):
    """DPO metrics plus, with a live reference, `kl`: exact KL(policy || reference) summed over
    each response, averaged over sequences (from full logits of both models)."""
    if "reference_chosen_logps" in batch or not losses.uses_reference(dpo_config.loss_type):
        return _loss_metrics(dpo_loss, params, ref_params, batch, graphdef=graphdef, dpo_config=dpo_config)
    rows = _dpo_rows(batch)
    logits, labels, _ = _shifted_logits(graphdef, params, rows)
    reference, use_lora = _reference(params, ref_params, dpo_config)
    reference_logits, _, _ = _shifted_logits(graphdef, reference, rows, use_lora=use_lora)
    reference_logps = _pair_sums(losses.token_logps(reference_logits, labels), batch, rows)
    token_logps, stats = losses.token_logps_and_stats(logits, labels)  # summed over scored tokens only
    loss, (metrics, _) = _preference_loss(token_logps, reference_logps, rows, batch, dpo_config)
    metrics = {**metrics, **_prediction_metrics(stats, batch, rows)}
    # Per-token KL: sequence_kl over a time axis of length one, then summed per response.
    token_kl = losses.sequence_kl(logits[:, :, None], reference_logits[:, :, None], jnp.ones(labels.shape + (1,)))
    chosen_kl, rejected_kl = _pair_sums(token_kl, batch, rows)
    pair_mask = batch["pair_mask"].reshape(-1).astype(jnp.float32) if "pair_mask" in batch else 1.0
    return {**metrics, "loss": loss,
            "kl": losses.masked_mean((chosen_kl + rejected_kl) / 2, pair_mask * jnp.ones_like(chosen_kl))}
