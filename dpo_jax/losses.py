"""Pure loss functions: sequence log-probabilities, the preference-loss family, and KL.

Everything here takes arrays and returns arrays: no side effects, no host callbacks, so each
function works under `jax.jit`, `jax.grad`, `jax.vmap` and sharded transforms, and can be imported
into other JAX code on its own. Inputs may be bfloat16; all arithmetic is done in float32.

    losses, metrics = preference_loss(policy_chosen_logps, policy_rejected_logps,
                                      reference_chosen_logps, reference_rejected_logps,
                                      loss_type="sigmoid", beta=0.1)
    loss = losses.mean()
"""

from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp

Array = jax.Array


# ---------------------------------------------------------------------------------------------
# Sequence scores
# ---------------------------------------------------------------------------------------------

def token_logps(logits: Array, labels: Array) -> Array:
    """log p(label_t | context) for every position: [batch, time] float32 from logits [batch, time, vocab]."""
    logits = logits.astype(jnp.float32)
    label_logits = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return label_logits - jax.nn.logsumexp(logits, axis=-1)


def sequence_logps(logits: Array, labels: Array, loss_mask: Array, *, average: bool = False) -> Array:
    """Sum (or mean, with `average=True`) of the label log-probs where `loss_mask` is set: [batch] float32.

    `logits[:, t]` is the prediction for `labels[:, t]` (the caller shifts by one), and `loss_mask`
    covers only response tokens, so the prompt is never scored.
    """
    mask = loss_mask.astype(jnp.float32)
    total = jnp.sum(token_logps(logits, labels) * mask, axis=-1)
    if average:
        return total / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    return total


def sequence_kl(policy_logits: Array, reference_logits: Array, loss_mask: Array) -> Array:
    """Exact KL(policy || reference) of the next-token distributions, summed over masked positions: [batch]."""
    policy_logp = jax.nn.log_softmax(policy_logits.astype(jnp.float32), axis=-1)
    reference_logp = jax.nn.log_softmax(reference_logits.astype(jnp.float32), axis=-1)
    per_token = jnp.sum(jnp.exp(policy_logp) * (policy_logp - reference_logp), axis=-1)
    return jnp.sum(per_token * loss_mask.astype(jnp.float32), axis=-1)


# ---------------------------------------------------------------------------------------------
# Preference losses
# ---------------------------------------------------------------------------------------------

def _sigmoid(logits: Array, beta: float, label_smoothing: float, **_) -> Array:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290): -log sigmoid(beta * h).

    With label_smoothing eps > 0 this is conservative DPO (cDPO, Mitchell 2023):
    -(1 - eps) log sigmoid(beta * h) - eps log sigmoid(-beta * h), h = chosen minus rejected log-ratio.
    """
    return (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * logits)
            - label_smoothing * jax.nn.log_sigmoid(-beta * logits))


# loss_type -> function of the log-ratio difference h (float32 [batch]) and the hyperparameters.
LOSS_FUNCTIONS: Dict[str, Callable[..., Array]] = {
    "sigmoid": _sigmoid,
}
LOSS_TYPES = tuple(LOSS_FUNCTIONS)


def _check_arguments(arrays: Dict[str, Optional[Array]], loss_type, beta, label_smoothing):
    if loss_type not in LOSS_FUNCTIONS:
        raise ValueError(f"loss_type={loss_type!r} is not one of {LOSS_TYPES}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got beta={beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got label_smoothing={label_smoothing}")
    shape = jnp.shape(arrays["policy_chosen_logps"])
    if len(shape) != 1:
        raise ValueError(f"policy_chosen_logps must be [batch], got shape {shape}")
    for name, array in arrays.items():
        if array is None:
            raise ValueError(f"{name} is None, but loss_type={loss_type!r} needs a reference")
        if jnp.shape(array) != shape:
            raise ValueError(f"{name} has shape {jnp.shape(array)}, expected {shape} like policy_chosen_logps")


def preference_loss(policy_chosen_logps: Array, policy_rejected_logps: Array,
                    reference_chosen_logps: Optional[Array], reference_rejected_logps: Optional[Array],
                    *, loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
                    chosen_lengths: Optional[Array] = None, rejected_lengths: Optional[Array] = None,
                    **variant_options):
    """Per-example preference losses [batch] and a dict of scalar metrics.

    The caller takes the mean of the losses, so masking and weighting stay theirs. Metrics use the
    TRL names: `rewards/chosen` and `rewards/rejected` are the implicit rewards
    beta * (log pi - log pi_ref) averaged over the batch, `rewards/accuracies` the fraction of pairs
    whose chosen reward is higher (a tie counts one half, so a policy equal to its reference
    scores 0.5, chance), `rewards/margins` the mean reward difference, `logps/*` the mean policy
    log-probs. Arguments are checked at trace time and a bad one raises ValueError naming it.
    """
    del chosen_lengths, rejected_lengths  # used by the length-normalised variants
    _check_arguments(dict(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                          reference_chosen_logps=reference_chosen_logps,
                          reference_rejected_logps=reference_rejected_logps),
                     loss_type, beta, label_smoothing)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    chosen_logratios = f32(policy_chosen_logps) - f32(reference_chosen_logps)
    rejected_logratios = f32(policy_rejected_logps) - f32(reference_rejected_logps)
    logits = chosen_logratios - rejected_logratios
    losses = LOSS_FUNCTIONS[loss_type](logits, beta=beta, label_smoothing=label_smoothing, **variant_options)

    chosen_rewards = jax.lax.stop_gradient(beta * chosen_logratios)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_logratios)
    wins = (chosen_rewards > rejected_rewards).astype(jnp.float32)
    ties = (chosen_rewards == rejected_rewards).astype(jnp.float32)
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (wins + 0.5 * ties).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": jax.lax.stop_gradient(f32(policy_chosen_logps)).mean(),
        "logps/rejected": jax.lax.stop_gradient(f32(policy_rejected_logps)).mean(),
    }
    return losses, metrics
