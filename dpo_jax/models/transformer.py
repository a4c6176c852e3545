"""A decoder-only transformer in Flax NNX, configured to match the families users start from.

One implementation covers, by configuration:
  - GPT-2: learned positions, LayerNorm, GELU MLP, tied embeddings;
  - GPT-NeoX / Pythia: partial rotary, parallel residual, untied output;
  - GPT-J: partial rotary, parallel residual through one shared norm, output bias;
  - Llama / Mistral / Qwen2: RMSNorm, SwiGLU, grouped-query attention, Llama 3 rope scaling,
    sliding-window attention (Mistral), q/k/v biases (Qwen2);
  - Gemma: embeddings scaled by sqrt(width), (1 + w) RMSNorm, GeGLU.
`dpo_jax.models.hf` maps each Hugging Face config and checkpoint onto it.

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv_heads`, `mlp`) that
`dpo_jax.sharding` maps to mesh axes, so parallelism is configuration.

Padded, packed and prefix-shared layouts share one code path: what each query sees (`Visibility`)
comes from segment ids, prefix-sharing branch ids and positions, or from the caller's mask. The
training forward's attention (`attend`) goes, by `attention_kernel`:
  - to a fused kernel (`dpo_jax.models.kernels`: splash on TPU, Pallas flash attention on GPU) that
    takes the segment and branch ids and builds the mask inside each block, split over the devices
    of the mesh in context (`jax.set_mesh`) by `jax.shard_map`;
  - or to the dense path: `jax.nn.dot_product_attention` with the explicit [batch, 1, T, T] mask,
    which a caller's mask, a sliding window and decoding always take. On CPU, where XLA computes
    every (query, key) pair of a packed row, `attention_block_size > 0` makes it
    `blockwise_attention`, the masked attention computed only on blocks the mask leaves visible.

Projections may carry LoRA adapters (`lora_rank > 0`); `nnx.view(model, use_lora=False)` switches
them off, which gives the reference model of LoRA-DPO from the same parameters.
"""

import dataclasses
import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpo_jax import sharding
from dpo_jax.models import kernels

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}
# Projections that can carry LoRA adapters: attention (query, key, value, out) and MLP (gate, up, down).
LORA_TARGETS = ("query", "key", "value", "out", "gate", "up", "down")
ROPE_SCALINGS = ("none", "linear", "llama3")
# Fields that say how to run or where to start, not what the network computes.
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "attention_kernel", "attention_kernel_block_size",
                  "attention_block_size", "fused_qkv", "fused_gate_up", "fused_parallel_inputs", "logits_chunk_size",
                  "init_from_hf", "lora_rank", "lora_alpha", "lora_targets")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture of a decoder; see `dpo_jax/configs/presets.py:model_config` for the meaning of each field."""
    vocab_size: int
    num_layers: int
    embed_dim: int
    num_heads: int
    num_kv_heads: int
    mlp_dim: int
    max_position_embeddings: int
    head_dim: int = 0
    position_embedding: str = "learned"
    rope_theta: float = 10000.0
    rotary_fraction: float = 1.0
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    sliding_window: int = 0
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_scale_offset: float = 0.0
    activation: str = "gelu"
    gated_mlp: bool = False
    parallel_residual: bool = False
    shared_block_norm: bool = False
    tie_embeddings: bool = True
    scale_embeddings: bool = False
    attention_bias: bool = True
    attention_out_bias: bool = True
    mlp_bias: bool = True
    lm_head_bias: bool = False
    hf_model_type: str = "gpt2"
    init_from_hf: str = ""
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple = LORA_TARGETS
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    attention_kernel: str = "auto"  # "auto" | "dense" | "splash" | "pallas_gpu": the training forward's attention
    attention_kernel_block_size: int = 128  # the fused kernels' block
    attention_block_size: int = 0  # dense path: 0: jax.nn.dot_product_attention; > 0: `blockwise_attention`
    fused_qkv: bool = False  # one matmul for q, k and v (`Attention.projections`)
    fused_gate_up: bool = False  # one matmul for a gated MLP's gate and up projections (`MLP.projections`)
    fused_parallel_inputs: bool = False  # one matmul for a one-norm parallel block's inputs (`Block.fuses_inputs`)
    logits_chunk_size: int = 0  # 0: training log-probs from full logits; > 0: `losses.scored_token_logps` chunks

    def __post_init__(self):
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))  # lists come from JSON configs
        choices = dict(position_embedding=("learned", "rope"), norm=("layernorm", "rmsnorm"),
                       activation=tuple(ACTIVATIONS), rope_scaling=ROPE_SCALINGS)
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_kv_heads={self.num_kv_heads} must divide model.num_heads={self.num_heads}")
        if not self.head_dim and self.embed_dim % self.num_heads:
            raise ValueError(f"model.num_heads={self.num_heads} must divide model.embed_dim={self.embed_dim} "
                             "(or set model.head_dim)")
        if self.shared_block_norm and not self.parallel_residual:
            raise ValueError("model.shared_block_norm needs model.parallel_residual (one norm feeds both branches)")
        if self.attention_kernel not in ("auto",) + kernels.IMPLEMENTATIONS:
            raise ValueError(f"model.attention_kernel={self.attention_kernel!r} is not one of "
                             f"{('auto',) + kernels.IMPLEMENTATIONS}")
        if self.sliding_window and self.attention_kernel in kernels.IMPLEMENTATIONS[1:]:
            raise ValueError(f"model.attention_kernel={self.attention_kernel} takes no sliding window "
                             f"(sliding_window={self.sliding_window}); use auto or dense")
        unknown = sorted(set(self.lora_targets) - set(LORA_TARGETS))
        if unknown:
            raise ValueError(f"model.lora.targets: unknown projections {unknown}; known: {LORA_TARGETS}")

    @classmethod
    def from_config(cls, model_config, architecture=None):
        """Builds from a `config.model` ConfigDict or dict (its `lora` block flattened), ignoring other keys.

        `architecture` (fields read from a Hugging Face config.json) replaces config.model's
        architecture fields; only the runtime fields (dtypes, remat, LoRA, init_from_hf) stay.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in model_config.items() if k in fields}
        lora = model_config.get("lora")
        if lora is not None:
            values.update(lora_rank=lora["rank"], lora_alpha=lora["alpha"], lora_targets=tuple(lora["targets"]))
        if architecture is not None:
            values = {k: v for k, v in values.items() if k in RUNTIME_FIELDS} | dict(architecture)
        return cls(**values)

    @property
    def fused_attention(self):
        """The fused kernel of the training forward ("splash" / "pallas_gpu" on this backend), or None
        for the dense path (chosen, the CPU's "auto", or a sliding window, which the kernels lack)."""
        implementation = kernels.resolve(self.attention_kernel)
        return None if implementation == "dense" or self.sliding_window else implementation

    @property
    def resolved_head_dim(self):
        return self.head_dim or self.embed_dim // self.num_heads

    @property
    def rotary_dim(self):
        """Rotated dimensions of each head (GPT-NeoX: int(head_dim * rotary_pct)), even."""
        rotary_dim = int(self.resolved_head_dim * self.rotary_fraction)
        return rotary_dim - rotary_dim % 2


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------

def matmul(x, kernel, *, transposed=False, preferred_element_type=None):
    """x [..., in] @ kernel [in, out] (or, `transposed`, kernel [out, in] contracted on its last
    axis) as one 2-D matmul over the flattened leading axes.

    The same numbers as `x @ kernel`, but XLA:CPU lowers the weight gradient of a matmul with
    several batch axes through transposing copies fused into the elementwise backward, a large part
    of a step in a profile; a 2-D matmul has a plain transposed-matmul gradient. Flattening is free:
    the leading axes are contiguous. `transposed` serves a tied embedding [vocab, embed] as the
    output layer without a transposed copy of it. `preferred_element_type` (float32) returns the
    matmul's float32 accumulator instead of rounding it to the inputs' dtype.
    """
    out = jnp.matmul(x.reshape(-1, x.shape[-1]), kernel.T if transposed else kernel,  # XLA folds the .T in
                     preferred_element_type=preferred_element_type)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def tensor_slices():
    """How many slices the mesh in context splits the `tensor` axis into (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else mesh.shape.get("tensor", 1)


def side_by_side(x, layers, slices):
    """[layer(x) for layer in layers] (`Dense` layers without an active adapter) as one matmul.

    x is read once, and the backward pass gets x's gradient from one matmul instead of a sum of
    several. The kernels are interleaved per `slices` ([in, slices x (each layer's slice of its
    outputs)]), so when the mesh splits their outputs over `tensor` in as many slices, each
    device's part of the fused kernel is its own part of every layer and the concatenation needs
    no communication; with one slice it is [first | second | ...]. The parameters stay separate,
    so checkpoints, LoRA and Hugging Face interop see the same tree."""
    dtype = layers[0].dtype
    arrange = lambda w: w[...].astype(dtype).reshape(*w.shape[:-1], slices, -1)  # [..., slices, out / slices]
    kernel = jnp.concatenate([arrange(layer.kernel) for layer in layers], axis=-1)
    y = matmul(x.astype(dtype), kernel.reshape(x.shape[-1], -1))
    if any(layer.bias is not None for layer in layers):  # a layer without one adds zeros (GPT-J: q, k, v)
        biases = [jnp.zeros(layer.kernel.shape[-1:], dtype) if layer.bias is None else layer.bias for layer in layers]
        y = y + jnp.concatenate([arrange(bias) for bias in biases], axis=-1).reshape(-1)
    y = y.reshape(*x.shape[:-1], slices, -1)
    ends = np.cumsum([layer.kernel.shape[-1] // slices for layer in layers])[:-1]
    return [part.reshape(*x.shape[:-1], -1) for part in jnp.split(y, ends, axis=-1)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def float32_matmul(x, kernel, transposed=False):
    """`matmul` of x and kernel in their (compute) dtype, returning the float32 accumulator: the
    logits. The backward pass runs in the inputs' dtype, as that of `matmul(...).astype(float32)`
    would (the float32 cotangent rounded to it), rather than as float32 x bfloat16 matmuls."""
    return matmul(x, kernel, transposed=transposed, preferred_element_type=jnp.float32)


def _float32_matmul_fwd(x, kernel, transposed):
    return float32_matmul(x, kernel, transposed), (x, kernel)


def _float32_matmul_bwd(transposed, residuals, grad):
    x, kernel = residuals
    _, vjp = jax.vjp(functools.partial(matmul, transposed=transposed), x, kernel)
    return vjp(grad.astype(jnp.result_type(x, kernel)))


float32_matmul.defvjp(_float32_matmul_fwd, _float32_matmul_bwd)


class Dense(nnx.Module):
    """x @ kernel (+ bias), plus an optional LoRA adapter (alpha / rank) * x @ lora_a @ lora_b.

    `lora_b` starts at zero, so a fresh adapter leaves the layer unchanged. Adapters are stored in
    float32 whatever the parameter dtype: they are small, and bfloat16 would round small updates away.
    """

    def __init__(self, in_features, out_features, axes, *, use_bias, config: DecoderConfig, rngs: nnx.Rngs,
                 lora_rank=0, stddev=0.02):
        param_dtype = jnp.dtype(config.param_dtype)
        self.dtype = jnp.dtype(config.dtype)
        self.kernel = nnx.Param(nnx.initializers.normal(stddev)(rngs.params(), (in_features, out_features),
                                                                param_dtype), out_sharding=axes)
        self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype), out_sharding=axes[-1:])
                     if use_bias else None)
        if lora_rank:
            # PEFT's default A init (kaiming-uniform with a=sqrt(5)): uniform in +-1/sqrt(in_features).
            a_init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
            self.lora_a = nnx.LoRAParam(a_init(rngs.params(), (in_features, lora_rank), jnp.float32),
                                        out_sharding=(axes[0], None))
            self.lora_b = nnx.LoRAParam(jnp.zeros((lora_rank, out_features), jnp.float32),
                                        out_sharding=(None, axes[1]))
            self.lora_scale = config.lora_alpha / lora_rank
        else:
            self.lora_a = self.lora_b = None
        self.use_lora = True

    def set_view(self, use_lora: Optional[bool] = None):
        """For `nnx.view(model, use_lora=False)`: the same weights with the adapters switched off."""
        if use_lora is not None:
            self.use_lora = use_lora

    def __call__(self, x):
        x = x.astype(self.dtype)
        y = matmul(x, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_a is not None and self.use_lora:
            adapter = matmul(matmul(x, self.lora_a[...].astype(self.dtype)), self.lora_b[...].astype(self.dtype))
            y = y + (self.lora_scale * adapter).astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """x / rms(x) * (offset + scale), in float32. Llama: offset 0; Gemma: offset 1 (scale starts at 0)."""

    def __init__(self, config: DecoderConfig):
        self.eps = config.norm_eps
        self.offset = config.norm_scale_offset
        self.dtype = jnp.dtype(config.dtype)
        init = jnp.zeros if self.offset else jnp.ones
        self.scale = nnx.Param(init((config.embed_dim,), jnp.dtype(config.param_dtype)), out_sharding=("embed",))

    def __call__(self, x):
        x = x.astype(jnp.float32)
        normed = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (normed * (self.offset + self.scale[...].astype(jnp.float32))).astype(self.dtype)


def _dense(in_features, out_features, axes, *, use_bias, config, rngs, name=None):
    lora_rank = config.lora_rank if name in config.lora_targets else 0
    return Dense(in_features, out_features, axes, use_bias=use_bias, config=config, rngs=rngs, lora_rank=lora_rank)


def _no_active_adapter(*layers):
    return not any(layer.lora_a is not None and layer.use_lora for layer in layers)


def _norm(config, rngs):
    if config.norm == "rmsnorm":
        return RMSNorm(config)
    # Two-pass variance, as PyTorch computes it (the fast E[x^2] - E[x]^2 form loses precision).
    return nnx.LayerNorm(config.embed_dim, epsilon=config.norm_eps, use_fast_variance=False,
                         dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), rngs=rngs,
                         scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",)),
                         bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)))


def rope_inverse_frequencies(config: DecoderConfig):
    """Rotary inverse frequencies [rotary_dim / 2] (float32), with linear or Llama 3.1 scaling."""
    dim = config.rotary_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor = config.rope_scaling_factor
    if config.rope_scaling == "linear":
        inv_freq = inv_freq / factor
    elif config.rope_scaling == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        original = config.rope_original_max_position_embeddings
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        wavelength = 2 * math.pi / inv_freq
        smooth = (original / wavelength - low) / (high - low)
        interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = np.where(wavelength > original / low, inv_freq / factor,
                            np.where(wavelength < original / high, inv_freq, interpolated))
    return inv_freq.astype(np.float32)


def rotary_embedding(x, positions, inv_freq):
    """Rotates the first 2 * len(inv_freq) dims of x [batch, time, heads, dim] (GPT-NeoX halves layout).

    GPT-J's interleaved layout is the same rotation of permuted dims; `hf.py` permutes its q/k weights.
    """
    rotary_dim = 2 * inv_freq.shape[0]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [batch, time, rotary_dim / 2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x_rot.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([rotated.astype(x.dtype), x_pass], axis=-1)


def attention_mask(query_segment_ids, key_segment_ids, query_index, key_index, query_positions=None,
                   key_positions=None, sliding_window=0):
    """[batch, 1, queries, keys] bool: causal by slot index, equal segment ids, within the sliding window.

    Padding has segment id 0 and attends only to padding, so no row is empty. The window is measured
    in positions, so it restarts with each packed sequence.
    """
    mask = key_index[None, None, :] <= query_index[None, :, None]
    mask = (mask & (query_segment_ids[:, :, None] == key_segment_ids[:, None, :]))[:, None]
    if sliding_window:
        mask = mask & _within_window(query_positions, key_positions, sliding_window)
    return mask


def _within_window(query_positions, key_positions, sliding_window):
    """[batch, 1, queries, keys]: the key is fewer than `sliding_window` positions behind the query."""
    return (query_positions[:, :, None] - key_positions[:, None, :] < sliding_window)[:, None]


# ---------------------------------------------------------------------------------------------
# Blockwise attention: the masked softmax attention, skipping blocks the mask hides
# ---------------------------------------------------------------------------------------------
# A packed row of 1024 slots holding four ~250-token sequences attends to about a tenth of its
# 1024 x 1024 (query, key) pairs, but a dense masked attention computes, stores and differentiates
# all of them. Here queries and keys are cut into blocks, and the block pairs where the mask shows
# at least one (query, key) pair are listed (visible ones first, decided at run time from the data
# so shapes stay static). They are computed `BLOCK_PAIRS_PER_STEP` at a time as batched matmuls,
# steps past the visible ones skipped (`lax.cond`), and merged per query block with the online
# softmax of flash attention; the backward pass recomputes probabilities from the saved
# log-sum-exp, so no [time, time] float array is kept.

BLOCK_PAIRS_PER_STEP = 8  # enough work per step to amortise XLA:CPU's per-operation cost
_HIDDEN = -0.7 * float(jnp.finfo(jnp.float32).max)  # jax.nn's logit for hidden pairs: finite, exp() = 0


def _flat_heads(x):
    """[..., kv_heads, groups, block, n] -> [..., kv_heads, groups * block, n]: the matmul view of grouped queries."""
    return x.reshape(*x.shape[:-3], x.shape[-3] * x.shape[-2], x.shape[-1])


def _block_logits(query, key, mask):
    """[pairs, kv_heads, groups, block, block] float32 scaled logits of query blocks [pairs, kv_heads,
    groups, block, dim] against key blocks [pairs, kv_heads, block, dim], hidden pairs at _HIDDEN."""
    scale = 1.0 / math.sqrt(query.shape[-1])
    # Head-major operands with the batch axes first make this a plain batched matmul on XLA:CPU.
    logits = jnp.einsum("pkmd,pksd->pkms", _flat_heads(query), key, preferred_element_type=jnp.float32) * scale
    return jnp.where(mask[:, None, None], logits.reshape(*query.shape[:-1], -1), _HIDDEN)


def _visible_pairs(mask_blocks):
    """(flat block-pair indices, visible ones first and padded to whole steps; the visible count)."""
    visible = mask_blocks.any(axis=(1, 2))
    padding = -visible.shape[0] % BLOCK_PAIRS_PER_STEP
    order = jnp.argsort(~visible, stable=True).astype(jnp.int32)
    return jnp.pad(order, (0, padding)), jnp.sum(visible, dtype=jnp.int32)


def _pair_steps(pairs, count, num_query_blocks, num_key_blocks):
    """Per step of BLOCK_PAIRS_PER_STEP pairs: (step index, flat pair, query block, key block, valid)
    arrays, with a leading axis of steps. Padding entries are invalid (and point at pair 0)."""
    index = jnp.arange(pairs.shape[0])
    valid = index < count
    pairs = jnp.where(valid, pairs, 0)
    rows, in_row = pairs // (num_query_blocks * num_key_blocks), pairs % (num_query_blocks * num_key_blocks)
    query_blocks = rows * num_query_blocks + in_row // num_key_blocks
    key_blocks = rows * num_key_blocks + in_row % num_key_blocks
    steps = lambda x: x.reshape(-1, BLOCK_PAIRS_PER_STEP)
    return (jnp.arange(pairs.shape[0] // BLOCK_PAIRS_PER_STEP), steps(pairs), steps(query_blocks), steps(key_blocks),
            steps(valid))


def _blockwise_forward(query, key, value, mask, num_query_blocks, num_key_blocks):
    """(output like `query`, log-sum-exp [query blocks, kv_heads, groups, block], visible pairs, count)
    of query blocks [query blocks, kv_heads, groups, block, dim], key and value blocks [key blocks,
    kv_heads, block, dim] and mask blocks [query blocks * key blocks of a row, block, block], blocks
    numbered row by row."""
    pairs, count = _visible_pairs(mask)
    stats_shape = query.shape[:-1]
    init = (jnp.full(stats_shape, _HIDDEN, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros(query.shape, jnp.float32))

    def step(carry, inputs):
        index, pair, query_block, key_block, valid = inputs

        def attend(carry):
            running_max, normaliser, accumulated = carry
            pair_mask = mask[pair]
            logits = _block_logits(query[query_block], key[key_block], pair_mask)
            block_max = jnp.where(valid[:, None, None, None], logits.max(-1), _HIDDEN)
            probs = jnp.where(pair_mask[:, None, None] & valid[:, None, None, None, None],
                              jnp.exp(logits - block_max[..., None]), 0.0)
            weighted = jnp.einsum("pkms,pksd->pkmd", _flat_heads(probs.astype(value.dtype)), value[key_block],
                                  preferred_element_type=jnp.float32).reshape(probs.shape[:-1] + (-1,))
            # Online softmax over the steps: every query block rescaled to the new running maximum,
            # then this step's blocks added at it (several may share a query block).
            new_max = running_max.at[query_block].max(block_max)
            correction = jnp.exp(running_max - new_max)
            weight = jnp.exp(block_max - new_max[query_block])
            normaliser = (normaliser * correction).at[query_block].add(probs.sum(-1) * weight)
            # Padding entries' probabilities are 0, but a NaN in the values they point at must not leak.
            accumulated = (accumulated * correction[..., None]).at[query_block].add(
                jnp.where(valid[:, None, None, None, None], weighted, 0.0) * weight[..., None])
            return new_max, normaliser, accumulated

        return jax.lax.cond(index * BLOCK_PAIRS_PER_STEP < count, attend, lambda carry: carry, carry), None

    (running_max, normaliser, accumulated), _ = jax.lax.scan(
        step, init, _pair_steps(pairs, count, num_query_blocks, num_key_blocks))
    # A query the mask shows no key (such as the slots `blockwise_attention` appends) outputs 0.
    seen = normaliser > 0
    out = accumulated / jnp.where(seen, normaliser, 1.0)[..., None]
    log_sum_exp = jnp.where(seen, running_max + jnp.log(jnp.where(seen, normaliser, 1.0)), 0.0)
    return out.astype(query.dtype), log_sum_exp, pairs, count


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blockwise_blocks(query, key, value, mask, num_query_blocks, num_key_blocks):
    return _blockwise_forward(query, key, value, mask, num_query_blocks, num_key_blocks)[0]


def _blockwise_blocks_fwd(query, key, value, mask, num_query_blocks, num_key_blocks):
    out, log_sum_exp, pairs, count = _blockwise_forward(query, key, value, mask, num_query_blocks, num_key_blocks)
    return out, (query, key, value, mask, out, log_sum_exp, pairs, count)


def _blockwise_blocks_bwd(num_query_blocks, num_key_blocks, residuals, out_grad):
    """Flash attention's backward over the same visible block pairs: probabilities recomputed from
    the log-sum-exp, the query, key and value gradients of each step scattered into their blocks."""
    query, key, value, mask, out, log_sum_exp, pairs, count = residuals
    scale = 1.0 / math.sqrt(query.shape[-1])
    # d softmax: rowsum(dO * O), per query; as a contraction, which XLA:CPU runs much faster than
    # the multiply-and-reduce it fuses `jnp.sum(dO * O, -1)` into.
    out_dot_grad = jnp.einsum("...d,...d->...", out_grad, out, preferred_element_type=jnp.float32)
    init = tuple(jnp.zeros(x.shape, jnp.float32) for x in (query, key, value))

    def step(grads, inputs):
        index, pair, query_block, key_block, valid = inputs

        def attend(grads):
            q_grads, k_grads, v_grads = grads
            q, k, v, grad = query[query_block], key[key_block], value[key_block], out_grad[query_block]
            flat_q, flat_grad = _flat_heads(q), _flat_heads(grad)
            # Transposed [pairs, kv_heads, keys, queries] probabilities, so that the key and value
            # gradients contract the operands' trailing axes, as XLA:CPU's fast matmuls need.
            logits = jnp.einsum("pksd,pkmd->pksm", k, flat_q, preferred_element_type=jnp.float32) * scale
            groups = q.shape[2]
            visible = jnp.tile(jnp.swapaxes(mask[pair], 1, 2), (1, 1, groups))[:, None]  # [pairs, 1, keys, queries]
            lse = _flat_heads(log_sum_exp[query_block][..., None])[..., 0][:, :, None]  # [pairs, kv_heads, 1, queries]
            probs = jnp.where(visible & valid[:, None, None, None], jnp.exp(logits - lse), 0.0)
            v_grad = jnp.einsum("pksm,pkmd->pksd", probs.astype(grad.dtype), flat_grad,
                                preferred_element_type=jnp.float32)
            probs_grad = jnp.einsum("pksd,pkmd->pksm", v, flat_grad, preferred_element_type=jnp.float32)
            dot = _flat_heads(out_dot_grad[query_block][..., None])[..., 0][:, :, None]
            logits_grad = probs * (probs_grad - dot) * scale
            k_grad = jnp.einsum("pksm,pkmd->pksd", logits_grad, flat_q, preferred_element_type=jnp.float32)
            # The query gradient contracts the keys, a leading axis of both operands: XLA:CPU runs
            # such a matmul on its slow generic path, and folds a plain
            # transpose back into it. The barrier keeps the transposed copy, and the fast path.
            logits_grad_by_query = jax.lax.optimization_barrier(jnp.swapaxes(logits_grad, 2, 3))
            q_grad = jnp.einsum("pkms,pksd->pkmd", logits_grad_by_query, k,
                                preferred_element_type=jnp.float32).reshape(q.shape)
            # Padding entries computed nothing, but a NaN in the blocks they point at must not leak.
            keep = lambda x: jnp.where(valid.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.0)
            return (q_grads.at[query_block].add(keep(q_grad)), k_grads.at[key_block].add(keep(k_grad)),
                    v_grads.at[key_block].add(keep(v_grad)))

        return jax.lax.cond(index * BLOCK_PAIRS_PER_STEP < count, attend, lambda grads: grads, grads), None

    (q_grad, k_grad, v_grad), _ = jax.lax.scan(step, init, _pair_steps(pairs, count, num_query_blocks,
                                                                         num_key_blocks))
    return q_grad.astype(query.dtype), k_grad.astype(key.dtype), v_grad.astype(value.dtype), None


_blockwise_blocks.defvjp(_blockwise_blocks_fwd, _blockwise_blocks_bwd)


def blockwise_attention(query, key, value, mask, block_size):
    """`jax.nn.dot_product_attention(query, key, value, mask=mask)` computed only on the
    (block_size x block_size) blocks of (query, key) pairs where `mask` shows at least one pair.

    query [batch, T, heads, dim], key and value [batch, S, kv_heads, dim], mask [batch, 1, T, S]
    bool (shared by the heads). Equal to the dense attention for every query that sees at least one
    key; a query that sees none outputs 0. T and S are padded to the block size inside.
    """
    batch, query_length, num_heads, head_dim = query.shape
    key_length, num_kv_heads = key.shape[1], key.shape[2]
    groups = num_heads // num_kv_heads
    padded_query, padded_key = query_length + -query_length % block_size, key_length + -key_length % block_size
    num_query_blocks, num_key_blocks = padded_query // block_size, padded_key // block_size
    pad = lambda x, length: jnp.pad(x, ((0, 0), (0, length - x.shape[1])) + ((0, 0),) * (x.ndim - 2))
    # Blocks, head-major: queries [batch * query blocks, kv_heads, groups, block, dim], keys and values
    # [batch * key blocks, kv_heads, block, dim], masks [batch * query blocks * key blocks, block, block].
    query_blocks = pad(query, padded_query).reshape(batch, num_query_blocks, block_size, num_kv_heads, groups,
                                                    head_dim).transpose(0, 1, 3, 4, 2, 5)
    key, value = (pad(x, padded_key).reshape(batch, num_key_blocks, block_size, num_kv_heads, head_dim)
                  .transpose(0, 1, 3, 2, 4).reshape(-1, num_kv_heads, block_size, head_dim) for x in (key, value))
    mask = jnp.broadcast_to(mask, (batch, 1, query_length, key_length))[:, 0]
    mask = jnp.pad(mask, ((0, 0), (0, padded_query - query_length), (0, padded_key - key_length)))
    mask = mask.reshape(batch, num_query_blocks, block_size, num_key_blocks, block_size).transpose(0, 1, 3, 2, 4)
    out = _blockwise_blocks(query_blocks.reshape(-1, *query_blocks.shape[2:]), key, value,
                            mask.reshape(-1, block_size, block_size), num_query_blocks, num_key_blocks)
    out = out.reshape(query_blocks.shape).transpose(0, 1, 4, 2, 3, 5)  # [batch, query blocks, block, kv, groups, dim]
    return out.reshape(batch, padded_query, num_heads, head_dim)[:, :query_length]


class Attention(nnx.Module):

    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs):
        self.config = config
        head_dim = config.resolved_head_dim

        def dense(name, i, o, axes, use_bias):
            return _dense(i, o, axes, use_bias=use_bias, config=config, rngs=rngs, name=name)

        self.query = dense("query", config.embed_dim, config.num_heads * head_dim, ("embed", "heads"),
                           config.attention_bias)
        self.key = dense("key", config.embed_dim, config.num_kv_heads * head_dim, ("embed", "kv_heads"),
                         config.attention_bias)
        self.value = dense("value", config.embed_dim, config.num_kv_heads * head_dim, ("embed", "kv_heads"),
                           config.attention_bias)
        self.out = dense("out", config.num_heads * head_dim, config.embed_dim, ("heads", "embed"),
                         config.attention_out_bias)

    def fusable(self):
        """Whether `projections` may fuse: asked for, no LoRA adapter active on q, k or v, and kv heads
        that the mesh's tensor axis divides (else the fused kernel's split would cut through a head)."""
        return self.config.fused_qkv and _no_active_adapter(*self.projection_layers) and (
            self.config.num_kv_heads % tensor_slices() == 0)

    @property
    def projection_layers(self):
        return self.query, self.key, self.value

    def projections(self, x):
        """q, k and v of x [..., heads or kv_heads x head_dim]: fused, one matmul of x against the three
        kernels side by side (`side_by_side`, interleaved per slice of the tensor axis, so each
        device's slice is its own heads' q, k and v)."""
        layers = self.projection_layers
        return side_by_side(x, layers, tensor_slices()) if self.fusable() else [layer(x) for layer in layers]

    def __call__(self, x, positions, visibility, cache=None, cache_index=None, projected=None):
        """Attention output; with a cache {key, value} [batch, slots, kv_heads, head_dim], also the new cache.
        `projected`: x's q, k and v as `projections` gives them, when the caller computed them."""
        config = self.config
        batch, length, _ = x.shape
        head_dim = config.resolved_head_dim
        q, k, v = self.projections(x) if projected is None else projected
        q = q.reshape(batch, length, config.num_heads, head_dim)
        k, v = (y.reshape(batch, length, config.num_kv_heads, head_dim) for y in (k, v))
        if config.position_embedding == "rope":
            inv_freq = rope_inverse_frequencies(config)  # a constant of the trace
            q = rotary_embedding(q, positions, inv_freq)
            k = rotary_embedding(k, positions, inv_freq)
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache["key"], k.astype(cache["key"].dtype), cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache["value"], v.astype(cache["value"].dtype), cache_index,
                                                    axis=1)
            cache = {"key": k, "value": v}
        if cache is None:
            out = attend(config, q, k, v, visibility)
        else:  # decoding steps are short: dense is cheapest
            out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=visibility.mask)
        return self.out(out.reshape(batch, length, config.num_heads * head_dim)), cache


class Visibility(NamedTuple):
    """Which keys each query of a forward pass sees: an explicit boolean `mask` [batch, 1, queries,
    keys] (the dense path), or, for a fused kernel, the `segment_ids` [batch, time] and, in
    prefix-shared rows, the `branch_ids` [batch, time] it builds the mask from inside its blocks."""
    mask: Optional[jax.Array] = None
    segment_ids: Optional[jax.Array] = None
    branch_ids: Optional[jax.Array] = None


def attend(config: DecoderConfig, query, key, value, visibility: Visibility):
    """The attention of a forward pass without a cache, by the config's path (the module docstring):
    query [batch, time, heads, head_dim], key and value [batch, time, kv_heads, head_dim]."""
    if visibility.mask is not None:
        if config.attention_block_size:
            return blockwise_attention(query, key, value, visibility.mask, config.attention_block_size)
        return jax.nn.dot_product_attention(query, key.astype(query.dtype), value.astype(query.dtype),
                                            mask=visibility.mask)
    kernel = functools.partial(
        kernels.segment_attention if visibility.branch_ids is None else kernels.prefix_shared_attention,
        implementation=config.fused_attention, block_size=config.attention_kernel_block_size,
        interpret=jax.default_backend() == "cpu")  # Pallas runs its kernels' programs on the CPU
    ids = (visibility.segment_ids,) if visibility.branch_ids is None else (visibility.segment_ids,
                                                                          visibility.branch_ids)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty and jax.device_count() > 1:
        # Without a mesh in context the kernel cannot be split over the devices the arrays may span
        # (jit does not partition a Pallas kernel): the dense path, which jit does partition.
        index = jnp.arange(query.shape[1])
        mask = attention_mask(visibility.segment_ids, visibility.segment_ids, index, index)
        if visibility.branch_ids is not None:
            mask = mask & branch_mask(visibility.branch_ids)[:, None]
        return attend(config, query, key, value, Visibility(mask=mask))
    if mesh.empty or mesh.size == 1:
        return kernel(query, key, value, *ids)
    # jit does not partition a Pallas kernel: each device runs it on its rows and heads.
    batch_axes = tuple(axis for axis in sharding.BATCH_AXES if axis in mesh.axis_names)
    batch_shards = math.prod(mesh.shape[axis] for axis in batch_axes)
    rows = batch_axes if batch_axes and query.shape[0] % batch_shards == 0 else None
    tensor = mesh.shape.get("tensor", 1)
    heads = "tensor" if tensor > 1 and query.shape[2] % tensor == 0 else None
    if heads and key.shape[2] % tensor:  # too few kv heads to split: each device takes its query heads' copy
        key, value = (jnp.repeat(x, query.shape[2] // key.shape[2], axis=2) for x in (key, value))
    heads_spec = jax.sharding.PartitionSpec(rows, None, heads, None)
    ids_spec = jax.sharding.PartitionSpec(rows, None)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(heads_spec,) * 3 + (ids_spec,) * len(ids),
                         out_specs=heads_spec, check_vma=False)(query, key, value, *ids)


class MLP(nnx.Module):

    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs):
        self.activation = ACTIVATIONS[config.activation]
        self.config = config

        def dense(name, i, o, axes):
            return _dense(i, o, axes, use_bias=config.mlp_bias, config=config, rngs=rngs, name=name)

        self.up = dense("up", config.embed_dim, config.mlp_dim, ("embed", "mlp"))
        self.gate = dense("gate", config.embed_dim, config.mlp_dim, ("embed", "mlp")) if config.gated_mlp else None
        self.down = dense("down", config.mlp_dim, config.embed_dim, ("mlp", "embed"))

    @property
    def input_layers(self):
        """The projections of the MLP's input: (gate, up), or (up,) ungated."""
        return (self.up,) if self.gate is None else (self.gate, self.up)

    def inputs_fusable(self):
        """Whether `input_layers` may run side by side: no LoRA adapter active on them, and an MLP width
        that the mesh's tensor axis divides."""
        return _no_active_adapter(*self.input_layers) and self.config.mlp_dim % tensor_slices() == 0

    def fusable(self):
        """Whether `projections` fuses gate and up: a gated MLP, asked for, and `inputs_fusable`."""
        return self.gate is not None and self.config.fused_gate_up and self.inputs_fusable()

    def projections(self, x):
        """`input_layers` of x [..., mlp]; gate and up fused into one matmul of x against the two kernels
        side by side (`side_by_side`, interleaved per slice of the tensor axis)."""
        layers = self.input_layers
        return side_by_side(x, layers, tensor_slices()) if self.fusable() else [layer(x) for layer in layers]

    def __call__(self, x, projected=None):
        """`projected`: x's `projections`, when the caller computed them."""
        projected = self.projections(x) if projected is None else projected
        if self.gate is None:
            hidden = self.activation(projected[0])
        else:
            gate, up = projected
            hidden = self.activation(gate) * up
        return self.down(hidden)


class Block(nnx.Module):

    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs):
        self.config = config
        self.parallel_residual = config.parallel_residual
        self.attention_norm = _norm(config, rngs)
        self.attention = Attention(config, rngs)
        self.mlp_norm = None if config.shared_block_norm else _norm(config, rngs)
        self.mlp = MLP(config, rngs)

    def fuses_inputs(self):
        """Whether a parallel block with one norm (GPT-J) projects it for attention and the MLP in one
        matmul (`side_by_side`): asked for, and q, k, v fused and the MLP's inputs fusable. Its
        backward then gets the norm's gradient from one matmul, not a sum of two."""
        return (self.config.fused_parallel_inputs and self.parallel_residual and self.mlp_norm is None
                and self.attention.fusable() and self.mlp.inputs_fusable())

    def __call__(self, x, positions, visibility, cache=None, cache_index=None):
        normed = self.attention_norm(x)
        if self.fuses_inputs():
            projected = side_by_side(normed, self.attention.projection_layers + self.mlp.input_layers,
                                     tensor_slices())
            attention_out, cache = self.attention(normed, positions, visibility, cache, cache_index, projected[:3])
            return x + attention_out + self.mlp(normed, projected[3:]), cache
        attention_out, cache = self.attention(normed, positions, visibility, cache, cache_index)
        if self.parallel_residual:
            mlp_in = normed if self.mlp_norm is None else self.mlp_norm(x)
            return x + attention_out + self.mlp(mlp_in), cache
        x = x + attention_out
        return x + self.mlp(self.mlp_norm(x)), cache


# ---------------------------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------------------------

def positions_and_visibility(config: DecoderConfig, shape, positions=None, segment_ids=None, branch_ids=None,
                             mask=None):
    """(positions [batch, time], `Visibility`) of a forward pass over rows of `shape` (arguments as
    `Decoder.__call__`): positions default to 0..time-1; tokens see the earlier tokens of their
    segment (of those in prefix-shared rows, the shared prompt and their own branch), or what the
    explicit mask shows; with a sliding window, within the window. The segment and branch ids go
    to a fused kernel as they are; the dense path gets them as a mask [batch, 1, time, time]."""
    batch, length = shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if segment_ids is None:
        segment_ids = jnp.ones((batch, length), dtype=jnp.int32)
    if mask is None and config.fused_attention:
        return positions, Visibility(segment_ids=segment_ids, branch_ids=branch_ids)
    if mask is None:
        index = jnp.arange(length)
        mask = attention_mask(segment_ids, segment_ids, index, index, positions, positions, config.sliding_window)
        if branch_ids is not None:
            mask = mask & branch_mask(branch_ids)[:, None]
    else:
        mask = mask[:, None]
        if config.sliding_window:  # the window still applies to an explicit mask
            mask = mask & _within_window(positions, positions, config.sliding_window)
    if config.attention_block_size:
        # Nothing reads padding's outputs; hiding every key from it lets the blockwise attention
        # skip the padding tail's blocks (half the visible blocks of a padded HH row). The dense
        # path keeps padding attending to padding, so that no softmax row is empty.
        mask = mask & (segment_ids != 0)[:, None, :, None]
    return positions, Visibility(mask=mask)


def branch_mask(branch_ids):
    """[batch, time, time] of prefix-shared rows: the key is in the shared prompt (branch 0) or in the
    query's own branch; and-ed with `attention_mask`."""
    return (branch_ids[:, None, :] == kernels.PROMPT_BRANCH) | (branch_ids[:, :, None] == branch_ids[:, None, :])


def init_cache(config: DecoderConfig, batch_size, num_slots):
    """An empty KV cache for `num_slots` tokens: slots with segment id 0 are never attended by real tokens."""
    shape = (batch_size, num_slots, config.num_kv_heads, config.resolved_head_dim)
    dtype = jnp.dtype(config.dtype)
    return {
        "index": jnp.zeros((), jnp.int32),  # next slot to write
        "segment_ids": jnp.zeros((batch_size, num_slots), jnp.int32),
        "positions": jnp.zeros((batch_size, num_slots), jnp.int32),
        # Separate buffers per layer, so a cache made outside jit can be donated.
        "layers": [{"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}
                   for _ in range(config.num_layers)],
    }


class Decoder(nnx.Module):
    """`decoder(input_ids, positions=None, segment_ids=None) -> logits [batch, time, vocab]`."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        param_dtype = jnp.dtype(config.param_dtype)
        self.token_embedding = nnx.Embed(
            config.vocab_size, config.embed_dim, dtype=jnp.dtype(config.dtype), param_dtype=param_dtype,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed")), rngs=rngs)
        if config.position_embedding == "learned":
            self.position_embedding = nnx.Embed(
                config.max_position_embeddings, config.embed_dim, dtype=jnp.dtype(config.dtype),
                param_dtype=param_dtype,
                embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.01), (None, "embed")), rngs=rngs)
        else:
            self.position_embedding = None
        self.blocks = nnx.List([Block(config, rngs) for _ in range(config.num_layers)])
        self.final_norm = _norm(config, rngs)
        if config.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Dense(config.embed_dim, config.vocab_size, ("embed", "vocab"),
                                 use_bias=config.lm_head_bias, config=config, rngs=rngs)

    def __call__(self, input_ids, positions: Optional[jax.Array] = None, segment_ids: Optional[jax.Array] = None,
                 *, branch_ids: Optional[jax.Array] = None, mask: Optional[jax.Array] = None):
        """Logits [batch, time, vocab].

        positions: [batch, time] (default 0..time-1); restart them per packed sequence.
        segment_ids: [batch, time]; tokens attend causally within their segment, 0 marks padding.
        branch_ids: [batch, time], prefix-shared rows (`dpo_jax.data.layouts`): within a segment, a
            token sees the shared prompt (branch 0) and its own branch only, so two responses
            attend to one prompt but not to each other.
        mask: [batch, time, time] bool, replacing the causal/segment mask (the dense path).
        """
        positions, visibility = positions_and_visibility(self.config, input_ids.shape, positions, segment_ids,
                                                         branch_ids, mask)
        logits, _ = self._forward(input_ids, positions, visibility)
        return logits

    def features(self, input_ids, positions: Optional[jax.Array] = None, segment_ids: Optional[jax.Array] = None,
                 *, branch_ids: Optional[jax.Array] = None, mask: Optional[jax.Array] = None):
        """The final normed hidden states [batch, time, embed_dim], before the unembedding (arguments as
        `__call__`): the input of scalar heads (reward and value models)."""
        positions, visibility = positions_and_visibility(self.config, input_ids.shape, positions, segment_ids,
                                                         branch_ids, mask)
        hidden, _ = self._trunk(input_ids, positions, visibility)
        return hidden

    def decode(self, input_ids, positions, segment_ids, cache, *, last_only=False):
        """Runs `input_ids` [batch, time] into the next `time` slots of `cache`: (logits, updated cache).

        last_only: logits of the last position only, [batch, 1, vocab] (a prompt needs no more).
        """
        start = cache["index"]
        length = input_ids.shape[1]
        key_segment_ids = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids, start, axis=1)
        key_positions = jax.lax.dynamic_update_slice_in_dim(cache["positions"], positions, start, axis=1)
        mask = attention_mask(segment_ids, key_segment_ids, start + jnp.arange(length),
                              jnp.arange(key_segment_ids.shape[1]), positions, key_positions,
                              self.config.sliding_window)
        logits, layers = self._forward(input_ids, positions, Visibility(mask=mask), cache["layers"], start, last_only)
        return logits, {"index": start + length, "segment_ids": key_segment_ids, "positions": key_positions,
                        "layers": layers}

    def unembedding(self):
        """The output layer as a function of final hidden states [..., embed_dim] (from `features`) to
        float32 logits [..., vocab], its weights cast once, outside any loop that calls it chunk by chunk.

        The matmul runs in the compute dtype and returns its float32 accumulator (`float32_matmul`):
        rounding logits of magnitude ~10 to bfloat16 would add up to 0.03 (2^-8 of them) to each
        token's log-prob error."""
        if self.lm_head is not None:  # untied: `lm_head`'s weights (never a LoRA target), float32 out
            head = self.lm_head
            kernel = head.kernel[...].astype(head.dtype)
            bias = None if head.bias is None else head.bias[...].astype(jnp.float32)

            def logits(hidden):
                out = float32_matmul(hidden.astype(head.dtype), kernel)
                return out if bias is None else out + bias

            return logits
        dtype = self.token_embedding.dtype  # tied: `nnx.Embed.attend`, as one 2-D matmul
        embedding = self.token_embedding.embedding[...].astype(dtype)
        return lambda hidden: float32_matmul(hidden.astype(dtype), embedding, transposed=True)

    def _forward(self, input_ids, positions, visibility, layer_caches=None, cache_index=None, last_only=False):
        x, new_caches = self._trunk(input_ids, positions, visibility, layer_caches, cache_index, last_only)
        return self.unembedding()(x), new_caches

    def _trunk(self, input_ids, positions, visibility, layer_caches=None, cache_index=None, last_only=False):
        config = self.config
        x = self.token_embedding(input_ids)
        if config.scale_embeddings:
            # Gemma multiplies by sqrt(width) rounded to the activation dtype, as its reference code does.
            x = x * jnp.asarray(math.sqrt(config.embed_dim), x.dtype)
        if self.position_embedding is not None:
            x = x + self.position_embedding(positions)
        new_caches = []
        for i, block in enumerate(self.blocks):
            if layer_caches is not None:
                x, layer_cache = block(x, positions, visibility, layer_caches[i], cache_index)
                new_caches.append(layer_cache)
            elif config.remat:
                x, _ = nnx.remat(lambda blk, h: blk(h, positions, visibility))(block, x)
            else:
                x, _ = block(x, positions, visibility)
        return self.final_norm(x[:, -1:] if last_only else x), new_caches
