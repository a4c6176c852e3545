"""Batched generation with a KV cache: greedy, temperature, top-k, top-p, EOS stop, per-sequence RNG.

    result = generate(graphdef, params, prompt_ids, prompt_lengths, rng=jax.random.key(0),
                      max_new_tokens=128, temperature=0.7, top_p=0.9, eos_ids=tokenizer.eos_ids)
    result.tokens[i, :result.lengths[i]]   # the completion of prompt i (EOS included)

Prompts come right-padded (tokens first, as the data layouts make them) and are left-aligned inside,
so every sequence writes its next token into the same cache slot. The prompt width is rounded up to
a multiple of `length_bucket`, so one compiled program serves every batch of that bucket. The
decode loop is a `lax.while_loop` that stops as soon as every sequence has ended.

Sequence i draws its token t with `fold_in(key_i, t)`: its sample depends on its own key only, not
on the rest of the batch.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpo_jax.models.transformer import init_cache


class Generation(NamedTuple):
    tokens: jax.Array   # [batch, max_new_tokens] int32; pad_id after the end
    lengths: jax.Array  # [batch] int32: tokens generated, the EOS included
    logps: jax.Array    # [batch, max_new_tokens] float32: log p(token) under the model (temperature 1,
                        # no truncation), 0 after the end; e.g. for the KL of policy samples


def _filter_logits(logits, temperature, top_k, top_p):
    """Logits scaled by 1/temperature, with tokens outside the top-k / top-p (nucleus) set to -inf."""
    logits = logits / temperature
    if top_k:
        kth_largest = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        threshold = jnp.take_along_axis(sorted_logits, jnp.sum(keep, axis=-1, keepdims=True) - 1, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p",
                                             "eos_ids", "pad_id", "use_lora"))
def generate_traced(graphdef, params, prompt_ids, prompt_lengths, keys, *, max_new_tokens, temperature, top_k,
                    top_p, eos_ids, pad_id, use_lora):
    model = nnx.merge(graphdef, params)
    if not use_lora:
        model = nnx.view(model, use_lora=False)
    batch, width = prompt_ids.shape
    # Left-align: sequence i's last prompt token sits in slot width - 1 for every i.
    shift = width - prompt_lengths
    prompt_ids = jax.vmap(jnp.roll)(prompt_ids, shift)
    slots = jnp.arange(width)[None, :]
    segment_ids = (slots >= shift[:, None]).astype(jnp.int32)
    positions = jnp.maximum(slots - shift[:, None], 0)
    cache = init_cache(model.config, batch, width + max_new_tokens)
    logits, cache = model.decode(prompt_ids, positions, segment_ids, cache, last_only=True)
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)

    def body(state):
        step, last_logits, tokens, logps, lengths, done, cache = state
        last_logits = last_logits.astype(jnp.float32)
        if temperature == 0.0:
            token = jnp.argmax(last_logits, axis=-1).astype(jnp.int32)
        else:
            step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
            filtered = _filter_logits(last_logits, temperature, top_k, top_p)
            token = jax.vmap(jax.random.categorical)(step_keys, filtered).astype(jnp.int32)
        token_logp = jnp.take_along_axis(jax.nn.log_softmax(last_logits), token[:, None], axis=-1)[:, 0]
        token = jnp.where(done, pad_id, token)
        tokens = tokens.at[:, step].set(token)
        logps = logps.at[:, step].set(jnp.where(done, 0.0, token_logp))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, eos)
        logits, cache = model.decode(token[:, None], (prompt_lengths + step)[:, None],
                                     jnp.ones((batch, 1), jnp.int32), cache)
        return step + 1, logits[:, -1], tokens, logps, lengths, done, cache

    def cond(state):
        step, *_, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    state = (jnp.zeros((), jnp.int32), logits[:, -1], jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
             jnp.zeros((batch, max_new_tokens), jnp.float32), jnp.zeros((batch,), jnp.int32),
             jnp.zeros((batch,), bool), cache)
    _, _, tokens, logps, lengths, _, _ = jax.lax.while_loop(cond, body, state)
    return Generation(tokens, lengths, logps)


def _sequence_keys(rng, batch):
    """One key per sequence: `rng` itself when it holds `batch` keys, else `batch` keys split from it."""
    typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    num_key_axes = rng.ndim - (0 if typed else 1)  # raw uint32 keys carry a trailing axis of 2
    if num_key_axes == 0:
        return jax.random.split(rng, batch)
    if rng.shape[0] != batch:
        raise ValueError(f"rng holds {rng.shape[0]} keys for a batch of {batch} prompts")
    return rng


def generate(graphdef, params, prompt_ids, prompt_lengths, *, rng, max_new_tokens, temperature=1.0, top_k=0,
             top_p=1.0, eos_ids=(), pad_id=0, length_bucket=64, use_lora=True):
    """Samples up to `max_new_tokens` after each prompt: a `Generation` (tokens, lengths, logps).

    prompt_ids: [batch, width] int, right-padded; prompt_lengths: [batch] (each >= 1).
    rng: one key (split over the batch) or one key per sequence [batch].
    temperature: 0 is greedy; top_k: 0 is off; top_p: 1.0 is off.
    eos_ids: ids that end a sequence (e.g. `Tokenizer.eos_ids`); pad_id fills the rest.
    use_lora: False samples from the base model, adapters switched off.
    """
    prompt_ids = np.asarray(prompt_ids, np.int32)
    prompt_lengths = np.asarray(prompt_lengths, np.int32)
    batch, width = prompt_ids.shape
    if prompt_lengths.shape != (batch,) or prompt_lengths.min() < 1 or prompt_lengths.max() > width:
        raise ValueError(f"prompt_lengths must be [batch={batch}] values in [1, {width}], got {prompt_lengths}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"Need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    config = nnx.merge(graphdef, params).config
    longest = int(prompt_lengths.max()) + max_new_tokens
    if config.position_embedding == "learned" and longest > config.max_position_embeddings:
        raise ValueError(f"A prompt of {prompt_lengths.max()} tokens plus max_new_tokens={max_new_tokens} exceeds "
                         f"the model's max_position_embeddings={config.max_position_embeddings}")
    bucket = -(-width // length_bucket) * length_bucket
    prompt_ids = np.pad(prompt_ids, ((0, 0), (0, bucket - width)))
    return generate_traced(graphdef, params, jnp.asarray(prompt_ids), jnp.asarray(prompt_lengths),
                     _sequence_keys(rng, batch),
                     max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
                     top_p=float(top_p), eos_ids=tuple(int(i) for i in eos_ids), pad_id=int(pad_id),
                     use_lora=use_lora)
