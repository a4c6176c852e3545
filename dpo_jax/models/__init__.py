"""Decoder models as pure functions: a graph definition plus a params pytree (nested dict of arrays).

`train.py` never touches Flax modules directly: it asks for the abstract model (shapes and logical
axis names, nothing allocated), derives shardings from it, then asks for parameters placed with
those shardings.
"""

import jax
from flax import nnx

from dpo_jax.models.transformer import Decoder, DecoderConfig

# Parameters are created abstractly and placed by jit out_shardings, not sharded eagerly by Flax.
nnx.use_eager_sharding(False)


def abstract_model(model_config):
    """(graphdef, abstract params, logical partition specs) of `config.model`, without allocating."""
    decoder_config = DecoderConfig.from_config(model_config)
    model = nnx.eval_shape(lambda: Decoder(decoder_config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(state), nnx.to_pure_dict(nnx.get_partition_spec(state))


def init_params(model_config, *, seed, shardings):
    """Parameters of `config.model`, randomly initialised from `seed`, placed with `shardings`."""
    decoder_config = DecoderConfig.from_config(model_config)

    def create():
        model = Decoder(decoder_config, rngs=nnx.Rngs(seed))
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    return jax.jit(create, out_shardings=shardings)()


def apply(graphdef, params, input_ids, positions=None, segment_ids=None):
    """Logits [batch, time, vocab] of the model `graphdef` with `params`; a pure function."""
    return nnx.merge(graphdef, params)(input_ids, positions=positions, segment_ids=segment_ids)
