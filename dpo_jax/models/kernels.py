"""Causal attention within packed segments, by fused kernels on TPU and GPU.

A packed row holds several sequences told apart by segment ids (0 marks padding). The decoder's
mask path (`dpo_jax.models.transformer`) gives `jax.nn.dot_product_attention`, which takes no
segment ids, an explicit [batch, 1, time, time] boolean mask: it is stored and read whole, and every
(query, key) pair is computed. The kernels here take the segment ids themselves and build the mask
inside each block:
  - "splash": `jax.experimental.pallas.ops.tpu.splash_attention` (TPU), its static causal mask
    and-ed with `SegmentIds`; block pairs above the diagonal are never visited;
  - "pallas_gpu": `jax.experimental.pallas.ops.gpu.attention.mha` (GPU, Triton), `causal=True`
    with segment ids;
  - "dense": `jax.nn.dot_product_attention` with the explicit mask: the reference, and the CPU path.
All three compute the same function, and on CPU the two kernels run in Pallas interpret mode
(`interpret=True`), which is how `tests/test_kernels.py` holds them to the dense reference.

Prefix-shared rows (`prefix_shared_attention`) hold prompt | chosen | rejected of a pair in one
segment, and the rejected response must see the prompt but not the chosen response: no single
segment-id mask says that. So the kernels attend over a longer row in which each pair's prompt keys
and values are copied right in front of its rejected branch, and the copy and the rejected branch
form a segment of their own: causality and segment ids then give exactly the prefix-shared mask.
The copies are gathers, so gradients flow back to the prompt by the gather's transpose (summed over
both branches), and the kernel's row is at most twice the row (`attention_length`).
"""

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.gpu import attention as gpu_attention
from jax.experimental.pallas.ops.tpu import splash_attention

IMPLEMENTATIONS = ("dense", "splash", "pallas_gpu")
# Splash puts keys in the 128 lanes of a TPU vector register, and with segment ids its backward pass
# puts queries there too: both block sizes must be multiples of the lane count.
TPU_LANES = 128
# The GPU kernel's backward pass holds blocks of q, k, v, the output gradient and their products in
# shared memory at once; 32 is the upstream default that fits it for head dims up to 128.
GPU_BACKWARD_BLOCK_SIZE = 32


def default_implementation(backend=None):
    """The implementation for a backend (default: `jax.default_backend()`): tpu -> splash, gpu -> pallas_gpu,
    anything else -> dense."""
    backend = backend or jax.default_backend()
    return {"tpu": "splash", "gpu": "pallas_gpu"}.get(backend, "dense")


def resolve(implementation, backend=None):
    """An implementation name with "auto" replaced by `default_implementation(backend)`."""
    return default_implementation(backend) if implementation == "auto" else implementation


def segment_attention(query, key, value, segment_ids, *, implementation="dense", block_size=128, interpret=False):
    """Softmax attention of each token over the earlier tokens of its own segment and itself.

    query: [batch, time, num_heads, head_dim]; key, value: [batch, time, num_kv_heads, head_dim],
    num_kv_heads dividing num_heads (grouped-query attention: query head h reads kv head
    h // (num_heads // num_kv_heads), as `jax.nn.dot_product_attention` groups them);
    segment_ids: [batch, time] int, 0 for padding. Logits are scaled by 1 / sqrt(head_dim).
    Returns [batch, time, num_heads, head_dim] in query's dtype (key and value are cast to it).
    Padding tokens output 0 and pass no gradient, so their garbage cannot reach anything.

    implementation: "dense", "splash", "pallas_gpu" (see the module docstring), or "auto" for
        `default_implementation()`.
    block_size: the kernels' query and key block along time. The time axis is padded inside to a
        whole number of blocks (the padding is segment 0, seen by no real token), and a block is
        never larger than the padded row needs. splash: a multiple of 128 (TPU lanes), for the
        forward and both backward kernels. pallas_gpu: a power of two >= 16 (Triton's block
        shapes), for the forward pass; its backward uses blocks of min(block_size,
        GPU_BACKWARD_BLOCK_SIZE). Any head_dim is accepted (the GPU kernel pads it to a power of
        two inside; on TPU a multiple of 128 fills the lanes). Ignored by "dense".
    interpret: run the kernel's Pallas program in interpret mode (on CPU); for splash also a
        `jax.experimental.pallas.tpu.InterpretParams()`, the TPU-faithful interpreter.
    """
    implementation = resolve(implementation)
    batch, length, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    if key.shape != value.shape or key.shape[:2] != (batch, length) or key.shape[3] != head_dim:
        raise ValueError(f"segment_attention: key {key.shape} and value {value.shape} must be "
                         f"[batch, time, kv_heads, head_dim] of query {query.shape}")
    if num_heads % num_kv_heads:
        raise ValueError(f"segment_attention: {num_kv_heads} kv heads must divide {num_heads} query heads")
    if segment_ids.shape != (batch, length):
        raise ValueError(f"segment_attention: segment_ids {segment_ids.shape} must be [batch, time] {(batch, length)}")
    key, value = key.astype(query.dtype), value.astype(query.dtype)
    segment_ids = segment_ids.astype(jnp.int32)
    if implementation == "dense":
        out = _dense(query, key, value, segment_ids)
    elif implementation == "splash":
        out = _splash(query, key, value, segment_ids, block_size, interpret)
    elif implementation == "pallas_gpu":
        out = _pallas_gpu(query, key, value, segment_ids, block_size, interpret)
    else:
        raise ValueError(f"segment_attention: implementation={implementation!r} is not one of "
                         f"{IMPLEMENTATIONS + ('auto',)}")
    return jnp.where((segment_ids != 0)[:, :, None, None], out, 0).astype(query.dtype)


def attention_length(length, prefix_shared):
    """Slots of the row a fused kernel attends over for a row of `length` tokens: twice as many for
    prefix-shared rows (room for a copy of every prompt token), else the row itself."""
    return 2 * length if prefix_shared else length


def prefix_shared_attention(query, key, value, segment_ids, branch_ids, *, implementation="dense", block_size=128,
                            interpret=False):
    """Softmax attention of prefix-shared rows (`dpo_jax.data.layouts`): each token attends causally
    within its segment (a pair) to the shared prompt (branch 0) and to its own branch only.

    branch_ids: [batch, time] int, 0 for the prompt (and padding), 1 the chosen response, 2 the
    rejected one; each pair's prompt is contiguous and precedes its two branches. Other arguments
    and the result as `segment_attention`; "dense" applies the mask itself, the kernels attend over
    rows with the prompt copied (the module docstring), of `attention_length(time, True)` slots.
    """
    implementation = resolve(implementation)
    if branch_ids.shape != segment_ids.shape:
        raise ValueError(f"prefix_shared_attention: branch_ids {branch_ids.shape} must be shaped like "
                         f"segment_ids {segment_ids.shape}")
    segment_ids, branch_ids = segment_ids.astype(jnp.int32), branch_ids.astype(jnp.int32)
    if implementation == "dense":
        index = jnp.arange(query.shape[1])
        mask = ((index[:, None] >= index[None, :]) & (segment_ids[:, :, None] == segment_ids[:, None, :])
                & ((branch_ids[:, None, :] == PROMPT_BRANCH) | (branch_ids[:, :, None] == branch_ids[:, None, :])))
        out = jax.nn.dot_product_attention(query, key.astype(query.dtype), value.astype(query.dtype),
                                           mask=mask[:, None])
        return jnp.where((segment_ids != 0)[:, :, None, None], out, 0).astype(query.dtype)
    source, expanded_segment_ids, destination = jax.vmap(_with_prompt_copies)(segment_ids, branch_ids)
    gather = lambda x: jnp.take_along_axis(x, source[:, :, None, None], axis=1)
    out = segment_attention(gather(query), gather(key), gather(value), expanded_segment_ids,
                            implementation=implementation, block_size=block_size, interpret=interpret)
    return jnp.take_along_axis(out, destination[:, :, None, None], axis=1)


PROMPT_BRANCH, REJECTED_BRANCH = 0, 2  # as `dpo_jax.data.layouts`, which the pure core does not import


def _with_prompt_copies(segment_ids, branch_ids):
    """One prefix-shared row [time] laid out for a segment-masked kernel, as index arrays:
    (source [2 time]: the row slot each kernel slot reads, segment ids [2 time] of the kernel slots,
    destination [time]: the kernel slot of each row slot). A pair k (segment k) becomes segment 2k
    (prompt and chosen) and segment 2k + 1 (the prompt's copy and rejected); unused slots are 0."""
    length = segment_ids.shape[0]
    index = jnp.arange(length)
    real = segment_ids != 0
    prompt = real & (branch_ids == PROMPT_BRANCH)
    rejected = real & (branch_ids == REJECTED_BRANCH)
    num_segments = length + 1  # segment ids of a row are at most its length
    prompt_length = jax.ops.segment_sum(prompt.astype(jnp.int32), segment_ids, num_segments)
    prompt_start = jax.ops.segment_min(jnp.where(prompt, index, length), segment_ids, num_segments)
    previous_rejected = jnp.concatenate([jnp.zeros(1, bool), rejected[:-1]])
    previous_segment = jnp.concatenate([jnp.zeros(1, segment_ids.dtype), segment_ids[:-1]])
    opens_rejected = rejected & ~(previous_rejected & (previous_segment == segment_ids))
    # Each token moves right by the copies inserted up to it: a pair's prompt in front of its rejected branch.
    destination = index + jnp.cumsum(jnp.where(opens_rejected, prompt_length[segment_ids], 0))
    rejected_start = jax.ops.segment_max(jnp.where(opens_rejected, destination, -1), segment_ids, num_segments)
    copy_slot = rejected_start[segment_ids] - prompt_length[segment_ids] + index - prompt_start[segment_ids]
    # A prompt whose pair has no rejected branch in the row has no copy (its slots fall outside).
    copy_slot = jnp.where(prompt & (rejected_start[segment_ids] >= 0), copy_slot, 2 * length)
    expanded = jnp.where(real, 2 * segment_ids + rejected, 0)
    source = jnp.zeros(2 * length, jnp.int32).at[destination].set(index).at[copy_slot].set(index, mode="drop")
    kernel_segment_ids = (jnp.zeros(2 * length, jnp.int32).at[destination].set(expanded)
                          .at[copy_slot].set(2 * segment_ids + 1, mode="drop"))
    return source, kernel_segment_ids, destination


def _dense(query, key, value, segment_ids):
    # Padding attends to earlier padding, so that no softmax row is empty; its output is dropped.
    index = jnp.arange(query.shape[1])
    mask = (index[:, None] >= index[None, :]) & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return jax.nn.dot_product_attention(query, key, value, mask=mask[:, None])


def _pad_time(x, length):
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1])) + ((0, 0),) * (x.ndim - 2))


def _round_up(x, multiple):
    return -(-x // multiple) * multiple


def _splash(query, key, value, segment_ids, block_size, interpret):
    if block_size <= 0 or block_size % TPU_LANES:
        raise ValueError(f"segment_attention: splash needs block_size a multiple of {TPU_LANES}, got {block_size}")
    _, length, num_heads, head_dim = query.shape
    block = min(block_size, _round_up(length, TPU_LANES))
    padded = _round_up(length, block)
    # Splash takes the logits unscaled; scaling the query in float32 rounds once, to its dtype.
    query = (query.astype(jnp.float32) / math.sqrt(head_dim)).astype(query.dtype)
    # The kernel takes one row, head-major: [heads, time, head_dim].
    query, key, value = (_pad_time(x, padded).transpose(0, 2, 1, 3) for x in (query, key, value))
    segment_ids = _pad_time(segment_ids, padded)
    mask = splash_attention.MultiHeadMask([splash_attention.CausalMask((padded, padded))] * num_heads)
    blocks = splash_attention.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                                         block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                                         block_q_dq=block, block_kv_dq=block)
    kernel = splash_attention.make_splash_mha_single_device(mask, block_sizes=blocks, interpret=interpret)
    rows = (query, key, value, splash_attention.SegmentIds(q=segment_ids, kv=segment_ids))
    if isinstance(interpret, pltpu.InterpretParams):
        # The TPU interpreter of JAX 0.10 misses the grid axis vmap adds to a kernel (a safe_zip
        # error over its dimension semantics); Mosaic itself handles it. There, rows go one by one.
        out = jax.lax.map(lambda row: kernel(*row), rows)
    else:
        out = jax.vmap(kernel)(*rows)
    return out.transpose(0, 2, 1, 3)[:, :length]


def _pallas_gpu(query, key, value, segment_ids, block_size, interpret):
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"segment_attention: pallas_gpu needs block_size a power of two >= 16, got {block_size}")
    _, length, num_heads, head_dim = query.shape
    block = min(block_size, max(16, 1 << (length - 1).bit_length()))
    padded = _round_up(length, block)
    backward = min(block, GPU_BACKWARD_BLOCK_SIZE)
    # The kernel reads kv head h for query head h: grouped heads are repeated (their gradients summed back).
    groups = num_heads // key.shape[2]
    key, value = (jnp.repeat(x, groups, axis=2) for x in (key, value))
    query, key, value = (_pad_time(x, padded) for x in (query, key, value))
    blocks = gpu_attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=backward, block_kv_dkv=backward,
                                      block_q_dq=backward, block_kv_dq=backward)
    out = gpu_attention.mha(query, key, value, _pad_time(segment_ids, padded), sm_scale=1.0 / math.sqrt(head_dim),
                            causal=True, block_sizes=blocks, interpret=interpret)
    return out[:, :length]
