"""Scalar-head models: the decoder's trunk plus a linear head, one number per token.

Reward models (Bradley-Terry, read at a sequence's last token) and PPO's value model are this model.
Its parameters are `{"decoder": <decoder params>, "head": {"kernel": [embed, 1], "bias": [1]}}`, so a
reward model starts from an SFT model's decoder parameters with a fresh head, and the decoder part
exports like any decoder.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dpo_jax.models.transformer import Decoder, DecoderConfig, Dense


class ScalarModel(nnx.Module):
    """`model(input_ids, positions=None, segment_ids=None, *, branch_ids=None, mask=None) -> [batch, time]`
    float32 scores (arguments as `transformer.Decoder.__call__`)."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        self.decoder = Decoder(config, rngs=rngs)
        # A small head, so a fresh reward or value model starts near zero (std 1/sqrt(width + 1), as TRL).
        self.head = Dense(config.embed_dim, 1, ("embed", None), use_bias=True, config=config, rngs=rngs,
                          stddev=1.0 / math.sqrt(config.embed_dim + 1))

    def __call__(self, input_ids, positions=None, segment_ids=None, *, branch_ids=None, mask=None):
        hidden = self.decoder.features(input_ids, positions, segment_ids, branch_ids=branch_ids, mask=mask)
        return self.head(hidden)[..., 0].astype(jnp.float32)


def abstract_scalar_model(config: DecoderConfig):
    """(graphdef, abstract params, logical partition specs) of the scalar model, nothing allocated."""
    model = nnx.eval_shape(lambda: ScalarModel(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(state), nnx.to_pure_dict(nnx.get_partition_spec(state))


def init_scalar_params(config: DecoderConfig, decoder_params, *, seed, shardings=None):
    """Scalar-model parameters: `decoder_params` (e.g. the SFT model's) under a fresh head from `seed`."""
    head = jax.jit(lambda: nnx.to_pure_dict(nnx.state(ScalarModel(config, rngs=nnx.Rngs(seed)), nnx.Param))["head"],
                   out_shardings=None if shardings is None else shardings["head"])()
    return {"decoder": decoder_params, "head": head}


def apply_scalar(graphdef, params, input_ids, positions=None, segment_ids=None, *, branch_ids=None, mask=None):
    """Scores [batch, time] float32 of the scalar model `graphdef` with `params`; a pure function."""
    return nnx.merge(graphdef, params)(input_ids, positions=positions, segment_ids=segment_ids,
                                       branch_ids=branch_ids, mask=mask)


def last_token_scores(scores, sequence_ids, num_sequences):
    """Each sequence's score at its last token: [rows, time] scores and `sequence_ids` (the sequence
    slot of each token, -1 for none) -> [rows, num_sequences]; 0 for a slot with no token."""
    slots = sequence_ids[:, :, None] == jnp.arange(num_sequences)                    # [rows, time, slots]
    last = jnp.max(jnp.where(slots, jnp.arange(scores.shape[1])[None, :, None], -1), axis=1)  # [rows, slots]
    picked = jnp.take_along_axis(scores, jnp.maximum(last, 0), axis=1)
    return jnp.where(last >= 0, picked, 0.0)
