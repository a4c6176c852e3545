"""Hugging Face checkpoints in and out: config.json + safetensors (sharded or not) <-> DecoderConfig + params.

Reading uses `safetensors` only, without PyTorch or `transformers`. Each family has a table of
tensor groups: which checkpoint tensors make which of our parameters, and how their layouts
convert (PyTorch Linear weights are [out, in], our kernels [in, out]; GPT-2 and GPT-NeoX fuse
q/k/v; GPT-J rotates interleaved pairs, which we turn into the halves layout by permuting its q/k
rows, a permutation that leaves q.k unchanged). The same table writes checkpoints back.

Supported `model_type`s: gpt2, gpt_neox, gptj, llama, mistral, qwen2, gemma.
"""

import dataclasses
import glob
import json
import os
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from dpo_jax import storage
from dpo_jax.models.transformer import RUNTIME_FIELDS, DecoderConfig

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files a serving stack reads besides the weights; copied from the source checkpoint on export.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "added_tokens.json")
# Keys of config.json that encode rotary settings (transformers < 5 and >= 5 spell them differently);
# export writes the older spelling, which both read, so the others are dropped.
ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta", "rotary_pct", "rotary_emb_base",
             "partial_rotary_factor")

# Hugging Face activation names (transformers.activations.ACT2FN) -> ours.
HF_ACTIVATIONS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_fast": "gelu", "gelu_pytorch_tanh": "gelu",
                  "silu": "silu", "swish": "silu", "relu": "relu"}


class HFConfig(dict):
    """The contents of a config.json; errors name where it came from and the offending key."""

    def __init__(self, values, source):
        super().__init__(values)
        self.source = source

    @classmethod
    def read(cls, path):
        file = storage.join(path, CONFIG_FILE)
        if not storage.isfile(file):
            raise FileNotFoundError(f"{path} is not a Hugging Face model directory: it has no {CONFIG_FILE}")
        return cls(storage.read_json(file), file)

    def need(self, key):
        if self.get(key) is None:
            raise ValueError(f"{self.source}: required key {key!r} is missing")
        return self[key]

    def unsupported(self, what, supported=None):
        known = f" (supported: {', '.join(supported)})" if supported else ""
        return ValueError(f"{self.source}: {what} is not supported by dpo_jax.models{known}")


def _activation(hf_config, name):
    if name not in HF_ACTIVATIONS:
        raise hf_config.unsupported(f"activation {name!r}", sorted(HF_ACTIVATIONS))
    return HF_ACTIVATIONS[name]


def _rope_fields(hf_config, *, theta_keys=("rope_theta",), fraction_keys=("partial_rotary_factor",),
                 default_fraction=1.0):
    """Rotary fields from either spelling: transformers >= 5 nests them in `rope_parameters`, older
    configs keep `rope_theta` (or a family's own key) beside `rope_scaling`."""
    params = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}

    def first(own_key, keys, default):
        for value in [params.get(own_key)] + [hf_config.get(key) for key in keys]:
            if value is not None:
                return value
        return default

    fields = dict(position_embedding="rope", rope_theta=float(first("rope_theta", theta_keys, 10000.0)),
                  rotary_fraction=float(first("partial_rotary_factor", fraction_keys, default_fraction)))
    scaling = HFConfig(params, f"{hf_config.source} (rope scaling)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "linear":
        fields.update(rope_scaling="linear", rope_scaling_factor=float(scaling.need("factor")))
    elif rope_type == "llama3":
        fields.update(rope_scaling="llama3", rope_scaling_factor=float(scaling.need("factor")),
                      rope_low_freq_factor=float(scaling.need("low_freq_factor")),
                      rope_high_freq_factor=float(scaling.need("high_freq_factor")),
                      rope_original_max_position_embeddings=int(params.get(
                          "original_max_position_embeddings", hf_config.need("max_position_embeddings"))))
    elif rope_type != "default":
        raise hf_config.unsupported(f"rope type {rope_type!r}", ("default", "linear", "llama3"))
    return fields


def _rope_to_hf(config):
    """Rotary settings in the older config.json spelling, which transformers 4.x and 5.x both read."""
    if config.rope_scaling == "none":
        return {"rope_theta": config.rope_theta, "rope_scaling": None}
    scaling = {"rope_type": config.rope_scaling, "factor": config.rope_scaling_factor}
    if config.rope_scaling == "llama3":
        scaling.update(low_freq_factor=config.rope_low_freq_factor, high_freq_factor=config.rope_high_freq_factor,
                       original_max_position_embeddings=config.rope_original_max_position_embeddings)
    return {"rope_theta": config.rope_theta, "rope_scaling": scaling}


# ---------------------------------------------------------------------------------------------
# Tensor groups: checkpoint tensors <-> our parameters
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Group:
    """Checkpoint tensors `hf_names` make our parameters `paths` (and back), converted by the two functions."""
    hf_names: tuple
    paths: tuple
    to_ours: Callable
    to_hf: Callable


def _same(hf_name, path):
    return Group((hf_name,), (path,), lambda a: (a,), lambda a: (a,))


def _transposed(hf_name, path):
    return Group((hf_name,), (path,), lambda a: (a.T,), lambda a: (a.T,))


def _linear(hf_prefix, path, bias):
    """A PyTorch nn.Linear: weight [out, in] is our kernel transposed."""
    groups = [_transposed(f"{hf_prefix}.weight", path + ("kernel",))]
    return groups + ([_same(f"{hf_prefix}.bias", path + ("bias",))] if bias else [])


def _conv1d(hf_prefix, path):
    """GPT-2's Conv1D: weight [in, out] is our kernel as is."""
    return [_same(f"{hf_prefix}.weight", path + ("kernel",)), _same(f"{hf_prefix}.bias", path + ("bias",))]


def _norm(hf_prefix, path, bias):
    groups = [_same(f"{hf_prefix}.weight", path + ("scale",))]
    return groups + ([_same(f"{hf_prefix}.bias", path + ("bias",))] if bias else [])


def _attention_paths(layer, leaf):
    return tuple(("blocks", layer, "attention", name, leaf) for name in ("query", "key", "value"))


def _gpt2_groups(config):
    groups = [_same("transformer.wte.weight", ("token_embedding", "embedding")),
              _same("transformer.wpe.weight", ("position_embedding", "embedding"))]
    for i in range(config.num_layers):
        hf, ours = f"transformer.h.{i}", ("blocks", i)
        # c_attn fuses q, k, v along its output axis.
        groups += [
            Group((f"{hf}.attn.c_attn.weight",), _attention_paths(i, "kernel"),
                  lambda w: tuple(np.split(w, 3, axis=1)), lambda q, k, v: (np.concatenate([q, k, v], axis=1),)),
            Group((f"{hf}.attn.c_attn.bias",), _attention_paths(i, "bias"),
                  lambda b: tuple(np.split(b, 3)), lambda q, k, v: (np.concatenate([q, k, v]),)),
            *_conv1d(f"{hf}.attn.c_proj", ours + ("attention", "out")),
            *_conv1d(f"{hf}.mlp.c_fc", ours + ("mlp", "up")),
            *_conv1d(f"{hf}.mlp.c_proj", ours + ("mlp", "down")),
            *_norm(f"{hf}.ln_1", ours + ("attention_norm",), True),
            *_norm(f"{hf}.ln_2", ours + ("mlp_norm",), True)]
    groups += _norm("transformer.ln_f", ("final_norm",), True)
    if not config.tie_embeddings:
        groups += _linear("lm_head", ("lm_head",), False)
    return groups


def _gpt_neox_groups(config):
    heads, head_dim = config.num_heads, config.resolved_head_dim

    # query_key_value rows are laid out [heads, (q, k, v), head_dim].
    def split_weight(w):
        w = w.reshape(heads, 3, head_dim, -1)
        return tuple(w[:, j].reshape(heads * head_dim, -1).T for j in range(3))

    def fuse_weight(*kernels):
        return (np.stack([k.T.reshape(heads, head_dim, -1) for k in kernels], axis=1).reshape(
            3 * heads * head_dim, -1),)

    def split_bias(b):
        return tuple(b.reshape(heads, 3, head_dim)[:, j].reshape(-1) for j in range(3))

    def fuse_bias(*biases):
        return (np.stack([b.reshape(heads, head_dim) for b in biases], axis=1).reshape(-1),)

    groups = [_same("gpt_neox.embed_in.weight", ("token_embedding", "embedding"))]
    for i in range(config.num_layers):
        hf, ours = f"gpt_neox.layers.{i}", ("blocks", i)
        groups += [Group((f"{hf}.attention.query_key_value.weight",), _attention_paths(i, "kernel"),
                         split_weight, fuse_weight)]
        if config.attention_bias:
            groups += [Group((f"{hf}.attention.query_key_value.bias",), _attention_paths(i, "bias"),
                             split_bias, fuse_bias)]
        groups += [*_linear(f"{hf}.attention.dense", ours + ("attention", "out"), config.attention_out_bias),
                   *_linear(f"{hf}.mlp.dense_h_to_4h", ours + ("mlp", "up"), True),
                   *_linear(f"{hf}.mlp.dense_4h_to_h", ours + ("mlp", "down"), True),
                   *_norm(f"{hf}.input_layernorm", ours + ("attention_norm",), True),
                   *_norm(f"{hf}.post_attention_layernorm", ours + ("mlp_norm",), True)]
    groups += _norm("gpt_neox.final_layer_norm", ("final_norm",), True)
    if not config.tie_embeddings:
        groups += _linear("embed_out", ("lm_head",), False)
    return groups


def _gptj_groups(config):
    heads, head_dim, rotary_dim = config.num_heads, config.resolved_head_dim, config.rotary_dim
    # Interleaved pairs (2i, 2i+1) -> halves (i, i + rotary_dim/2), per head; the rest stays.
    permutation = np.concatenate([np.arange(0, rotary_dim, 2), np.arange(1, rotary_dim, 2),
                                  np.arange(rotary_dim, head_dim)])
    inverse = np.argsort(permutation)

    def to_ours(w):
        return (w.reshape(heads, head_dim, -1)[:, permutation].reshape(heads * head_dim, -1).T,)

    def to_hf(kernel):
        return (kernel.T.reshape(heads, head_dim, -1)[:, inverse].reshape(heads * head_dim, -1),)

    groups = [_same("transformer.wte.weight", ("token_embedding", "embedding"))]
    for i in range(config.num_layers):
        hf, ours = f"transformer.h.{i}", ("blocks", i)
        groups += [Group((f"{hf}.attn.q_proj.weight",), (ours + ("attention", "query", "kernel"),), to_ours, to_hf),
                   Group((f"{hf}.attn.k_proj.weight",), (ours + ("attention", "key", "kernel"),), to_ours, to_hf),
                   *_linear(f"{hf}.attn.v_proj", ours + ("attention", "value"), False),
                   *_linear(f"{hf}.attn.out_proj", ours + ("attention", "out"), False),
                   *_linear(f"{hf}.mlp.fc_in", ours + ("mlp", "up"), True),
                   *_linear(f"{hf}.mlp.fc_out", ours + ("mlp", "down"), True),
                   *_norm(f"{hf}.ln_1", ours + ("attention_norm",), True)]
    return groups + _norm("transformer.ln_f", ("final_norm",), True) + _linear("lm_head", ("lm_head",), True)


def _llama_groups(config):
    """Llama, Mistral, Qwen2 and Gemma share tensor names; biases follow the config."""
    groups = [_same("model.embed_tokens.weight", ("token_embedding", "embedding"))]
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}", ("blocks", i)
        groups += [*_linear(f"{hf}.self_attn.q_proj", ours + ("attention", "query"), config.attention_bias),
                   *_linear(f"{hf}.self_attn.k_proj", ours + ("attention", "key"), config.attention_bias),
                   *_linear(f"{hf}.self_attn.v_proj", ours + ("attention", "value"), config.attention_bias),
                   *_linear(f"{hf}.self_attn.o_proj", ours + ("attention", "out"), config.attention_out_bias),
                   *_linear(f"{hf}.mlp.gate_proj", ours + ("mlp", "gate"), config.mlp_bias),
                   *_linear(f"{hf}.mlp.up_proj", ours + ("mlp", "up"), config.mlp_bias),
                   *_linear(f"{hf}.mlp.down_proj", ours + ("mlp", "down"), config.mlp_bias),
                   *_norm(f"{hf}.input_layernorm", ours + ("attention_norm",), False),
                   *_norm(f"{hf}.post_attention_layernorm", ours + ("mlp_norm",), False)]
    groups += _norm("model.norm", ("final_norm",), False)
    if not config.tie_embeddings:
        groups += _linear("lm_head", ("lm_head",), False)
    return groups


# ---------------------------------------------------------------------------------------------
# Families: config.json <-> DecoderConfig
# ---------------------------------------------------------------------------------------------

def _gpt2_from_hf(c):
    if c.get("scale_attn_by_inverse_layer_idx"):
        raise c.unsupported("scale_attn_by_inverse_layer_idx=true")
    if not c.get("scale_attn_weights", True):
        raise c.unsupported("scale_attn_weights=false")
    embed_dim, heads = c.need("n_embd"), c.need("n_head")
    return dict(vocab_size=c.need("vocab_size"), num_layers=c.need("n_layer"), embed_dim=embed_dim,
                num_heads=heads, num_kv_heads=heads, mlp_dim=c.get("n_inner") or 4 * embed_dim,
                max_position_embeddings=c.need("n_positions"), norm_eps=c.get("layer_norm_epsilon", 1e-5),
                activation=_activation(c, c.get("activation_function", "gelu_new")),
                tie_embeddings=c.get("tie_word_embeddings", True))


def _gpt2_to_hf(config):
    return dict(vocab_size=config.vocab_size, n_layer=config.num_layers, n_embd=config.embed_dim,
                n_head=config.num_heads, n_inner=config.mlp_dim, n_positions=config.max_position_embeddings,
                layer_norm_epsilon=config.norm_eps, activation_function=_hf_activation(config.activation, "gelu_new"),
                tie_word_embeddings=config.tie_embeddings)


def _gpt_neox_from_hf(c):
    heads = c.need("num_attention_heads")
    return dict(vocab_size=c.need("vocab_size"), num_layers=c.need("num_hidden_layers"),
                embed_dim=c.need("hidden_size"), num_heads=heads, num_kv_heads=heads,
                mlp_dim=c.need("intermediate_size"), max_position_embeddings=c.need("max_position_embeddings"),
                **_rope_fields(c, theta_keys=("rotary_emb_base", "rope_theta"),
                               fraction_keys=("rotary_pct", "partial_rotary_factor"), default_fraction=0.25),
                norm_eps=c.get("layer_norm_eps", 1e-5), activation=_activation(c, c.get("hidden_act", "gelu")),
                parallel_residual=c.get("use_parallel_residual", True),
                tie_embeddings=c.get("tie_word_embeddings", False),
                attention_bias=c.get("attention_bias", True), attention_out_bias=c.get("attention_bias", True))


def _gpt_neox_to_hf(config):
    rope = _rope_to_hf(config)
    return dict(vocab_size=config.vocab_size, num_hidden_layers=config.num_layers, hidden_size=config.embed_dim,
                num_attention_heads=config.num_heads, intermediate_size=config.mlp_dim,
                max_position_embeddings=config.max_position_embeddings, rotary_pct=config.rotary_fraction,
                rotary_emb_base=rope.pop("rope_theta"), **rope, layer_norm_eps=config.norm_eps,
                hidden_act=_hf_activation(config.activation, "gelu_new"),
                use_parallel_residual=config.parallel_residual, tie_word_embeddings=config.tie_embeddings,
                attention_bias=config.attention_bias)


def _gptj_from_hf(c):
    embed_dim, heads = c.need("n_embd"), c.need("n_head")
    head_dim, rotary_dim = embed_dim // heads, c.need("rotary_dim")
    if c.get("tie_word_embeddings"):
        raise c.unsupported("tie_word_embeddings=true for gptj")
    fields = dict(vocab_size=c.need("vocab_size"), num_layers=c.need("n_layer"), embed_dim=embed_dim,
                  num_heads=heads, num_kv_heads=heads, mlp_dim=c.get("n_inner") or 4 * embed_dim,
                  max_position_embeddings=c.need("n_positions"), position_embedding="rope",
                  rotary_fraction=rotary_dim / head_dim, norm_eps=c.get("layer_norm_epsilon", 1e-5),
                  activation=_activation(c, c.get("activation_function", "gelu_new")), parallel_residual=True,
                  shared_block_norm=True, tie_embeddings=False, attention_bias=False, attention_out_bias=False,
                  lm_head_bias=True)
    if DecoderConfig(**fields).rotary_dim != rotary_dim:
        raise c.unsupported(f"rotary_dim={rotary_dim} with head_dim={head_dim}")
    return fields


def _gptj_to_hf(config):
    return dict(vocab_size=config.vocab_size, n_layer=config.num_layers, n_embd=config.embed_dim,
                n_head=config.num_heads, n_inner=config.mlp_dim, n_positions=config.max_position_embeddings,
                rotary_dim=config.rotary_dim, layer_norm_epsilon=config.norm_eps,
                activation_function=_hf_activation(config.activation, "gelu_new"), tie_word_embeddings=False)


def _llama_from_hf(c):
    heads, embed_dim = c.need("num_attention_heads"), c.need("hidden_size")
    return dict(vocab_size=c.need("vocab_size"), num_layers=c.need("num_hidden_layers"), embed_dim=embed_dim,
                num_heads=heads, num_kv_heads=c.get("num_key_value_heads") or heads,
                head_dim=c.get("head_dim") or embed_dim // heads, mlp_dim=c.need("intermediate_size"),
                max_position_embeddings=c.need("max_position_embeddings"), **_rope_fields(c), norm="rmsnorm",
                norm_eps=c.get("rms_norm_eps", 1e-6), activation=_activation(c, c.get("hidden_act", "silu")),
                gated_mlp=True, tie_embeddings=c.get("tie_word_embeddings", False),
                attention_bias=c.get("attention_bias", False), attention_out_bias=c.get("attention_bias", False),
                mlp_bias=c.get("mlp_bias", False))


def _llama_to_hf(config):
    return dict(vocab_size=config.vocab_size, num_hidden_layers=config.num_layers, hidden_size=config.embed_dim,
                num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
                head_dim=config.resolved_head_dim, intermediate_size=config.mlp_dim,
                max_position_embeddings=config.max_position_embeddings, **_rope_to_hf(config),
                rms_norm_eps=config.norm_eps, hidden_act=_hf_activation(config.activation, "gelu_pytorch_tanh"),
                tie_word_embeddings=config.tie_embeddings, attention_bias=config.attention_bias,
                mlp_bias=config.mlp_bias)


def _mistral_from_hf(c):
    fields = _llama_from_hf(c)
    fields.update(sliding_window=c.get("sliding_window", 4096) or 0, attention_bias=False, attention_out_bias=False,
                  mlp_bias=False)
    return fields


def _mistral_to_hf(config):
    fields = _llama_to_hf(config)
    for key in ("attention_bias", "mlp_bias"):
        del fields[key]
    return dict(fields, sliding_window=config.sliding_window or None)


def _qwen2_from_hf(c):
    fields = _llama_from_hf(c)
    num_layers = fields["num_layers"]
    layer_types = c.get("layer_types") or [
        "sliding_attention" if c.get("use_sliding_window") and i >= c.get("max_window_layers", 28)
        else "full_attention" for i in range(num_layers)]
    sliding = {layer_type == "sliding_attention" for layer_type in layer_types}
    if len(sliding) > 1:
        raise c.unsupported("sliding-window attention in some layers only (use_sliding_window / max_window_layers)")
    fields.update(attention_bias=True, attention_out_bias=False, mlp_bias=False,
                  sliding_window=c.need("sliding_window") if sliding == {True} else 0)
    return fields


def _qwen2_to_hf(config):
    fields = _llama_to_hf(config)
    for key in ("attention_bias", "mlp_bias", "head_dim"):
        del fields[key]
    sliding = bool(config.sliding_window)
    return dict(fields, use_sliding_window=sliding, sliding_window=config.sliding_window or None,
                max_window_layers=0 if sliding else config.num_layers, layer_types=None)


def _gemma_from_hf(c):
    if c.get("use_bidirectional_attention"):
        raise c.unsupported("use_bidirectional_attention=true")
    # Older Gemma configs say "gelu" but mean the tanh approximation (transformers remaps it too).
    activation = c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"
    activation = "gelu_pytorch_tanh" if activation == "gelu" else activation
    fields = _llama_from_hf(c)
    fields.update(activation=_activation(c, activation), norm_scale_offset=1.0, scale_embeddings=True,
                  tie_embeddings=c.get("tie_word_embeddings", True), mlp_bias=False)
    return fields


def _gemma_to_hf(config):
    fields = _llama_to_hf(config)
    del fields["mlp_bias"]
    return dict(fields, hidden_activation=None)


@dataclasses.dataclass(frozen=True)
class Family:
    architecture: str  # the `architectures` entry transformers instantiates
    from_hf: Callable  # HFConfig -> DecoderConfig architecture fields
    to_hf: Callable  # DecoderConfig -> config.json fields
    groups: Callable  # DecoderConfig -> [Group]

FAMILIES = {
    "gpt2": Family("GPT2LMHeadModel", _gpt2_from_hf, _gpt2_to_hf, _gpt2_groups),
    "gpt_neox": Family("GPTNeoXForCausalLM", _gpt_neox_from_hf, _gpt_neox_to_hf, _gpt_neox_groups),
    "gptj": Family("GPTJForCausalLM", _gptj_from_hf, _gptj_to_hf, _gptj_groups),
    "llama": Family("LlamaForCausalLM", _llama_from_hf, _llama_to_hf, _llama_groups),
    "mistral": Family("MistralForCausalLM", _mistral_from_hf, _mistral_to_hf, _llama_groups),
    "qwen2": Family("Qwen2ForCausalLM", _qwen2_from_hf, _qwen2_to_hf, _llama_groups),
    "gemma": Family("GemmaForCausalLM", _gemma_from_hf, _gemma_to_hf, _llama_groups),
}


def _hf_activation(activation, tanh_name):
    return {"gelu": tanh_name, "gelu_exact": "gelu", "silu": "silu", "relu": "relu"}[activation]


def _family(model_type, where):
    if model_type not in FAMILIES:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def architecture_fields(path):
    """Every architecture field of DecoderConfig for the checkpoint in `path` (runtime fields excluded)."""
    hf_config = HFConfig.read(path)
    model_type = hf_config.need("model_type")
    fields = _family(model_type, hf_config.source).from_hf(hf_config)
    config = DecoderConfig(hf_model_type=model_type, **fields)
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in RUNTIME_FIELDS}


def _comparable(config):
    """The architecture fields that change what `config` computes (e.g. rope fields only with rope)."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in RUNTIME_FIELDS}
    fields["head_dim"] = config.resolved_head_dim
    unused = []
    if config.position_embedding != "rope":
        unused += ["rope_theta", "rotary_fraction", "rope_scaling"]
    if config.rope_scaling != "llama3" or config.position_embedding != "rope":
        unused += ["rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_position_embeddings"]
    if config.rope_scaling == "none" or config.position_embedding != "rope":
        unused += ["rope_scaling_factor"]
    if config.norm != "rmsnorm":
        unused += ["norm_scale_offset"]
    if not config.parallel_residual:
        unused += ["shared_block_norm"]
    if config.tie_embeddings:
        unused += ["lm_head_bias"]
    return {k: v for k, v in fields.items() if k not in unused}


def hf_config_dict(config: DecoderConfig, base=None):
    """config.json contents for `config` (updating `base`, the source checkpoint's config, when given).

    Raises when the family `config.hf_model_type` cannot express the architecture, naming the fields.
    """
    family = _family(config.hf_model_type, "model.hf_model_type")
    result = {k: v for k, v in (base or {}).items() if k not in ROPE_KEYS}
    result.update(family.to_hf(config), model_type=config.hf_model_type, architectures=[family.architecture],
                  torch_dtype=config.param_dtype)
    result.pop("dtype", None)  # transformers >= 5 writes the dtype as `dtype`; keep one spelling
    expressed = DecoderConfig(**dict(family.from_hf(HFConfig(result, "the exported config.json")),
                                     hf_model_type=config.hf_model_type))
    wanted, got = _comparable(config), _comparable(expressed)
    differing = sorted(k for k in wanted if wanted[k] != got.get(k))
    if differing:
        details = ", ".join(f"{k}={wanted[k]!r}" for k in differing)
        raise ValueError(f"A {config.hf_model_type} checkpoint cannot express this model: {details} "
                         f"(set model.hf_model_type to a family that has them)")
    return result


# ---------------------------------------------------------------------------------------------
# Reading and writing tensors
# ---------------------------------------------------------------------------------------------

class _Checkpoint:
    """The safetensors files of a model directory (one file or a sharded index), opened lazily."""

    def __init__(self, path):
        self.path = path = storage.local_copy(path)  # safetensors reads local files
        index_path = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                self.weight_map = json.load(f)["weight_map"]
        else:
            files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
            if not files:
                raise FileNotFoundError(f"{path} holds no *.safetensors weights (a PyTorch .bin checkpoint? "
                                        f"re-save it with transformers' save_pretrained(safe_serialization=True))")
            self.weight_map = {}
            for file in files:
                with safe_open(file, framework="numpy") as f:
                    self.weight_map.update({name: os.path.basename(file) for name in f.keys()})
        self._handles = {}

    def get(self, name):
        """A tensor as a numpy array; base-model checkpoints (e.g. the original gpt2) lack the prefix."""
        resolved = name if name in self.weight_map else name.split(".", 1)[-1]
        if resolved not in self.weight_map:
            raise ValueError(f"{self.path}: tensor {name!r} is missing from the checkpoint "
                             f"({len(self.weight_map)} tensors, e.g. {sorted(self.weight_map)[:3]})")
        file = self.weight_map[resolved]
        if file not in self._handles:
            self._handles[file] = safe_open(os.path.join(self.path, file), framework="numpy")
        return self._handles[file].get_tensor(resolved)

    def close(self):
        self._handles.clear()


def _lookup(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _assign(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def read_params(config: DecoderConfig, path, abstract_params, shardings=None):
    """Our parameters (a nested dict without LoRA adapters) from the checkpoint in `path`.

    Tensors are read one group at a time, converted to `abstract_params`' dtypes, and each device
    receives only its shard (`jax.make_array_from_callback`), so no host holds more than one
    converted tensor at a time and no device more than its part of the model.
    """
    checkpoint = _Checkpoint(path)
    params = {}
    try:
        for group in FAMILIES[config.hf_model_type].groups(config):
            arrays = group.to_ours(*(checkpoint.get(name) for name in group.hf_names))
            for param_path, array in zip(group.paths, arrays):
                abstract = _lookup(abstract_params, param_path)
                if array.shape != abstract.shape:
                    raise ValueError(f"{path}: {group.hf_names} gives {'/'.join(map(str, param_path))} shape "
                                     f"{array.shape}, but config.json implies {abstract.shape}")
                array = np.asarray(array, dtype=abstract.dtype)
                if shardings is None:
                    value = jax.device_put(array)
                else:
                    value = jax.make_array_from_callback(array.shape, _lookup(shardings, param_path),
                                                         lambda index, array=array: array[index])
                _assign(params, param_path, value)
    finally:
        checkpoint.close()
    return params


def _to_host(array):
    """A numpy copy of a (possibly multi-host sharded) array; every process must call it."""
    if not array.is_fully_addressable:
        array = multihost_utils.process_allgather(array, tiled=True)
    return np.asarray(array)


def write_checkpoint(config: DecoderConfig, params, path, *, max_shard_bytes, base_config=None):
    """Writes config.json and safetensors shards (with an index when there is more than one shard).

    `params` holds no adapters (merge them first). Only process 0 writes; all processes gather.
    """
    hf_config = hf_config_dict(config, base_config)
    groups = FAMILIES[config.hf_model_type].groups(config)
    # Plan the shards from parameter sizes (conversions keep the element count), then gather and
    # write one shard at a time, so the host holds at most one shard.
    shards, size = [[]], 0
    for group in groups:
        group_bytes = sum(_lookup(params, p).nbytes for p in group.paths)
        if shards[-1] and size + group_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(group)
        size += group_bytes
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(path, exist_ok=True)
        existing = glob.glob(os.path.join(path, "*.safetensors"))
        if existing:
            raise FileExistsError(f"{path} already holds safetensors files ({os.path.basename(existing[0])}, ...); "
                                  f"export into an empty directory")
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        tensors = {}
        for group in shard:
            arrays = group.to_hf(*(_to_host(_lookup(params, p)) for p in group.paths))
            tensors.update({hf_name: np.ascontiguousarray(a) for hf_name, a in zip(group.hf_names, arrays)})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(a.nbytes for a in tensors.values())
        if writer:
            # transformers refuses safetensors files without the "format" metadata.
            save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
    if writer:
        if len(shards) > 1:
            with open(os.path.join(path, INDEX_FILE), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
        with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
