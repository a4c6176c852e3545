"""Pure loss functions: sequence log-probabilities, the preference-loss family, KTO, KL, and the DPO
paper's baselines' losses (Bradley-Terry reward model, Unlikelihood).

Everything here takes arrays and returns arrays: no side effects, no host callbacks, so each
function works under `jax.jit`, `jax.grad`, `jax.vmap`, `jax.pmap` and `jax.shard_map`, and can be
imported into other JAX code on its own. Inputs may be bfloat16; all arithmetic is done in float32,
in log-sigmoid / softplus forms, so losses and gradients stay finite for any finite log-probs
(tested up to 1e9 in magnitude). Arguments are checked in Python at trace time (shapes and static
hyperparameters only), and a bad one raises ValueError naming it.

    losses, metrics = preference_loss(policy_chosen_logps, policy_rejected_logps,
                                      reference_chosen_logps, reference_rejected_logps,
                                      loss_type="sigmoid", beta=0.1)
    loss = losses.mean()

`LOSS_TYPES` lists every `loss_type`; names follow TRL's where TRL has the variant.
"""

import dataclasses
import functools
import inspect
import math
import numbers
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp

Array = jax.Array

# Arguments of exp() are capped here so that every loss stays finite in float32 for any finite
# input: e^40 ~ 2e17, whose square (the squared-error losses) still fits in float32 (max ~3e38).
# Past the cap the gradient is zero, in a regime where these losses are already ~1e17.
_MAX_EXPONENT = 40.0


def _capped_exp(x: Array) -> Array:
    return jnp.exp(jnp.minimum(x, _MAX_EXPONENT))


# ---------------------------------------------------------------------------------------------
# Sequence scores
# ---------------------------------------------------------------------------------------------

def token_logps(logits: Array, labels: Array) -> Array:
    """log p(label_t | context) for every position: [batch, time] float32 from logits [batch, time, vocab]."""
    logits = logits.astype(jnp.float32)
    label_logits = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return label_logits - jax.nn.logsumexp(logits, axis=-1)


def token_logps_and_stats(logits: Array, labels: Array) -> Tuple[Array, Dict[str, Array]]:
    """`token_logps` and, per position and without gradient, statistics of the prediction: `logit_mean`
    (the mean logit over the vocabulary: TRL's `logits/*`), `entropy` of the softmax, and `correct`
    (1.0 where the most likely token is the label: TRL's `mean_token_accuracy`)."""
    logits = logits.astype(jnp.float32)
    label_logits = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    probs = jnp.exp(logits - log_normalizer[..., None])
    stats = {"logit_mean": jnp.mean(logits, axis=-1),
             "entropy": log_normalizer - jnp.sum(probs * logits, axis=-1),
             "correct": (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)}
    return label_logits - log_normalizer, jax.lax.stop_gradient(stats)


def _reduce(masked_sums: Array, mask: Array, average: bool) -> Array:
    if average:
        return masked_sums / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    return masked_sums


def sequence_logps(logits: Array, labels: Array, loss_mask: Array, *, average: bool = False) -> Array:
    """Sum (or mean, with `average=True`) of the label log-probs where `loss_mask` is set: [batch] float32.

    `logits[:, t]` is the prediction for `labels[:, t]` (the caller shifts by one), and `loss_mask`
    covers only response tokens, so the prompt is never scored. This materialises the float32
    log-softmax of all of `logits`; for large vocabularies use `chunked_sequence_logps`.
    """
    mask = loss_mask.astype(jnp.float32)
    return _reduce(jnp.sum(token_logps(logits, labels) * mask, axis=-1), mask, average)


def _time_chunks(x: Array, chunk_size: int) -> Array:
    """[batch, time, ...] -> [chunks, batch, chunk_size, ...], time zero-padded to whole chunks."""
    batch, time = x.shape[:2]
    num_chunks = -(-time // chunk_size)
    x = jnp.pad(x, [(0, 0), (0, num_chunks * chunk_size - time)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(batch, num_chunks, chunk_size, *x.shape[2:]), 1, 0)


def chunked_sequence_logps(inputs: Array, labels: Array, loss_mask: Array, *, average: bool = False,
                           chunk_size: int = 128, logits_fn: Optional[Callable[[Array], Array]] = None) -> Array:
    """`sequence_logps` in bounded memory: the same numbers and gradients, one time chunk at a time.

    `inputs` [batch, time, ...] are the logits, or, with `logits_fn`, whatever `logits_fn` maps to
    logits chunk by chunk: e.g. the final hidden states [batch, time, embed] with
    `logits_fn=lambda h: h @ embedding.T`, so that not even the full logits exist. Only one
    [batch, chunk_size, vocab] float32 log-softmax is live at a time, in the forward pass and (each
    chunk is rematerialised with `jax.checkpoint`) in the backward pass, which is what lets a
    128k-vocabulary model fit. `inputs` are laid out by chunk once, a copy in their own dtype.
    """
    chunk_size = min(chunk_size, labels.shape[1])
    to_chunks = lambda x: _time_chunks(x, chunk_size)  # padding is masked out

    @jax.checkpoint  # keep only the chunk's inputs for the backward pass, not its float32 log-softmax
    def masked_chunk_sum(chunk):
        chunk_inputs, chunk_labels, chunk_mask = chunk
        chunk_logits = logits_fn(chunk_inputs) if logits_fn is not None else chunk_inputs
        return jnp.sum(token_logps(chunk_logits, chunk_labels) * chunk_mask, axis=-1)

    mask = loss_mask.astype(jnp.float32)
    chunk_sums = jax.lax.map(masked_chunk_sum, (to_chunks(inputs), to_chunks(labels), to_chunks(mask)))
    return _reduce(jnp.sum(chunk_sums, axis=0), mask, average)


def scored_token_logps(hidden: Array, labels: Array, loss_mask: Array, logits_fn: Callable[[Array], Array], *,
                       chunk_size: int = 128, with_stats: bool = False):
    """`token_logps(logits_fn(hidden), labels)` where `loss_mask` is set, 0 elsewhere: [batch, time]
    float32, computing logits only for the scored positions, `chunk_size` of them at a time. With
    `with_stats`, also `token_logps_and_stats`' statistics, shaped and zeroed the same way.

    Each row's scored positions are gathered to its front (in order), and only the chunks of
    `chunk_size` columns where some row still has a scored position are computed: a loop of as
    many steps, forward and backward (`_scored_chunk_logps`). A DPO row scores its responses only,
    about a third of its slots on HH; the unembedding and float32 log-softmax of the prompts and
    padding are never computed. One [batch, chunk_size, vocab] float32 block is live at a time,
    forward and backward (the backward recomputes each chunk's logits), so large vocabularies fit.
    """
    batch, time = labels.shape
    chunk_size = min(chunk_size, time)
    scored = loss_mask > 0
    order = jnp.argsort(~scored, axis=1, stable=True)  # [batch, time]: scored positions first
    scored_per_row = jnp.sum(scored, axis=1)

    def to_chunks(x):  # [batch, time, ...] gathered by `order` -> [chunks, batch, chunk_size, ...]
        return _time_chunks(jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1),
                            chunk_size)

    hidden_chunks, label_chunks = to_chunks(hidden), to_chunks(labels)
    # The weights `logits_fn` closes over become explicit inputs, so that they get gradients.
    chunk_logits_fn, weights = jax.closure_convert(logits_fn, hidden_chunks[0])
    num_scored_chunks = -(-jnp.max(scored_per_row) // chunk_size)
    chunks = _scored_chunk_logps(chunk_logits_fn, with_stats, num_scored_chunks, hidden_chunks, label_chunks,
                                 *weights)

    def scattered(per_chunk):  # [chunks, batch, chunk] in gathered order -> [batch, time], 0 where unscored
        gathered = jnp.moveaxis(per_chunk, 0, 1).reshape(batch, -1)[:, :time]
        gathered = jnp.where(jnp.arange(time) < scored_per_row[:, None], gathered, 0.0)
        return jnp.zeros((batch, time), jnp.float32).at[jnp.arange(batch)[:, None], order].set(
            gathered, unique_indices=True)

    if with_stats:
        logps, stats = chunks
        return scattered(logps), {name: scattered(values) for name, values in stats.items()}
    return scattered(chunks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _scored_chunk_logps(logits_fn, with_stats, num_chunks, hidden_chunks, label_chunks, *weights):
    """[chunks, batch, chunk] float32 token log-probs of `logits_fn(hidden_chunks[i], *weights)` for
    the first `num_chunks` (traced) chunks, 0 in the others, which are never computed; `with_stats`:
    (log-probs, {statistics}) of `token_logps_and_stats`, the statistics without gradient."""
    return _scored_chunk_logps_fwd(logits_fn, with_stats, num_chunks, hidden_chunks, label_chunks, *weights)[0]


def _scored_chunk_logps_fwd(logits_fn, with_stats, num_chunks, hidden_chunks, label_chunks, *weights):
    zeros = jnp.zeros(label_chunks.shape, jnp.float32)

    def chunk(i, outputs):
        logits = logits_fn(hidden_chunks[i], *weights)
        if not with_stats:
            return outputs.at[i].set(token_logps(logits, label_chunks[i]))
        logps, stats = token_logps_and_stats(logits, label_chunks[i])
        return outputs[0].at[i].set(logps), {name: outputs[1][name].at[i].set(stats[name]) for name in stats}

    init = (zeros, {name: zeros for name in ("logit_mean", "entropy", "correct")}) if with_stats else zeros
    outputs = jax.lax.fori_loop(0, num_chunks, chunk, init)
    return outputs, (num_chunks, hidden_chunks, label_chunks, weights)


def _scored_chunk_logps_bwd(logits_fn, with_stats, residuals, output_grads):
    """The same loop backwards: each chunk's logits recomputed and differentiated on the spot, so the
    weights' gradient sums the computed chunks only (no zero gradients of skipped ones). The
    statistics have no gradient."""
    num_chunks, hidden_chunks, label_chunks, weights = residuals
    logps_grad = output_grads[0] if with_stats else output_grads

    def chunk(i, grads):
        hidden_grads, weight_grads = grads
        _, vjp = jax.vjp(lambda h, *w: token_logps(logits_fn(h, *w), label_chunks[i]), hidden_chunks[i], *weights)
        hidden_grad, *chunk_weight_grads = vjp(logps_grad[i])
        return (hidden_grads.at[i].set(hidden_grad),
                [total + grad.astype(total.dtype) for total, grad in zip(weight_grads, chunk_weight_grads)])

    # The weights' gradient sums over chunks in float32, so bfloat16 weights lose no precision to the sum.
    init = (jnp.zeros_like(hidden_chunks), [jnp.zeros(w.shape, jnp.promote_types(w.dtype, jnp.float32))
                                            for w in weights])
    hidden_grads, weight_grads = jax.lax.fori_loop(0, num_chunks, chunk, init)
    return (None, hidden_grads, None, *(grad.astype(w.dtype) for grad, w in zip(weight_grads, weights)))


_scored_chunk_logps.defvjp(_scored_chunk_logps_fwd, _scored_chunk_logps_bwd)


def desensitized_sequence_logps(chosen_token_logps: Array, chosen_mask: Array, rejected_token_logps: Array,
                                rejected_mask: Array, *, ld_alpha: float) -> Tuple[Array, Array]:
    """LD-DPO's sequence scores of a pair: (chosen, rejected) [batch] float32 from per-token log-probs.

    LD-DPO (Liu et al. 2024, arXiv:2409.06411) damps the excess length of the longer response:
    log p~(y) = sum_{t <= l_p} log p(y_t) + ld_alpha * sum_{t > l_p} log p(y_t), l_p = min(|y_w|, |y_l|),
    t counting response tokens. Apply it to the policy's and the reference's per-token log-probs
    (`token_logps`) alike and pass the results to `preference_loss` (loss_type="sigmoid" is LD-DPO
    proper; any variant takes them). ld_alpha = 1 is plain summation; the paper uses 0.2 to 0.8.
    """
    if not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must be in [0, 1], got ld_alpha={ld_alpha}")
    chosen_mask = chosen_mask.astype(jnp.float32)
    rejected_mask = rejected_mask.astype(jnp.float32)
    shared_length = jnp.minimum(chosen_mask.sum(-1), rejected_mask.sum(-1))[:, None]

    def desensitize(per_token_logps, mask):
        response_position = jnp.cumsum(mask, axis=-1)  # 1, 2, ... over the response tokens
        weights = jnp.where(response_position <= shared_length, 1.0, ld_alpha) * mask
        return jnp.sum(per_token_logps.astype(jnp.float32) * weights, axis=-1)

    return desensitize(chosen_token_logps, chosen_mask), desensitize(rejected_token_logps, rejected_mask)


def sequence_kl(policy_logits: Array, reference_logits: Array, loss_mask: Array) -> Array:
    """Exact KL(policy || reference) of the next-token distributions, summed over masked positions: [batch]."""
    policy_logp = jax.nn.log_softmax(policy_logits.astype(jnp.float32), axis=-1)
    reference_logp = jax.nn.log_softmax(reference_logits.astype(jnp.float32), axis=-1)
    per_token = jnp.sum(jnp.exp(policy_logp) * (policy_logp - reference_logp), axis=-1)
    return jnp.sum(per_token * loss_mask.astype(jnp.float32), axis=-1)


# ---------------------------------------------------------------------------------------------
# The pair scores variants share
# ---------------------------------------------------------------------------------------------

F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def _f_divergence_scores(logratios: Array, f_divergence_type: str, f_alpha: float) -> Array:
    """f'(u) - f'(1) at u = pi / pi_ref: f-DPO's per-response score (Wang et al. 2023, arXiv:2309.16240).

    reverse KL log u (DPO); forward KL 1 - 1/u; Jensen-Shannon log(2u / (1 + u)); alpha-divergence
    (1 - u^-alpha) / alpha, between reverse KL (alpha -> 0) and forward KL (alpha = 1). Shifted so that
    a response as likely as under the reference scores 0 under every divergence, which matters to
    the variants that score chosen and rejected separately (nca_pair, bco_pair, sppo_hard, apo_*).
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1.0 - _capped_exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + jax.nn.log_sigmoid(logratios)
    return (1.0 - _capped_exp(-f_alpha * logratios)) / f_alpha


@dataclasses.dataclass(frozen=True)
class _Pair:
    """A batch of preference pairs as float32 [batch] arrays, and the quantities variants derive from it."""
    policy_chosen: Array
    policy_rejected: Array
    reference_chosen: Optional[Array]
    reference_rejected: Optional[Array]
    chosen_lengths: Optional[Array]
    rejected_lengths: Optional[Array]
    f_divergence_type: str
    f_alpha: float
    user: str  # who asks, for error messages: "loss_type='simpo'"

    def _lengths(self, name: str) -> Array:
        lengths = getattr(self, name)
        if lengths is None:
            raise ValueError(f"{name} is None, but {self.user} needs it (the number of response tokens, [batch])")
        return jnp.maximum(lengths, 1.0)  # an empty response must not divide by zero

    def policy_logps(self) -> Tuple[Array, Array]:
        return self.policy_chosen, self.policy_rejected

    def average_logps(self) -> Tuple[Array, Array]:
        """Per-token average policy log-probs."""
        return (self.policy_chosen / self._lengths("chosen_lengths"),
                self.policy_rejected / self._lengths("rejected_lengths"))

    def chosen_nll(self) -> Array:
        """Per-token negative log-likelihood of the chosen response (the SFT term)."""
        return -self.policy_chosen / self._lengths("chosen_lengths")

    def logratios(self) -> Tuple[Array, Array]:
        """log pi(y|x) - log pi_ref(y|x) of chosen and rejected."""
        return self.policy_chosen - self.reference_chosen, self.policy_rejected - self.reference_rejected

    def scores(self) -> Tuple[Array, Array]:
        """The log-ratios through the f-divergence (`f_divergence_type`; the identity for DPO's reverse KL)."""
        return tuple(_f_divergence_scores(logratios, self.f_divergence_type, self.f_alpha)
                     for logratios in self.logratios())

    def normalized_scores(self) -> Tuple[Array, Array]:
        chosen, rejected = self.scores()
        return chosen / self._lengths("chosen_lengths"), rejected / self._lengths("rejected_lengths")

    def margins(self) -> Array:
        chosen, rejected = self.scores()
        return chosen - rejected


def _logistic(margins: Array, label_smoothing: float) -> Array:
    """-(1 - eps) log sigmoid(m) - eps log sigmoid(-m): the Bradley-Terry NLL with labels flipped w.p. eps."""
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(margins) - label_smoothing * jax.nn.log_sigmoid(-margins)


def _check_option(condition: bool, name: str, value, requirement: str):
    if not condition:
        raise ValueError(f"{name} must be {requirement}, got {name}={value!r}")


# ---------------------------------------------------------------------------------------------
# Preference losses. Notation: c, r = scores of chosen and rejected (log pi/pi_ref, through the
# f-divergence), m = c - r, b = beta, eps = label_smoothing, |y| = response tokens.
# Signature: (pair, beta[, label_smoothing][, *, options with defaults]) -> losses [batch].
# ---------------------------------------------------------------------------------------------

def _sigmoid(pair: _Pair, beta: float, label_smoothing: float) -> Array:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290): -log sigmoid(b m).

    With eps > 0, conservative DPO (cDPO; Mitchell 2023, "A note on DPO with noisy preferences"):
    -(1 - eps) log sigmoid(b m) - eps log sigmoid(-b m).
    """
    return _logistic(beta * pair.margins(), label_smoothing)


def _robust(pair: _Pair, beta: float, label_smoothing: float) -> Array:
    """Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409), unbiased under label noise eps:

    [-(1 - eps) log sigmoid(b m) + eps log sigmoid(-b m)] / (1 - 2 eps).
    """
    margins = beta * pair.margins()
    return (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(margins)
            + label_smoothing * jax.nn.log_sigmoid(-margins)) / (1.0 - 2.0 * label_smoothing)


def _hinge(pair: _Pair, beta: float) -> Array:
    """SLiC-HF hinge (Zhao et al. 2023, arXiv:2305.10425): max(0, 1 - b m)."""
    return jax.nn.relu(1.0 - beta * pair.margins())


def _ipo(pair: _Pair, beta: float, *, ipo_length_normalize: bool = True) -> Array:
    """IPO (Azar et al. 2023, arXiv:2310.12036): (m - 1 / (2 b))^2.

    By default c and r are per-token averages (c / |y_w|, r / |y_l|), as in TRL and as the IPO
    authors ran it: with summed log-ratios the target 1 / (2 b) means a different thing for every
    response length. `ipo_length_normalize=False` gives the paper's formula on summed log-ratios.
    """
    _check_option(isinstance(ipo_length_normalize, bool), "ipo_length_normalize", ipo_length_normalize, "a bool")
    chosen, rejected = pair.normalized_scores() if ipo_length_normalize else pair.scores()
    return (chosen - rejected - 1.0 / (2.0 * beta)) ** 2


# EXO's KL needs a target probability eps > 0 for the rejected response; 1e-3 is the paper's choice
# and TRL's fallback when label_smoothing is 0.
_EXO_DEFAULT_EPSILON = 1e-3


def _exo_pair(pair: _Pair, beta: float, label_smoothing: float) -> Array:
    """EXO, pairwise (Ji et al. 2024, arXiv:2402.00856): KL(softmax(b c, b r) || (1 - eps, eps)).

    = s(b m) [log s(b m) - log(1 - eps)] + s(-b m) [log s(-b m) - log eps], s = sigmoid;
    eps = label_smoothing, or 1e-3 when it is 0.
    """
    epsilon = label_smoothing or _EXO_DEFAULT_EPSILON
    margins = beta * pair.margins()
    return (jax.nn.sigmoid(margins) * (jax.nn.log_sigmoid(margins) - math.log1p(-epsilon))
            + jax.nn.sigmoid(-margins) * (jax.nn.log_sigmoid(-margins) - math.log(epsilon)))


def _nca_pair(pair: _Pair, beta: float) -> Array:
    """NCA, pairwise (Chen et al. 2024, arXiv:2402.05369): -log s(b c) - 1/2 log s(-b c) - 1/2 log s(-b r)."""
    chosen, rejected = pair.scores()
    return (-jax.nn.log_sigmoid(beta * chosen) - 0.5 * jax.nn.log_sigmoid(-beta * chosen)
            - 0.5 * jax.nn.log_sigmoid(-beta * rejected))


def _bco_pair(pair: _Pair, beta: float) -> Array:
    """BCO, pairwise (Jung et al. 2024, arXiv:2404.04656): -log s(b c) - log s(-b r).

    Without the paper's running-mean reward shift, which is state across steps (TRL drops it too).
    """
    chosen, rejected = pair.scores()
    return -jax.nn.log_sigmoid(beta * chosen) - jax.nn.log_sigmoid(-beta * rejected)


def _sppo_hard(pair: _Pair, beta: float) -> Array:
    """SPPO with hard win probabilities (Wu et al. 2024, arXiv:2405.00675): (c - 1/(2b))^2 + (r + 1/(2b))^2."""
    chosen, rejected = pair.scores()
    return (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2


def _aot(pair: _Pair, beta: float, label_smoothing: float) -> Array:
    """AOT, paired (Melnyk et al. 2024, arXiv:2406.05882): cDPO on sorted margins.

    -(1 - eps) log s(b d) - eps log s(-b d), d = sort(log pi(y_w) - log pi(y_l)) - sort(log pi_ref(y_w) -
    log pi_ref(y_l)), sorted over the batch: first-order stochastic dominance of the policy's margins.
    Couples the examples of a batch (of a shard, under shard_map / pmap).
    """
    policy = jnp.sort(pair.policy_chosen - pair.policy_rejected)
    reference = jnp.sort(pair.reference_chosen - pair.reference_rejected)
    return _logistic(beta * (policy - reference), label_smoothing)


def _aot_unpaired(pair: _Pair, beta: float, label_smoothing: float) -> Array:
    """AOT, unpaired (Melnyk et al. 2024, arXiv:2406.05882): cDPO on d = sort(c) - sort(r) over the batch.

    Uses the plain log-ratios c, r; couples the examples of a batch like `aot`.
    """
    chosen, rejected = pair.logratios()
    return _logistic(beta * (jnp.sort(chosen) - jnp.sort(rejected)), label_smoothing)


def _apo_zero(pair: _Pair, beta: float) -> Array:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266): 1 - s(b c) + s(b r).

    For chosen responses better than the model's own: push chosen up and rejected down.
    """
    chosen, rejected = pair.scores()
    return jax.nn.sigmoid(-beta * chosen) + jax.nn.sigmoid(beta * rejected)


def _apo_down(pair: _Pair, beta: float) -> Array:
    """APO-down (D'Oosterlinck et al. 2024, arXiv:2408.06266): s(b c) + 1 - s(b (c - r)).

    For chosen responses worse than the model's own: push both down, rejected more.
    """
    chosen, rejected = pair.scores()
    return jax.nn.sigmoid(beta * chosen) + jax.nn.sigmoid(-beta * (chosen - rejected))


def _discopop(pair: _Pair, beta: float, *, discopop_tau: float = 0.05) -> Array:
    """DiscoPOP / log-ratio modulated loss (Lu et al. 2024, arXiv:2406.08414), x = b m:

    (1 - s(x / tau)) (-log s(x)) + s(x / tau) exp(-x); the paper's tau is 0.05.
    """
    _check_option(isinstance(discopop_tau, numbers.Real) and discopop_tau > 0, "discopop_tau", discopop_tau, "> 0")
    margins = beta * pair.margins()
    logistic = -jax.nn.log_sigmoid(margins)
    # exp(-x) * s(x / tau) in log space, so a vanishing mixing weight never meets an overflowing exp.
    exponential = _capped_exp(-margins + jax.nn.log_sigmoid(margins / discopop_tau))
    return jax.nn.sigmoid(-margins / discopop_tau) * logistic + exponential


def _sigmoid_norm(pair: _Pair, beta: float, label_smoothing: float) -> Array:
    """Length-normalised DPO (Tulu 3, Lambert et al. 2024, arXiv:2411.15124): -log s(b (c / |y_w| - r / |y_l|)).

    (cDPO form with eps > 0.) Removes DPO's pull towards longer responses.
    """
    chosen, rejected = pair.normalized_scores()
    return _logistic(beta * (chosen - rejected), label_smoothing)


def _simpo(pair: _Pair, beta: float, label_smoothing: float, *, simpo_gamma: float = 0.5) -> Array:
    """SimPO (Meng et al. 2024, arXiv:2405.14734), reference-free and length-normalised:

    -log s(b (log pi(y_w) / |y_w| - log pi(y_l) / |y_l|) - gamma), gamma = `simpo_gamma`, a target
    reward margin (cDPO form with eps > 0). The paper's beta is 2 to 10, far above DPO's 0.1: set it.
    """
    _check_option(isinstance(simpo_gamma, numbers.Real) and math.isfinite(simpo_gamma), "simpo_gamma", simpo_gamma,
                  "a finite number")
    chosen, rejected = pair.average_logps()
    return _logistic(beta * (chosen - rejected) - simpo_gamma, label_smoothing)


# Average log-probs are capped just below 0 for ORPO's odds p / (1 - p), which are infinite at p = 1.
_MAX_AVERAGE_LOGP = -1e-6


def _log_odds(average_logps: Array) -> Array:
    """log(p / (1 - p)) of p = exp(average log-prob), with log(1 - p) computed stably on either side of 1/2."""
    a = jnp.minimum(average_logps, _MAX_AVERAGE_LOGP)
    return a - log1m_exp(a)


def _orpo(pair: _Pair, beta: float) -> Array:
    """ORPO (Hong et al. 2024, arXiv:2403.07691), reference-free, SFT plus an odds-ratio term:

    NLL(y_w) / |y_w| - b log s(log odds(y_w) - log odds(y_l)), odds(y) = p / (1 - p) with
    p = exp(log pi(y) / |y|); beta plays the paper's lambda (0.1 there), as in TRL.
    """
    chosen, rejected = pair.average_logps()
    return pair.chosen_nll() - beta * jax.nn.log_sigmoid(_log_odds(chosen) - _log_odds(rejected))


def _sft(pair: _Pair, beta: float) -> Array:
    """Supervised term: NLL(y_w) / |y_w|, the per-token NLL of the chosen response (beta unused).

    For mixtures such as MPO (Wang et al. 2024, arXiv:2411.10442): loss_type=("sigmoid", "bco_pair", "sft").
    """
    del beta  # every variant takes beta; this one has no use for it
    return pair.chosen_nll()


def _rpo(pair: _Pair, beta: float, label_smoothing: float, *, rpo_alpha: float = 1.0) -> Array:
    """RPO / DPO+NLL (Pang et al. 2024, arXiv:2404.19733): -log s(b m) + alpha NLL(y_w) / |y_w|.

    alpha = `rpo_alpha` (1 in the paper, which divides the NLL by prompt plus response length; here by
    the response's own tokens, TRL by all chosen tokens of the batch); cDPO form with eps > 0.
    """
    _check_option(isinstance(rpo_alpha, numbers.Real) and rpo_alpha >= 0, "rpo_alpha", rpo_alpha, ">= 0")
    return _sigmoid(pair, beta, label_smoothing) + rpo_alpha * pair.chosen_nll()


def _sigmoid_ref_free(pair: _Pair, beta: float, label_smoothing: float) -> Array:
    """Reference-free DPO (Rafailov et al. 2023, arXiv:2305.18290, with a uniform reference):

    -log s(b (log pi(y_w) - log pi(y_l))) (cDPO form with eps > 0); TRL's `reference_free=True`.
    """
    chosen, rejected = pair.policy_logps()
    return _logistic(beta * (chosen - rejected), label_smoothing)


@dataclasses.dataclass(frozen=True)
class LossVariant:
    """A registered preference loss. Its options are the keyword-only parameters of `function`."""
    function: Callable[..., Array]
    # Reference-free variants: the policy-only stand-in for the log-ratios, used for rewards/* when
    # no reference is given. None: the variant needs reference log-probs.
    reference_free_logratios: Optional[Callable[[_Pair], Tuple[Array, Array]]] = None
    # Its scores are log-ratios that `f_divergence_type` may replace.
    takes_f_divergence: bool = True

    @property
    def options(self) -> Dict[str, object]:
        parameters = inspect.signature(self.function).parameters.values()
        return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}

    @property
    def uses_label_smoothing(self) -> bool:
        return "label_smoothing" in inspect.signature(self.function).parameters


# loss_type -> variant.
LOSS_FUNCTIONS: Dict[str, LossVariant] = {
    "sigmoid": LossVariant(_sigmoid),
    "robust": LossVariant(_robust),
    "hinge": LossVariant(_hinge),
    "ipo": LossVariant(_ipo),
    "exo_pair": LossVariant(_exo_pair),
    "nca_pair": LossVariant(_nca_pair),
    "bco_pair": LossVariant(_bco_pair),
    "sppo_hard": LossVariant(_sppo_hard),
    "aot": LossVariant(_aot, takes_f_divergence=False),
    "aot_unpaired": LossVariant(_aot_unpaired, takes_f_divergence=False),
    "apo_zero": LossVariant(_apo_zero),
    "apo_down": LossVariant(_apo_down),
    "discopop": LossVariant(_discopop),
    "sigmoid_norm": LossVariant(_sigmoid_norm),
    "simpo": LossVariant(_simpo, reference_free_logratios=_Pair.average_logps, takes_f_divergence=False),
    "orpo": LossVariant(_orpo, reference_free_logratios=_Pair.average_logps, takes_f_divergence=False),
    "rpo": LossVariant(_rpo),
    "sigmoid_ref_free": LossVariant(_sigmoid_ref_free, reference_free_logratios=_Pair.policy_logps,
                                    takes_f_divergence=False),
    "sft": LossVariant(_sft, reference_free_logratios=_Pair.policy_logps, takes_f_divergence=False),
}
LOSS_TYPES = tuple(LOSS_FUNCTIONS)


def uses_reference(loss_type: Union[str, Sequence[str]]) -> bool:
    """Whether `loss_type` (one or a mixture) reads reference log-probs: False when every term is
    reference-free (simpo, orpo, sigmoid_ref_free, sft), which then needs no reference model."""
    loss_types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    return any(LOSS_FUNCTIONS[name].reference_free_logratios is None for name in loss_types)


def _wpo_weights(pair: _Pair) -> Array:
    """WPO (Zhou et al. 2024, arXiv:2406.11827), eq. 2: w = exp(log pi(y_w) / |y_w| + log pi(y_l) / |y_l|), no gradient.

    Re-weights off-policy pairs towards those the current policy would itself generate. Capped at
    1, the weight of a certain pair, so that inputs that are not log-probabilities cannot overflow.
    """
    chosen, rejected = pair.average_logps()
    return jax.lax.stop_gradient(jnp.exp(jnp.minimum(chosen + rejected, 0.0)))


# ---------------------------------------------------------------------------------------------
# preference_loss
# ---------------------------------------------------------------------------------------------

def _loss_terms(loss_type, loss_weights) -> Tuple[Tuple[str, ...], Tuple[float, ...]]:
    """(loss types, weights) of a single `loss_type` or a tuple of them."""
    if isinstance(loss_type, str):
        loss_types = (loss_type,)
    else:
        loss_types = tuple(loss_type) if isinstance(loss_type, (tuple, list)) else ()
    if not loss_types or any(name not in LOSS_FUNCTIONS for name in loss_types):
        raise ValueError(f"loss_type={loss_type!r} is not one of {LOSS_TYPES} or a tuple of them")
    if loss_weights is None:
        return loss_types, (1.0,) * len(loss_types)
    loss_weights = tuple(loss_weights) if isinstance(loss_weights, (tuple, list)) else (loss_weights,)
    if len(loss_weights) != len(loss_types) or not all(
            isinstance(weight, numbers.Real) and math.isfinite(weight) for weight in loss_weights):
        raise ValueError(f"loss_weights={loss_weights!r} must be one finite number per loss type of "
                         f"loss_type={loss_type!r}")
    return loss_types, loss_weights


def _check_arrays(arrays: Dict[str, Optional[Array]]):
    """All given arrays are [batch], of the shape of the first."""
    first_name, first = next(iter(arrays.items()))
    shape = jnp.shape(first)
    if len(shape) != 1:
        raise ValueError(f"{first_name} must be [batch], got shape {shape}")
    for name, array in arrays.items():
        if array is not None and jnp.shape(array) != shape:
            raise ValueError(f"{name} has shape {jnp.shape(array)}, expected {shape} like {first_name}")


def _check_options(loss_types, options, f_divergence_type, f_alpha, use_weighting):
    variants = [LOSS_FUNCTIONS[name] for name in loss_types]
    accepted = {option for variant in variants for option in variant.options}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for loss_type={loss_types}; its own options are "
                         f"{sorted(accepted)}, and loss_weights, use_weighting, f_divergence_type, f_alpha")
    if f_divergence_type is not None:
        _check_option(f_divergence_type in F_DIVERGENCE_TYPES, "f_divergence_type", f_divergence_type,
                      f"one of {F_DIVERGENCE_TYPES}")
        if not any(variant.takes_f_divergence for variant in variants):
            raise ValueError(f"f_divergence_type is not used by loss_type={loss_types} (it has no reference "
                             f"log-ratio scores)")
    if f_alpha is not None:
        _check_option(f_divergence_type == "alpha_divergence", "f_divergence_type", f_divergence_type,
                      "'alpha_divergence' when f_alpha is set")
        _check_option(isinstance(f_alpha, numbers.Real) and 0 < f_alpha < 1, "f_alpha", f_alpha, "in (0, 1)")
    _check_option(isinstance(use_weighting, bool), "use_weighting", use_weighting, "a bool")


def preference_loss(policy_chosen_logps: Array, policy_rejected_logps: Array,
                    reference_chosen_logps: Optional[Array], reference_rejected_logps: Optional[Array],
                    *, loss_type: Union[str, Sequence[str]] = "sigmoid", beta: float = 0.1,
                    label_smoothing: float = 0.0, chosen_lengths: Optional[Array] = None,
                    rejected_lengths: Optional[Array] = None, **variant_options):
    """Per-example preference losses [batch] float32 and a dict of scalar metrics.

    Inputs are summed response log-probs [batch] (`sequence_logps`); the reference ones may be None
    for reference-free loss types (simpo, orpo, sigmoid_ref_free, sft). `chosen_lengths` and
    `rejected_lengths` are the response token counts [batch], needed by the length-normalised
    variants. The caller takes the mean of the losses, so masking and weighting stay theirs.

    `loss_type` is one of `LOSS_TYPES`, or a tuple of them whose losses are summed with
    `loss_weights` (default all 1), as in mixed preference optimisation. `variant_options` are the
    options of the chosen loss types (static Python values): `ipo_length_normalize`, `simpo_gamma`,
    `rpo_alpha`, `discopop_tau`, and for every loss type `loss_weights` and `use_weighting` (WPO),
    and for those scoring log-ratios `f_divergence_type` (f-DPO; reverse_kl, the default, is DPO)
    and `f_alpha` (alpha_divergence, default 0.5). An unknown option raises ValueError naming it.

    Metrics use the TRL names: `rewards/chosen` and `rewards/rejected` are the implicit rewards
    beta * (log pi - log pi_ref) averaged over the batch; without references, beta * log pi of the
    first loss type's own implicit reward (the per-token average log-prob for simpo and orpo).
    `rewards/accuracies` is the fraction of pairs whose chosen reward is higher (a tie counts one
    half, so a policy equal to its reference scores 0.5, chance), `rewards/margins` the mean reward
    difference, `logps/*` the mean policy log-probs.
    """
    loss_types, loss_weights = _loss_terms(loss_type, variant_options.pop("loss_weights", None))
    f_divergence_type = variant_options.pop("f_divergence_type", None)
    f_alpha = variant_options.pop("f_alpha", None)
    use_weighting = variant_options.pop("use_weighting", False)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got beta={beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got label_smoothing={label_smoothing}")
    if label_smoothing and not any(LOSS_FUNCTIONS[name].uses_label_smoothing for name in loss_types):
        raise ValueError(f"label_smoothing={label_smoothing} is not used by loss_type={loss_type!r}")
    _check_options(loss_types, variant_options, f_divergence_type, f_alpha, use_weighting)
    arrays = dict(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                  reference_chosen_logps=reference_chosen_logps, reference_rejected_logps=reference_rejected_logps,
                  chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    _check_arrays(arrays)
    has_reference = reference_chosen_logps is not None and reference_rejected_logps is not None
    for name in loss_types:
        if LOSS_FUNCTIONS[name].reference_free_logratios is None and not has_reference:
            missing = "reference_chosen_logps" if reference_chosen_logps is None else "reference_rejected_logps"
            raise ValueError(f"{missing} is None, but loss_type={name!r} needs a reference")

    f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
    pair = _Pair(policy_chosen=f32(policy_chosen_logps), policy_rejected=f32(policy_rejected_logps),
                 reference_chosen=f32(reference_chosen_logps), reference_rejected=f32(reference_rejected_logps),
                 chosen_lengths=f32(chosen_lengths), rejected_lengths=f32(rejected_lengths),
                 f_divergence_type=f_divergence_type or "reverse_kl", f_alpha=f_alpha or 0.5,
                 user="preference_loss")
    losses = jnp.zeros_like(pair.policy_chosen)
    for name, weight in zip(loss_types, loss_weights):
        variant = LOSS_FUNCTIONS[name]
        smoothing = {"label_smoothing": label_smoothing} if variant.uses_label_smoothing else {}
        options = {key: value for key, value in variant_options.items() if key in variant.options}
        losses = losses + weight * variant.function(dataclasses.replace(pair, user=f"loss_type={name!r}"), beta,
                                                    **smoothing, **options)
    if use_weighting:
        losses = losses * _wpo_weights(dataclasses.replace(pair, user="use_weighting=True"))

    if has_reference:
        chosen_logratios, rejected_logratios = pair.logratios()
    else:
        chosen_logratios, rejected_logratios = LOSS_FUNCTIONS[loss_types[0]].reference_free_logratios(
            dataclasses.replace(pair, user=f"the rewards of loss_type={loss_types[0]!r}"))
    metrics = {
        **_reward_metrics(beta * chosen_logratios, beta * rejected_logratios),
        "logps/chosen": jax.lax.stop_gradient(pair.policy_chosen).mean(),
        "logps/rejected": jax.lax.stop_gradient(pair.policy_rejected).mean(),
    }
    return losses, metrics


# ---------------------------------------------------------------------------------------------
# KTO: unpaired data
# ---------------------------------------------------------------------------------------------

def masked_mean(values: Array, mask: Array) -> Array:
    """The mean of `values` where `mask` is 1 (0 when the mask is empty)."""
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def kto_loss(policy_logps: Array, reference_logps: Array, desirable: Array, policy_kl_logps: Array,
             reference_kl_logps: Array, *, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0, axis_name: Optional[str] = None):
    """KTO (Ethayarajh et al. 2024, arXiv:2402.01306) on unpaired examples: losses [batch] float32 and metrics.

    loss = w_D (1 - s(b (r - z))) for a desirable example, w_U (1 - s(b (z - r))) for an undesirable
    one, with r = log pi(y|x) - log pi_ref(y|x) and the reference point
    z = max(0, mean over the batch of log pi(y'|x) - log pi_ref(y'|x)), without gradient: a KL
    estimate from mismatched completions y' (each prompt scored with another example's response),
    whose log-probs are `policy_kl_logps` and `reference_kl_logps`. All arrays are [batch]; `desirable`
    is bool (or 0/1). With `axis_name`, z is averaged over that mapped axis too (pmap / shard_map
    data axis), so every shard uses the global-batch estimate, as TRL gathers it across processes.

    Metrics: `rewards/chosen` and `rewards/rejected` are the mean rewards b r of the desirable and
    undesirable examples, `rewards/margins` their difference, `logps/*` likewise, and `kl` is z.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got beta={beta}")
    for name, weight in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        _check_option(isinstance(weight, numbers.Real) and weight > 0, name, weight, "> 0")
    _check_arrays(dict(policy_logps=policy_logps, reference_logps=reference_logps, desirable=desirable,
                       policy_kl_logps=policy_kl_logps, reference_kl_logps=reference_kl_logps))
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    logratios = f32(policy_logps) - f32(reference_logps)
    kl = jnp.mean(f32(policy_kl_logps) - f32(reference_kl_logps))
    if axis_name is not None:
        kl = jax.lax.pmean(kl, axis_name)
    kl = jax.lax.stop_gradient(jnp.maximum(kl, 0.0))
    is_desirable = f32(desirable) > 0
    losses = jnp.where(is_desirable, desirable_weight * jax.nn.sigmoid(-beta * (logratios - kl)),
                       undesirable_weight * jax.nn.sigmoid(-beta * (kl - logratios)))

    rewards = jax.lax.stop_gradient(beta * logratios)
    logps = jax.lax.stop_gradient(f32(policy_logps))
    desirable_mask, undesirable_mask = is_desirable.astype(jnp.float32), (~is_desirable).astype(jnp.float32)
    metrics = {
        "rewards/chosen": masked_mean(rewards, desirable_mask),
        "rewards/rejected": masked_mean(rewards, undesirable_mask),
        "logps/chosen": masked_mean(logps, desirable_mask),
        "logps/rejected": masked_mean(logps, undesirable_mask),
        "kl": kl,
    }
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return losses, metrics


# ---------------------------------------------------------------------------------------------
# The DPO paper's baselines: a Bradley-Terry reward model (for PPO) and Unlikelihood
# ---------------------------------------------------------------------------------------------

def _reward_metrics(chosen_rewards: Array, rejected_rewards: Array) -> Dict[str, Array]:
    """The TRL `rewards/*` metrics of a batch of pairs' rewards [batch]: batch means, without gradient.

    `rewards/accuracies` is the share of pairs whose chosen reward is higher, a tie counting one half
    (so equal rewards score 0.5, chance, not 0).
    """
    chosen_rewards = jax.lax.stop_gradient(chosen_rewards)
    rejected_rewards = jax.lax.stop_gradient(rejected_rewards)
    wins = (chosen_rewards > rejected_rewards).astype(jnp.float32)
    ties = (chosen_rewards == rejected_rewards).astype(jnp.float32)
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (wins + 0.5 * ties).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
    }


def bradley_terry_loss(chosen_rewards: Array, rejected_rewards: Array):
    """A reward model's loss on preference pairs: per-pair losses [batch] float32 and metrics.

    loss = -log sigmoid(r_w - r_l), the negative log-likelihood of the preference under the
    Bradley-Terry model P(y_w > y_l) = sigmoid(r_w - r_l) (Bradley & Terry 1952), as reward models
    for RLHF are trained (InstructGPT, Ouyang et al. 2022, arXiv:2203.02155, eq. 1; the reward model
    of the DPO paper's PPO baseline). Computed as softplus(r_l - r_w) in float32, finite for any
    finite rewards. Rewards are [batch] scalars, e.g. a scalar head's score at each response's last
    token. Metrics: `rewards/chosen`, `rewards/rejected` (mean rewards), `rewards/accuracies`,
    `rewards/margins`, as `preference_loss` reports them for implicit rewards.
    """
    _check_arrays(dict(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards))
    chosen = jnp.asarray(chosen_rewards, jnp.float32)
    rejected = jnp.asarray(rejected_rewards, jnp.float32)
    return jax.nn.softplus(rejected - chosen), _reward_metrics(chosen, rejected)


# log1m_exp's largest input: log(1 - e^x) -> -inf and its derivative -e^x / (1 - e^x) -> -inf as
# x -> 0, i.e. as a probability reaches 1, which float32 log-softmax returns exactly (log-prob 0)
# for a confident enough model. Capped here, log(1 - p) >= log(1e-6) ~ -13.8 and the derivative
# is at most ~1e6 in magnitude, so one certain token cannot make a loss or its gradient inf / NaN;
# past the cap the gradient is zero (Welleck et al.'s code likewise clamps 1 - p at 1e-5).
_MAX_LOG1M_EXP_INPUT = -1e-6


def log1m_exp(x: Array) -> Array:
    """log(1 - e^x) for x <= 0 (e.g. log(1 - p) from a log-prob), float32, finite for every input.

    Stable on both sides of x = -log 2 (Maechler 2012, "Accurately computing log(1 - exp(-|a|))"):
    log(-expm1(x)) near 0, where 1 - e^x would cancel, log1p(-e^x) below, where e^x is small.
    Inputs above `_MAX_LOG1M_EXP_INPUT` (including x > 0, not a log-probability) are clamped to it.
    """
    x = jnp.minimum(jnp.asarray(x, jnp.float32), _MAX_LOG1M_EXP_INPUT)
    return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def unlikelihood_loss(chosen_logps: Array, rejected_log_one_minus: Array, chosen_lengths: Array,
                      rejected_lengths: Array, *, alpha: float, rejected_logps: Optional[Array] = None):
    """Unlikelihood training on preference pairs: per-pair losses [batch] float32 and metrics.

    loss = NLL(y_w) / |y_w| - alpha / |y_l| * sum_t log(1 - p(y_l,t | x, y_l,<t)): likelihood on the
    chosen response and token-level unlikelihood on the rejected one (Welleck et al. 2019,
    arXiv:1908.04319), each averaged over its tokens; a baseline of the DPO paper (Rafailov et al.
    2023, arXiv:2305.18290, sec. 6), alpha in [0, 1] there.

    chosen_logps: summed log-probs of the chosen responses; rejected_log_one_minus: sums of
    log(1 - p) over the rejected responses' tokens (`log1m_exp` of their per-token log-probs);
    chosen_lengths, rejected_lengths: response token counts; all [batch]. Metrics: `nll` (the chosen
    per-token NLL), `unlikelihood` (-sum log(1 - p) / |y_l|), `logps/chosen` and, given the summed
    `rejected_logps`, `logps/rejected` (batch means).
    """
    _check_option(isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha >= 0, "alpha", alpha,
                  "a finite number >= 0")
    _check_arrays(dict(chosen_logps=chosen_logps, rejected_log_one_minus=rejected_log_one_minus,
                       chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                       rejected_logps=rejected_logps))
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    # An empty response (a packed batch's unused pair slot) must not divide by zero.
    nll = -f32(chosen_logps) / jnp.maximum(f32(chosen_lengths), 1.0)
    unlikelihood = -f32(rejected_log_one_minus) / jnp.maximum(f32(rejected_lengths), 1.0)
    metrics = {"nll": nll.mean(), "unlikelihood": unlikelihood.mean(), "logps/chosen": f32(chosen_logps).mean()}
    if rejected_logps is not None:
        metrics["logps/rejected"] = f32(rejected_logps).mean()
    return nll + alpha * unlikelihood, jax.tree.map(jax.lax.stop_gradient, metrics)
