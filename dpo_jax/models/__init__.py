"""Decoder models as pure functions: a graph definition plus a params pytree (nested dict of arrays).

`train.py` never touches Flax modules directly: it asks for the abstract model (shapes and logical
axis names, nothing allocated), derives shardings from it, then asks for parameters placed with
those shardings. With `config.model.init_from_hf` the architecture and the weights come from a
Hugging Face checkpoint directory.

For users: `load_hf(path)` gives a `Decoder` module (`model(input_ids) -> logits`), `save_hf(model, out)`
writes it back in the same format, `load_tokenizer(path)` reads its tokenizer, and
`dpo_jax.models.sampling.generate` samples from it.
"""

import dataclasses
import os
import tempfile

import jax
import jax.numpy as jnp
from flax import nnx

from dpo_jax import losses, sharding, storage
from dpo_jax.models import hf, lora
from dpo_jax.models.lora import trainable_mask
from dpo_jax.models.scalar import ScalarModel, abstract_scalar_model, apply_scalar, init_scalar_params
from dpo_jax.models.tokenizer import Tokenizer, load_tokenizer
from dpo_jax.models.transformer import Decoder, DecoderConfig

__all__ = ["Decoder", "DecoderConfig", "ScalarModel", "Tokenizer", "abstract_model", "abstract_scalar_model", "apply",
           "apply_scalar", "apply_token_logps", "compute_dtype", "decoder_config", "fold_adapters", "init_params",
           "init_scalar_params", "load_hf", "load_tokenizer", "save_hf", "trainable_mask"]

# Parameters are created abstractly and placed by jit out_shardings, not sharded eagerly by Flax.
nnx.use_eager_sharding(False)


# `config.model.dtype="auto"`: bfloat16 where the matrix units compute it natively (TPU, GPU), float32
# elsewhere (on XLA:CPU a bfloat16 step is slower than a float32 one, docs/benchmarks.md, and less precise).
BFLOAT16_BACKENDS = ("tpu", "gpu")


def compute_dtype(dtype, backend=None):
    """The compute dtype `config.model.dtype` stands for on `backend` (default: `jax.default_backend()`):
    "auto" is bfloat16 on TPU and GPU, float32 on CPU; any other name is itself."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if (backend or jax.default_backend()) in BFLOAT16_BACKENDS else "float32"


def decoder_config(model_config):
    """The DecoderConfig of `config.model`, its compute dtype resolved (`compute_dtype`); with
    `init_from_hf`, its architecture is the checkpoint's."""
    path = model_config.get("init_from_hf")
    config = DecoderConfig.from_config(model_config, hf.architecture_fields(path) if path else None)
    return dataclasses.replace(config, dtype=compute_dtype(config.dtype))


def _abstract(config):
    model = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(state), nnx.to_pure_dict(nnx.get_partition_spec(state))


def abstract_model(model_config):
    """(graphdef, abstract params, logical partition specs) of `config.model`, without allocating."""
    return _abstract(decoder_config(model_config))


def _merge_trees(base, extra):
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge_trees(merged[key], value) if key in merged else value
    return merged


def _create(config, seed, variables=nnx.Param):
    """Randomly initialised `variables` of the model (a pure dict); call under jit."""
    return nnx.to_pure_dict(nnx.state(Decoder(config, rngs=nnx.Rngs(seed)), variables))


def _init(config, seed, shardings):
    if not config.init_from_hf:
        return jax.jit(lambda: _create(config, seed), out_shardings=shardings)()
    _, abstract_params, _ = _abstract(config)
    params = hf.read_params(config, config.init_from_hf, abstract_params, shardings)
    if config.lora_rank:
        # Only the adapters are outputs, so XLA drops the base weights' random initialisers.
        adapter_shardings = None if shardings is None else lora.adapters(shardings)
        adapters = jax.jit(lambda: _create(config, seed, nnx.LoRAParam), out_shardings=adapter_shardings)()
        params = _merge_trees(params, adapters)
    return params


def init_params(model_config, *, seed, shardings):
    """Parameters of `config.model` placed with `shardings` (None: one device): read from `init_from_hf`
    (each tensor straight to its shards), else randomly initialised from `seed`. LoRA adapters start
    from `seed`, with lora_b = 0 so they do not change the model until trained."""
    return _init(decoder_config(model_config), seed, shardings)


def fold_adapters(model_config, params, *, seed, shardings):
    """Merges the LoRA adapters into the kernels and starts fresh ones (lora_b = 0).

    The model is unchanged, but switching the adapters off now gives it, not the original base: so
    a LoRA stage after another (DPO after LoRA-SFT) has the previous stage's model as its reference.
    `params` is donated.
    """
    config = decoder_config(model_config)

    def fold(params):
        merged = lora.merge_adapters(params, config.lora_alpha / config.lora_rank)
        return _merge_trees(merged, _create(config, seed, nnx.LoRAParam))

    return jax.jit(fold, out_shardings=shardings, donate_argnums=0)(params)


def apply(graphdef, params, input_ids, positions=None, segment_ids=None, *, branch_ids=None, mask=None,
          use_lora=True):
    """Logits [batch, time, vocab] of the model `graphdef` with `params`; a pure function (the row
    arguments as `transformer.Decoder.__call__`).

    `use_lora=False` switches LoRA adapters off: the base model, i.e. the reference of LoRA-DPO.
    """
    model = nnx.merge(graphdef, params)
    if not use_lora:
        model = nnx.view(model, use_lora=False)
    return model(input_ids, positions=positions, segment_ids=segment_ids, branch_ids=branch_ids, mask=mask)


def apply_token_logps(graphdef, params, input_ids, loss_mask, positions=None, segment_ids=None, *, branch_ids=None,
                      mask=None, use_lora=True, with_stats=False):
    """log p(input_ids[:, t + 1] | input_ids[:, :t + 1]) [batch, time - 1] float32 where
    `loss_mask[:, t + 1]` is set, 0 elsewhere; a pure function (arguments as `apply`). `with_stats`:
    (log-probs, the prediction statistics of `losses.token_logps_and_stats`, zeroed the same way).

    With the model's `logits_chunk_size > 0`, logits exist only for the scored tokens, a chunk at a
    time (`losses.scored_token_logps`); with 0, the full logits are computed and the unscored
    positions are zeroed.
    """
    model = nnx.merge(graphdef, params)
    if not use_lora:
        model = nnx.view(model, use_lora=False)
    labels, scored = input_ids[:, 1:], loss_mask[:, 1:]
    chunk_size = model.config.logits_chunk_size
    if chunk_size:
        hidden = model.features(input_ids, positions=positions, segment_ids=segment_ids, branch_ids=branch_ids,
                                mask=mask)
        return losses.scored_token_logps(hidden[:, :-1], labels, scored, model.unembedding(), chunk_size=chunk_size,
                                         with_stats=with_stats)
    logits = model(input_ids, positions=positions, segment_ids=segment_ids, branch_ids=branch_ids, mask=mask)
    zeroed = lambda values: jnp.where(scored > 0, values, 0.0)
    if with_stats:
        logps, stats = losses.token_logps_and_stats(logits[:, :-1], labels)
        return zeroed(logps), {name: zeroed(values) for name, values in stats.items()}
    return zeroed(losses.token_logps(logits[:, :-1], labels))


def load_hf(path, dtype="float32", *, param_dtype=None, lora_config=None, mesh=None):
    """The Hugging Face model in directory `path` as a `Decoder` (`model(input_ids) -> logits`).

    dtype: compute dtype; param_dtype: storage dtype (default: dtype).
    lora_config: {"rank", "alpha", "targets"} to add fresh (zero-effect) LoRA adapters.
    mesh: a mesh from `dpo_jax.sharding.make_mesh` to shard the weights over as they are read, by
        the logical axis rules of `dpo_jax.sharding` (default: the default device).
    """
    model_config = dict(init_from_hf=storage.absolute(path), dtype=dtype,
                        param_dtype=param_dtype or compute_dtype(dtype))
    if lora_config is not None:
        model_config["lora"] = lora_config
    config = decoder_config(model_config)
    graphdef, abstract_params, logical_specs = _abstract(config)
    shardings = None if mesh is None else sharding.param_shardings(abstract_params, logical_specs, mesh)
    return nnx.merge(graphdef, _init(config, 0, shardings))


def save_hf(model, path, *, dtype=None, max_shard_bytes=5 * 2**30, source=None):
    """Writes `model` (a Decoder) as a Hugging Face checkpoint directory: config.json, safetensors
    shards of at most `max_shard_bytes` (with model.safetensors.index.json when there are several),
    and the tokenizer and generation files of `source` (default: the checkpoint it was loaded from).

    LoRA adapters are merged into the kernels; `dtype` casts the weights (default: as stored).
    The model's `hf_model_type` picks the format; an architecture it cannot express is refused.
    """
    config = model.config
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if config.lora_rank:
        params = lora.merge_adapters(params, config.lora_alpha / config.lora_rank)
    dtype = jnp.dtype(dtype or config.param_dtype)
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    config = dataclasses.replace(config, lora_rank=0, param_dtype=dtype.name)
    source = source or config.init_from_hf
    base_config = hf.HFConfig.read(source) if source else None
    if storage.is_remote(path):  # safetensors writes local files: stage the directory, then upload it
        if any(name.endswith(".safetensors") for name in storage.listdir(path)):
            raise FileExistsError(f"{path} already holds safetensors files; export into an empty directory")
        with tempfile.TemporaryDirectory() as staging:
            _write_hf(config, params, staging, max_shard_bytes, base_config, source)
            if jax.process_index() == 0:
                storage.upload_tree(staging, path)
    else:
        _write_hf(config, params, path, max_shard_bytes, base_config, source)


def _write_hf(config, params, path, max_shard_bytes, base_config, source):
    hf.write_checkpoint(config, params, path, max_shard_bytes=max_shard_bytes, base_config=base_config)
    if source and jax.process_index() == 0:
        for name in hf.TOKENIZER_FILES:
            if storage.isfile(storage.join(source, name)):
                storage.as_path(source).joinpath(name).copy(os.path.join(path, name), overwrite=True)
