r"""Benchmarks: `python -m dpo_jax.bench --config=configs/bench_hh.py [--config.x=...] [--mode=...]`.

Modes:
  step          (default) The DPO train step on the config's data and model, after warm-up and
                excluding compilation, in `bench.rounds` rounds of `bench.steps` steps: pairs/s, real
                and padded tokens/s, CPU-seconds per pair, model FLOPs per step, MFU against the
                device's peak (CPU: a matmul probe in the compute dtype re-run before every round, MFU
                against its median with its range; TPU/GPU: the vendor figure), compile seconds,
                peak memory, and the time per phase (policy forward+backward, reference forward,
                optimizer, input wait).
                `config.bench` switches the levers.
                --compare=trl also runs TRL's DPOTrainer on the same pairs, tokenizer, architecture
                (any family `dpo_jax.models.hf` writes) and batch, in a subprocess whose rounds
                alternate with dpo_jax's: the ratio is the median of the per-round ratios, with their
                range. --ab_config=<config> measures a second config against the first in the same
                process, in the same alternating rounds (a lever's on/off ratio):
                  python -m dpo_jax.bench --config=configs/bench_hh.py \
                      --ab_config=configs/bench_hh.py --ab_config.bench.prefetch=False
  --suite       --compare=trl on every shape of SUITE (configs/bench_hh.py's args), each in its own
                process: one JSON per shape and the markdown table in --suite_dir.
  state_memory  Train-state bytes per device of the DPO stage under each reference strategy, from
                shapes alone on the local devices.
  logps         Sequence log-probs (forward and backward, from the final hidden states) on one
                batch's tokens: full logits against the memory-bounded `losses.chunked_sequence_logps`
                and `losses.scored_token_logps`, compiled temporary bytes and seconds, for each of
                --logps_vocab_sizes.
  device_check  What to run first on a new machine (`launch/device_check.sh`, `dpo_jax/device_check.py`):
                the fused attention kernels against the dense path on this device, a short SFT->DPO
                run, the step benchmark; one JSON summary, exit code 1 if anything is off.
  --plan        Per-device memory (parameters, optimizer, reference, gradients, activations with and
                without remat) and step time of the config on an accelerator and mesh that need not be
                here, from shapes, FLOPs, bytes and the chip's vendor figures, on the attention path the
                training forward takes there (the chip's fused kernel, unless model.attention_kernel or
                a sliding window makes it dense); and activations by row length, dense against fused:
                  python -m dpo_jax.bench --plan --config=configs/quickstart.py:model=pythia-2.8b \
                      --accelerator=tpu-v5p --mesh=data=2,fsdp=8
The last line printed is one JSON object with the figures.
"""

import collections
import contextlib
import dataclasses
import functools
import json
import math
import os
import queue
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from dpo_jax import device_check, losses, models, planning, reference, sharding, stages, steps
from dpo_jax.configs import bench_config, validation
from dpo_jax.data import loader, task, tokenize
from dpo_jax.metrics import METRICS_LAG
from dpo_jax.models import hf, kernels, sampling, transformer
from dpo_jax.stages import dpo as dpo_stage

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bench_hh.py", "Config file.", lock_config=False)
_MODE = flags.DEFINE_enum("mode", "step", ["step", "state_memory", "logps", "sampling", "device_check"],
                          "What to measure (device_check: dpo_jax/device_check.py, which reads no --config).")
_COMPARE = flags.DEFINE_enum("compare", "none", ["none", "trl"], "step mode: also time TRL's DPOTrainer.")
_PLAN = flags.DEFINE_bool("plan", False, "Estimate memory and step time on --accelerator and --mesh.")
_ACCELERATOR = flags.DEFINE_string("accelerator", "tpu-v5p", "--plan: tpu-v4 | tpu-v5e | tpu-v5p | h100 | h200.")
_MESH = flags.DEFINE_string("mesh", "", "--plan: mesh axis sizes, e.g. data=2,fsdp=8 (default: config.mesh, "
                                        "with -1 read as 1).")
_LOGPS_VOCAB_SIZES = flags.DEFINE_list("logps_vocab_sizes", ["8192", "65536"], "logps mode: vocabularies.")
_AB_CONFIG = config_flags.DEFINE_config_file(
    "ab_config", None, "step mode: a second config (B) measured against --config (A) in the same process, "
    "e.g. --ab_config=configs/bench_hh.py --ab_config.bench.prefetch=False.", lock_config=False)
_TRL_WORKER = flags.DEFINE_string("trl_worker", "", "Internal: run TRL on this spec file, in rounds asked on stdin.")
_SUITE = flags.DEFINE_bool("suite", False, "Every shape of SUITE beside TRL, each in its own process: one JSON "
                           "per shape and a markdown table in --suite_dir.")
_SUITE_DIR = flags.DEFINE_string("suite_dir", "", "--suite: where the JSON files and suite.md go "
                                 "(default: <bench.workdir>/suite).")
_SUITE_SHAPES = flags.DEFINE_list("suite_shapes", [], "--suite: the shapes to run (default: all of SUITE).")
_DEVICE_CHECK_WORKDIR = flags.DEFINE_string(
    "device_check_workdir", "", "device_check: where its run, prepared data and tokenizer go (default: a "
    "temporary directory, removed at the end).")
_DEVICE_CHECK_DATA = flags.DEFINE_string(
    "device_check_data", "", "device_check: the directory of the HH raw files (harmless-base/test.jsonl.gz), or "
    "'synthetic' (default: ../shared/data/hh-rlhf next to the repository when it holds them, else synthetic).")
_DEVICE_CHECK_SIZE = flags.DEFINE_enum("device_check_size", "standard", ["standard", "tiny"],
                                       "device_check: standard, or tiny (every part in seconds: CI).")

# bench.attention_block_size=-1 on CPU: blocks of 64 (queries x keys) skip most of a packed row of
# prefix-shared HH pairs (59% of the pairs they compute are attended, against 40% at 128) while
# keeping each block's matmuls large enough to be efficient (32 is no faster: more, smaller steps).
DEFAULT_CPU_ATTENTION_BLOCK = 64
# Keys of Hugging Face configs that set dropout: zeroed for TRL, since dpo_jax trains without any.
TRL_DROPOUTS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout",
                "summary_first_dropout")


@dataclasses.dataclass(frozen=True)
class SuiteShape:
    """A shape of `--suite`: the `configs/bench_hh.py` args that make it, and the ratio to TRL it aims at."""
    arg: str
    target: float
    what: str


SUITE = {
    "a_default": SuiteShape("", 8.0, "GPT-2 4x256, packed prefix-shared rows, live reference"),
    "b_gpt2_6x512": SuiteShape("model=gpt2_6x512", 5.0, "GPT-2 6x512, 8 heads"),
    "c_llama_6x512": SuiteShape("model=llama_6x512", 5.0, "Llama 6x512 (GQA 8/2 heads, SwiGLU, RoPE, untied)"),
    "d_long": SuiteShape("long", 5.0, "HH up to 1024 tokens (prompts up to 768), rows of 2048"),
    "e_padded": SuiteShape("layout=padded", 2.0, "padded layout: one pair per row, as TRL has it"),
    "f_precomputed": SuiteShape("reference=precomputed", 8.0, "precomputed reference on both sides"),
}
# The fields of each shape in --suite's last line (the shape's JSON file has them all).
SUITE_SUMMARY = ("pairs_per_sec", "trl_ratio", "trl_ratio_range", "target", "trl_cpu_ratio", "mfu",
                 "peak_flops_range", "compile_sec", "peak_memory_bytes", "trl_memory_ratio")


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """Vendor figures per chip: dense bf16 peak, HBM capacity and bandwidth, interconnect bandwidth."""
    peak_flops: float
    hbm_bytes: float
    hbm_bytes_per_sec: float
    interconnect_bytes_per_sec: float  # ICI (TPU) / NVLink (GPU), per chip and direction
    device_kinds: tuple               # jax device_kind strings that are this chip
    backend: str                      # its jax backend ("tpu", "gpu"): which fused attention kernel runs


# From the vendors' spec sheets. They give a chip's interconnect bandwidth in both directions
# together; the table holds one direction, half of it.
ACCELERATORS = {
    # cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16; HBM2 32 GiB at 1200 GB/s. The page gives no
    # per-chip ICI figure: 300 GB/s is an estimate.
    "tpu-v4": Accelerator(275e12, 32 * 2**30, 1200e9, 300e9, ("TPU v4",), "tpu"),
    # cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16; HBM2 16 GiB at 819 GB/s; ICI 400 GB/s bidirectional.
    "tpu-v5e": Accelerator(197e12, 16 * 2**30, 819e9, 200e9, ("TPU v5 lite", "TPU v5e"), "tpu"),
    # cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16; HBM2e 95 GiB at 2765 GB/s; ICI 1200 GB/s bidirectional.
    "tpu-v5p": Accelerator(459e12, 95 * 2**30, 2765e9, 600e9, ("TPU v5p", "TPU v5"), "tpu"),
    # nvidia.com/en-us/data-center/h100 (H100 SXM): BF16 Tensor Core 1,979 TFLOP/s with sparsity,
    # 989 dense; HBM3 80 GB at 3.35 TB/s; NVLink 900 GB/s bidirectional.
    "h100": Accelerator(989e12, 80e9, 3.35e12, 450e9, ("H100",), "gpu"),
    # nvidia.com/en-us/data-center/h200 (H200 SXM): the H100's Tensor Cores (1,979 TFLOP/s BF16 with
    # sparsity, 989 dense); HBM3e 141 GB at 4.8 TB/s; NVLink 900 GB/s bidirectional.
    "h200": Accelerator(989e12, 141e9, 4.8e12, 450e9, ("H200",), "gpu"),
}


def _vendor_peak(device):
    """Dense bf16 peak FLOP/s of `device` from ACCELERATORS, or None for an unknown chip."""
    for accelerator in ACCELERATORS.values():
        if any(kind in device.device_kind for kind in accelerator.device_kinds):
            return accelerator.peak_flops
    return None


# ---------------------------------------------------------------------------------------------
# FLOPs and bytes
# ---------------------------------------------------------------------------------------------

def matmul_flops_per_token(decoder_config):
    """Forward FLOPs per token of the weight matmuls (2 per multiply-add), output projection included."""
    c = decoder_config
    head_dim = c.resolved_head_dim
    attention = c.embed_dim * head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)  # q, out; k, v
    mlp = (3 if c.gated_mlp else 2) * c.embed_dim * c.mlp_dim
    return 2 * (c.num_layers * (attention + mlp) + c.embed_dim * c.vocab_size)


def attention_flops_per_pair(decoder_config):
    """Forward FLOPs per (query, key) pair attended: scores and weighted values, in every layer."""
    return 4 * decoder_config.num_layers * decoder_config.num_heads * decoder_config.resolved_head_dim


def _attended_pairs(segment_ids, branch_ids=None):
    """(query, key) pairs a row's real tokens attend to: causal within a segment and, with prefix
    sharing, a response branch sees the shared prompt and itself only (steps._prefix_shared_mask)."""
    total = 0
    for row, segments in enumerate(segment_ids):
        for segment in np.unique(segments[segments > 0]):
            members = segments == segment
            if branch_ids is None:
                n = int(members.sum())
                total += n * (n + 1) // 2
                continue
            counts = np.bincount(branch_ids[row][members], minlength=3)
            prompt = int(counts[0])
            total += prompt * (prompt + 1) // 2 + sum(int(n) * prompt + int(n) * (int(n) + 1) // 2 for n in counts[1:])
    return total


def computed_attention_pairs(decoder_config, segment_ids, branch_ids=None, positions=None):
    """(query, key) pairs the training attention of `decoder_config`'s dense path computes over rows
    [rows, time]: all time x time of each row with `attention_block_size` 0; with
    `blockwise_attention`, those of every block where the model's own mask
    (`transformer.positions_and_visibility`) shows a pair."""
    rows, time = segment_ids.shape
    block_size = decoder_config.attention_block_size
    if not block_size:
        return rows * time * time
    _, visibility = transformer.positions_and_visibility(decoder_config, (rows, time), positions, segment_ids,
                                                         branch_ids)
    padded = -(-time // block_size) * block_size
    mask = np.pad(np.asarray(visibility.mask)[:, 0], ((0, 0), (0, padded - time), (0, padded - time)))
    blocks = mask.reshape(rows, padded // block_size, block_size, padded // block_size, block_size).any(axis=(2, 4))
    return int(blocks.sum()) * block_size * block_size


def batch_stats(host_batch, decoder_config, live_reference):
    """Pairs, real and padded token slots, the (query, key) pairs attended and those the attention
    computes, and model FLOPs (real tokens only) of one host batch.

    The step runs the policy forward and backward (3 forwards' FLOPs) and, with a live reference,
    its forward: 4 forwards, or 3 with precomputed reference log-probs.
    """
    segment_keys = [key for key in host_batch if key.endswith("segment_ids")]
    real_tokens = sum(int(np.count_nonzero(host_batch[key])) for key in segment_keys)
    padded_tokens = sum(int(host_batch[key].size) for key in segment_keys)
    pairs = (int(np.count_nonzero(host_batch["pair_mask"])) if "pair_mask" in host_batch
             else len(host_batch["chosen_input_ids"]))
    attended = sum(_attended_pairs(host_batch[key], host_batch.get("branch_ids")) for key in segment_keys)
    computed = 0 if decoder_config.fused_attention else sum(  # a fused kernel's blocks are its own: not counted
        computed_attention_pairs(decoder_config, host_batch[key], host_batch.get("branch_ids"),
                                 host_batch.get(key.replace("segment_ids", "positions")))
        for key in segment_keys)
    forward = matmul_flops_per_token(decoder_config) * real_tokens + attention_flops_per_pair(decoder_config) * attended
    return {"pairs": pairs, "real_tokens": real_tokens, "padded_tokens": padded_tokens, "attended_pairs": attended,
            "computed_attention_pairs": computed, "model_flops": (4 if live_reference else 3) * forward}


def _abstract_bytes_per_device(abstract_tree):
    """Bytes per device of a tree of ShapeDtypeStructs with shardings (the shard of each leaf)."""
    total = 0
    for leaf in jax.tree.leaves(abstract_tree):
        shard_shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shard_shape)) * leaf.dtype.itemsize
    return total


def _state_bytes(abstract_state):
    """{params, opt_state, ref_params}: train-state bytes per device of an abstract state."""
    return {part: _abstract_bytes_per_device(getattr(abstract_state, part))
            for part in ("params", "opt_state", "ref_params")}


# ---------------------------------------------------------------------------------------------
# state_memory
# ---------------------------------------------------------------------------------------------

def state_memory(config):
    mesh = sharding.make_mesh(config.mesh)
    model = planning.plan_model(config, mesh)
    strategies = {"live float32": dict(reference="live", reference_dtype=""),
                  "live bfloat16": dict(reference="live", reference_dtype="bfloat16"),
                  "precomputed": dict(reference="precomputed", reference_dtype="")}
    results = {}
    for name, overrides in strategies.items():
        variant = config.copy_and_resolve_references()
        variant.dpo.update(overrides)
        results[name] = _state_bytes(stages.STAGES["dpo"].plan(variant, mesh, model).abstract_state)
        results[name]["total"] = sum(results[name].values())
    for name, parts in results.items():
        print(f"{name:<16}" + "  ".join(f"{part}={value / 2**20:,.1f} MiB" for part, value in parts.items()))
    return {"mode": "state_memory", "devices": mesh.size, "bytes_per_device": results}


# ---------------------------------------------------------------------------------------------
# logps: full logits against memory-bounded log-probs
# ---------------------------------------------------------------------------------------------

def logps_memory(config, vocab_sizes, repeats=3):
    """Compiled temporary bytes and median seconds of the gradient of sequence log-probs with
    respect to the hidden states and the output embedding: from full logits, chunk by chunk
    (`chunked_sequence_logps`), and from the scored tokens' logits only (`scored_token_logps`, as
    the train step with `model.logits_chunk_size`). The last third of each row is scored, about
    the responses' share of an HH row."""
    rows, row_length = _rows_per_batch(config)
    width = config.model.embed_dim
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    hidden = jax.random.normal(keys[0], (rows, row_length, width), jnp.float32)
    mask = jnp.broadcast_to(jnp.arange(row_length) >= 2 * row_length // 3, (rows, row_length)).astype(jnp.float32)
    variants = {
        "full": lambda h, e, labels: losses.sequence_logps(h @ e.T, labels, mask),
        "chunked": lambda h, e, labels: losses.chunked_sequence_logps(h, labels, mask, logits_fn=lambda x: x @ e.T),
        "scored": lambda h, e, labels: losses.scored_token_logps(h, labels, mask, lambda x: x @ e.T).sum(-1),
    }
    results = {}
    for vocab_size in vocab_sizes:
        embedding = jax.random.normal(keys[1], (vocab_size, width), jnp.float32) * 0.02
        labels = jax.random.randint(keys[2], (rows, row_length), 0, vocab_size)
        for name, fn in variants.items():
            grad_fn = jax.jit(jax.grad(lambda h, e, fn=fn, labels=labels: fn(h, e, labels).sum(), argnums=(0, 1)))
            compiled = grad_fn.lower(hidden, embedding).compile()
            results[f"{name} V={vocab_size}"] = {
                "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
                "seconds": _median_seconds(functools.partial(compiled, hidden, embedding), repeats)}
    print(f"{rows} rows x {row_length} tokens, width {width}: gradient of the sequence log-probs")
    for name, figures in results.items():
        print(f"  {name:<16}{figures['temp_bytes'] / 2**20:>10,.0f} MiB temporary{figures['seconds']:>9.3f} s")
    return {"mode": "logps", "rows": rows, "row_length": row_length, "results": results}


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------

def sampling_benchmark(config):
    """Generation throughput of the KV-cache sampler with a randomly initialised `config.model` on the
    default backend: `config.evaluation.batch_size` prompts of `config.data.max_prompt_length` random
    tokens, `config.evaluation.max_new_tokens` tokens each (no EOS), at temperature 1.

    Generates batch_size x max_new_tokens tokens after the prompts,
    timing a second call (the first compiles). Returns a dict with `tokens_per_sec` (generated tokens
    per second, prompt processing included) and `decode_tokens_per_sec` (the same without the
    prompt: the time of a one-token generation subtracted), and the seconds behind them.
    """
    model_config, seed, temperature = config.model, config.seed, 1.0
    batch_size, prompt_length = config.evaluation.batch_size, config.data.max_prompt_length
    max_new_tokens = config.evaluation.max_new_tokens
    graphdef, _, _ = models.abstract_model(model_config)
    params = models.init_params(model_config, seed=seed, shardings=None)
    prompts = np.random.RandomState(seed).randint(0, model_config.vocab_size, (batch_size, prompt_length))
    lengths = np.full(batch_size, prompt_length)

    def seconds(num_tokens):
        timings = []
        for _ in range(2):
            start = time.perf_counter()
            jax.block_until_ready(sampling.generate(graphdef, params, prompts, lengths, rng=jax.random.key(seed),
                                           max_new_tokens=num_tokens, temperature=temperature,
                                           length_bucket=prompt_length))
            timings.append(time.perf_counter() - start)
        return timings

    compile_and_run, total = seconds(max_new_tokens)
    _, prompt_only = seconds(1)
    return dict(mode="sampling", backend=jax.default_backend(), batch_size=batch_size, prompt_length=prompt_length,
                max_new_tokens=max_new_tokens, seconds=total, prompt_seconds=prompt_only,
                compile_seconds=compile_and_run - total, tokens_per_sec=batch_size * max_new_tokens / total,
                decode_tokens_per_sec=(batch_size * (max_new_tokens - 1) / (total - prompt_only)
                                       if total > prompt_only else float("nan")))  # nan: lost in timing noise


# ---------------------------------------------------------------------------------------------
# --plan: memory and step time on a mesh that is not here
# ---------------------------------------------------------------------------------------------

def _parse_mesh(text, mesh_config):
    sizes = {axis: max(int(mesh_config[axis]), 1) for axis in sharding.MESH_AXES}
    for item in filter(None, text.split(",")):
        axis, _, size = item.partition("=")
        if axis not in sizes:
            raise ValueError(f"--mesh: unknown axis {axis!r}; axes are {sharding.MESH_AXES}")
        sizes[axis] = int(size)
    return sizes


def _rows_per_batch(config):
    """(model rows, tokens per row) of one global batch in the config's layout."""
    data_config = config.data
    if data_config.layout == "padded":
        return 2 * config.train.global_batch_size, data_config.max_length
    return config.train.global_batch_size, data_config.row_length or 2 * data_config.max_length


# Row lengths of `--plan`'s activation memory by sequence length (the config's rows per device at each).
PLAN_ROW_LENGTHS = (512, 1024, 2048, 4096, 8192)
# An attention's backward pass in forwards' worth of its FLOPs (a forward: the scores Q K^T and the
# weighted values P V). Dense: dV, dP, dQ, dK from the kept weights, 4 matmuls. The fused kernels keep
# no weights, and recompute Q K^T and dO V^T in each of two passes (splash: its dq and dkv kernels;
# the Pallas GPU kernel: its dk/dv and dq loops), 7 matmuls.
ATTENTION_BACKWARD_FORWARDS = {"dense": 2.0, "splash": 3.5, "pallas_gpu": 3.5}


def plan_attention(config, accelerator_name):
    """The attention implementation of the config's training forward on `accelerator_name`:
    `config.model.attention_kernel`, "auto" read as the fused kernel of the chip's backend
    (`kernels.default_implementation`); "dense" for a sliding-window model, which the kernels lack."""
    accelerator = ACCELERATORS[accelerator_name]
    decoder_config = models.decoder_config(config.model)  # rejects an unknown kernel
    requested = config.model.get("attention_kernel", "auto")
    native = kernels.default_implementation(accelerator.backend)
    if decoder_config.sliding_window:
        return "dense"
    if requested not in ("auto", "dense", native):
        raise ValueError(f"model.attention_kernel={requested!r} does not run on {accelerator_name} "
                         f"(backend {accelerator.backend}): auto, dense or {native}")
    return native if requested == "auto" else requested


def attention_pairs_per_row(row_length, attention, *, prefix_shared, block_size):
    """(query, key) pairs one head of one layer computes on a row of `row_length` slots.

    dense: all row_length^2 (the [T, T] mask hides pairs, it skips none). Fused: the causal block
    pairs of the kernel's row, `kernels.attention_length` slots (twice the row for prefix-shared
    layouts, whose prompts are copied in front of their rejected branches); block pairs above the
    diagonal are never visited, those on it are computed whole.
    """
    if attention == "dense":
        return row_length ** 2
    length = kernels.attention_length(row_length, prefix_shared)
    block = min(block_size, length)
    blocks = -(-length // block)
    return blocks * (blocks + 1) // 2 * block ** 2


def activation_bytes_per_row(decoder_config, row_length, *, attention, remat, prefix_shared=False):
    """Bytes a row's forward keeps for the backward pass (the reference keeps none).

    Per layer and token, in the compute dtype: the block input, both norm outputs, the residual, the
    MLP's hidden pre- and post-activation (and gate). The attention adds, per layer:
      dense: q, k, v and the output, and the float32 softmax output [heads, keys] per token (what
        `jax.nn.dot_product_attention`'s XLA path computes its softmax in, and the softmax's
        backward reads); and once per forward, read by every layer, the boolean [T, T] mask;
      fused ("splash", "pallas_gpu"): q, k, v and the output and a float32 log-sum-exp per head, on
        each of the kernel's `kernels.attention_length` slots (2T for prefix-shared rows); nothing
        of size T^2.
    Plus the float32 logits and their log-softmax. With remat only each block's input is kept, and
    one block is recomputed at a time (the mask stays: every block reads it).
    """
    c = decoder_config
    itemsize = jnp.dtype(c.dtype).itemsize
    heads_width = c.num_heads * c.resolved_head_dim
    kv_width = c.num_kv_heads * c.resolved_head_dim
    qkv_out = itemsize * (2 * heads_width + 2 * kv_width)  # per attended slot
    block = itemsize * (4 * c.embed_dim + (3 if c.gated_mlp else 2) * c.mlp_dim) * row_length
    if attention == "dense":
        layer = block + (qkv_out + 4 * c.num_heads * row_length) * row_length
        mask = row_length ** 2
    else:
        layer = block + (qkv_out + 4 * c.num_heads) * kernels.attention_length(row_length, prefix_shared)
        mask = 0
    logits = 2 * 4 * c.vocab_size * row_length
    kept_layers = (itemsize * c.embed_dim * row_length * c.num_layers + layer) if remat else layer * c.num_layers
    return kept_layers + mask + logits


def plan(config, accelerator_name, mesh_text):
    """Per-device memory and step time of the config's DPO stage on `accelerator_name` x `mesh_text`,
    with the attention path the training forward takes there (`plan_attention`)."""
    if accelerator_name not in ACCELERATORS:
        raise ValueError(f"--accelerator={accelerator_name!r}: one of {sorted(ACCELERATORS)}")
    accelerator = ACCELERATORS[accelerator_name]
    sizes = _parse_mesh(mesh_text, config.mesh)
    mesh = jax.sharding.AbstractMesh(tuple(sizes[a] for a in sharding.MESH_AXES), sharding.MESH_AXES,
                                     axis_types=(jax.sharding.AxisType.Auto,) * len(sharding.MESH_AXES))
    model = planning.plan_model(config, mesh)
    stage = stages.STAGES["dpo"].plan(config, mesh, model)
    state = _state_bytes(stage.abstract_state)
    # The compute dtype of the target's backend ("auto"), not of the machine planning it.
    decoder_config = dataclasses.replace(models.decoder_config(config.model),
                                         dtype=models.compute_dtype(config.model.dtype, accelerator.backend))
    attention = plan_attention(config, accelerator_name)
    prefix_shared = config.data.layout.endswith("prefix_shared")
    block_size = config.model.get("attention_kernel_block_size", 128)

    rows, row_length = _rows_per_batch(config)
    batch_shards = math.prod(sizes[a] for a in sharding.BATCH_AXES)
    rows_per_device = rows / batch_shards / config.train.grad_accum_steps  # one micro-batch at a time
    attention_length = row_length if attention == "dense" else kernels.attention_length(row_length, prefix_shared)

    def activations_per_device(length, path, remat):
        # Heads and the MLP split over `tensor`; the rest of an activation is replicated there, so
        # this divides only approximately.
        return int(rows_per_device * activation_bytes_per_row(
            decoder_config, length, attention=path, remat=remat, prefix_shared=prefix_shared) / sizes["tensor"])

    activations = {f"activations{suffix}": activations_per_device(row_length, attention, remat)
                   for suffix, remat in (("", False), ("_remat", True))}
    fused = kernels.default_implementation(accelerator.backend)
    by_length = {str(length): {f"{name}{suffix}": activations_per_device(length, path, remat)
                               for name, path in (("dense", "dense"), ("fused", fused))
                               for suffix, remat in (("", False), ("_remat", True))}
                 for length in PLAN_ROW_LENGTHS}
    gradients = state["params"]
    live = dpo_stage.reference_mode(config.dpo) == "live"
    # Every slot counted as a token (the padded-layout bound); attention as the assumed path computes it.
    matmul_flops = rows * row_length * matmul_flops_per_token(decoder_config)
    attention_forward_flops = rows * attention_pairs_per_row(
        row_length, attention, prefix_shared=prefix_shared, block_size=block_size) * attention_flops_per_pair(
        decoder_config)
    # The policy's forward and backward and the live reference's forward; remat adds the policy's
    # forward once more, recomputed in its backward.
    attention_flops = int((1 + ATTENTION_BACKWARD_FORWARDS[attention] + live) * attention_forward_flops)
    step_flops = (3 + live) * matmul_flops + attention_flops
    step_flops_remat = step_flops + matmul_flops + attention_forward_flops
    devices = math.prod(sizes.values())
    compute_sec = step_flops / devices / accelerator.peak_flops
    # Collectives per step: FSDP gathers the parameters for each forward (policy, backward,
    # reference) and reduce-scatters the gradients; data parallelism all-reduces the gradients.
    param_bytes_total = _abstract_bytes_per_device(jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), model.abstract_params))
    fsdp, data_parallel = sizes["fsdp"], sizes["dcn"] * sizes["data"]
    gather = (fsdp - 1) / fsdp * param_bytes_total / sizes["tensor"]
    comm_bytes = (3 if live else 2) * gather + gather  # gathers + gradient reduce-scatter
    comm_bytes += 2 * (data_parallel - 1) / data_parallel * state["params"]
    comm_sec = comm_bytes / accelerator.interconnect_bytes_per_sec
    # HBM traffic floor: the step reads params, reference and optimizer state, and writes them back.
    memory_sec = (2 * sum(state.values()) + 2 * gradients) / accelerator.hbm_bytes_per_sec
    memory = {**state, "gradients": gradients, **activations}
    resident = sum(state.values()) + gradients
    totals = {"total": resident + activations["activations"],
              "total_remat": resident + activations["activations_remat"]}
    result = {"mode": "plan", "accelerator": accelerator_name, "mesh": sizes, "devices": devices,
              "layout": config.data.layout, "attention": attention, "attention_length": attention_length,
              "bytes_per_device": {**memory, **totals}, "hbm_bytes": accelerator.hbm_bytes,
              "fits": totals["total"] <= accelerator.hbm_bytes, "fits_with_remat": totals["total_remat"]
              <= accelerator.hbm_bytes, "activations_by_length": by_length,
              "flops_per_step": step_flops, "flops_per_step_remat": step_flops_remat,
              "attention_flops_per_step": attention_flops, "compute_sec_at_peak": compute_sec,
              "comm_sec": comm_sec, "hbm_sec": memory_sec,
              "step_sec_lower_bound": max(compute_sec, comm_sec, memory_sec),
              "step_sec_at_40pct_mfu": max(compute_sec / 0.4, comm_sec, memory_sec)}
    print(f"{accelerator_name} x {devices} ({', '.join(f'{a}={s}' for a, s in sizes.items())}): "
          f"{config.train.global_batch_size} units of {row_length} tokens per step, {attention} attention")
    for name, value in {**memory, **totals}.items():
        print(f"  {name:<18}{value / 2**30:>10.2f} GiB per device")
    print(f"  HBM {accelerator.hbm_bytes / 2**30:.0f} GiB: fits {result['fits']}, with remat "
          f"{result['fits_with_remat']}")
    print(f"  step: {step_flops:.3g} FLOPs ({attention_flops / step_flops:.0%} attention; with remat "
          f"{step_flops_remat:.3g}), compute {compute_sec * 1e3:.1f} ms at peak, collectives "
          f"{comm_sec * 1e3:.1f} ms, HBM {memory_sec * 1e3:.1f} ms; at 40% MFU "
          f"{result['step_sec_at_40pct_mfu'] * 1e3:.1f} ms")
    columns = next(iter(by_length.values()))
    print(f"  activations by row length, GiB per device ({rows_per_device:g} rows; dense against {fused}; "
          f"* over HBM with the {resident / 2**30:.2f} GiB above):")
    print("    " + f"{'tokens':>8}" + "".join(f"{name:>14}" for name in columns))
    for length, figures in by_length.items():
        print("    " + f"{length:>8}" + "".join(
            f"{value / 2**30:>13.2f}{'*' if resident + value > accelerator.hbm_bytes else ' '}"
            for value in figures.values()))
    return result


# ---------------------------------------------------------------------------------------------
# step: the measured benchmark
# ---------------------------------------------------------------------------------------------

def matmul_peak(dtype, size, repeats=5):
    """FLOP/s of the best of `repeats` square matmuls of `size` on the default device."""
    a, b = (jax.random.normal(jax.random.PRNGKey(i), (size, size), dtype) for i in range(2))
    product = jax.jit(jnp.matmul).lower(a, b).compile()
    product(a, b).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        product(a, b).block_until_ready()
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best


def _peak_probe(config):
    """(a function giving the devices' peak FLOP/s now, where its figure comes from). A CPU's peak
    moves with the machine's load, so its probe is re-run before every timed round."""
    device = jax.devices()[0]
    vendor = _vendor_peak(device)
    if device.platform != "cpu" and vendor:
        return (lambda: vendor * jax.device_count()), f"vendor {device.device_kind}"
    # All CPU devices of a process share its cores: one probe measures them all, in the compute
    # dtype (XLA:CPU's bf16 and float32 matmuls run at different peaks).
    dtype, size = jnp.dtype(config.model.dtype), config.bench.matmul_probe_size
    return (lambda: matmul_peak(dtype, size)), f"{dtype.name} matmul probe"


def _peak_rss():
    """This process's peak resident bytes: Linux's VmHWM (ru_maxrss would carry over the parent's
    peak into a subprocess such as the TRL run), else ru_maxrss (KiB on Linux)."""
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory():
    """(peak bytes, source): the device allocator's peak where it reports one, else the process's peak RSS."""
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return max(d.memory_stats()["peak_bytes_in_use"] for d in jax.local_devices()), "device"
    return _peak_rss(), "process_rss"


def ensure_tokenizer(config, workdir):
    """Real data without `data.tokenizer`: a byte-level BPE of model.vocab_size trained on the first
    dataset's split (prompt + chosen and prompt + rejected texts), cached in the workdir."""
    data_config = config.data
    if data_config.tokenizer or tuple(data_config.name) == ("synthetic",):
        return
    name, split = data_config.name[0], data_config.train_split
    directory = os.path.join(workdir, f"bpe{config.model.vocab_size}-{name.replace('/', '-')}-{split}")
    if not os.path.exists(os.path.join(directory, "tokenizer.json")):
        examples, _ = task.read_split(task.prepare(name, data_config), split, data_config)
        texts = [e["prompt"] + e[side] for side in ("chosen", "rejected") for e in examples]
        tokenize.train_byte_level_bpe(texts, directory, vocab_size=config.model.vocab_size)
    data_config.tokenizer = directory


def _resolve(config, workdir):
    """The benchmark's config: DPO only, the compute dtype resolved, a tokenizer, validated."""
    options = config.bench
    validation.normalize_lists(config)
    config.stages = ("dpo",)
    config.model.dtype = models.compute_dtype(options.compute_dtype)
    block_size = options.attention_block_size
    if block_size < 0:  # auto: XLA:CPU has no fused attention kernel to leave the masked blocks to
        block_size = DEFAULT_CPU_ATTENTION_BLOCK if jax.default_backend() == "cpu" else 0
    config.model.attention_block_size = block_size
    if not config.data.data_dir and tuple(config.data.name) != ("synthetic",):
        config.data.data_dir = os.path.join(workdir, "tensorflow_datasets")
    ensure_tokenizer(config, workdir)
    validation.validate(config)


def _without_bench(config):
    """A copy of the config as the rest of dpo_jax reads it, without the benchmark's own block."""
    copy = config.copy_and_resolve_references()
    del copy["bench"]
    return copy


def _trim(host_batch, length):
    """The batch without its trailing padding columns past `length` (every [rows, row_length] array)."""
    return {key: value[:, :length] if value.ndim == 2 and key != "pair_mask" else value
            for key, value in host_batch.items()}


def _bucket(host_batch, buckets, row_length):
    """The smallest bucket holding every real column of the batch (the full row without buckets)."""
    segment_keys = [key for key in host_batch if key.endswith("segment_ids")]
    used = max(int(np.max(np.nonzero(host_batch[key].any(axis=0))[0], initial=0)) + 1 for key in segment_keys)
    return min([b for b in buckets if used <= b <= row_length], default=row_length)


def _batches(fetch, indices, prefetch):
    """fetch(i) for i in indices; with `prefetch`, produced in a thread up to 2 ahead of the consumer."""
    if not prefetch:
        yield from (fetch(i) for i in indices)
        return
    ready = queue.Queue(maxsize=2)
    done = object()

    def produce():
        for i in indices:
            ready.put(fetch(i))
        ready.put(done)

    threading.Thread(target=produce, daemon=True).start()
    while (item := ready.get()) is not done:
        yield item


def _run_steps(compiled, state, fetch, indices, options):
    """Runs the steps of `indices`; returns (state, seconds, seconds waiting for input)."""
    waited, pending = 0.0, collections.deque()
    started = time.perf_counter()
    batches = _batches(fetch, indices, options.prefetch)
    for _ in indices:
        wait_started = time.perf_counter()
        length, batch = next(batches)
        waited += time.perf_counter() - wait_started
        state, metrics = compiled[length](state, batch)
        pending.append(metrics)
        # The lagged read lets the host queue the next step while this one runs; reading at once
        # makes it wait for every step, as `float(loss)` in a loop does.
        while len(pending) > (METRICS_LAG if options.lagged_metrics else 0):
            jax.device_get(pending.popleft())
    jax.device_get(list(pending))
    jax.block_until_ready(state)
    return state, time.perf_counter() - started, waited


def _median_seconds(fn, repeats):
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def attention_seconds(decoder_config, batch, repeats):
    """Seconds of the policy's attention forward+backward in all layers (part of its forward+backward),
    on random q, k, v of the batch's rows with the model's mask of them, through its attention path."""
    inputs = steps._model_inputs(steps._dpo_rows(batch))
    rows, row_length = inputs["segment_ids"].shape
    _, visibility = transformer.positions_and_visibility(decoder_config, (rows, row_length), inputs["positions"],
                                                         inputs["segment_ids"], inputs["branch_ids"])
    shape = (rows, row_length, decoder_config.num_heads, decoder_config.resolved_head_dim)
    dtype = jnp.dtype(decoder_config.dtype)
    q, k, v = (jax.random.normal(key, shape, dtype) for key in jax.random.split(jax.random.PRNGKey(0), 3))
    attend = functools.partial(transformer.attend, decoder_config)
    # The mask is an argument, not a closed-over constant that XLA would spend seconds folding.
    grad_fn = jax.jit(jax.grad(lambda q, k, v, visibility: attend(q, k, v, visibility).astype(jnp.float32).sum(),
                               argnums=(0, 1, 2)))
    return decoder_config.num_layers * _median_seconds(lambda: grad_fn(q, k, v, visibility), repeats)


def phase_seconds(stage, model, decoder_config, state, batch, repeats):
    """Seconds per step of each phase, jitted separately on one batch: policy forward+backward (and
    the attention's share of it), reference forward (live reference), optimizer update."""
    phases = {}
    if state.ref_params is not None:
        reference_fn = jax.jit(functools.partial(steps.reference_logps, graphdef=model.graphdef))
        phases["reference_forward"] = _median_seconds(lambda: reference_fn(state.ref_params, batch), repeats)
        batch = {**batch, **reference_fn(state.ref_params, batch)}
    # With the reference log-probs in the batch, the loss runs the policy only.
    grad_fn = jax.jit(jax.grad(lambda params: stage.loss_fn(params, None, batch, state.rng)[0]))
    phases["policy_forward_backward"] = _median_seconds(lambda: grad_fn(state.params), repeats)
    phases["policy_attention"] = attention_seconds(decoder_config, batch, repeats)
    grads = grad_fn(state.params)

    @jax.jit
    def update(grads, opt_state, params):
        updates, opt_state = stage.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    phases["optimizer"] = _median_seconds(lambda: update(grads, state.opt_state, state.params), repeats)
    return phases


@dataclasses.dataclass
class Round:
    """One side's timed steps in one round."""
    seconds: float        # wall-clock
    cpu_seconds: float    # the process's CPU time over them, all threads: less sensitive to contention
    pairs: int
    real_tokens: int
    waited: float = 0.0   # dpo_jax: seconds waiting for input
    stats: tuple = ()     # dpo_jax: `batch_stats` of the round's batches

    @property
    def pairs_per_sec(self):
        return self.pairs / self.seconds


@dataclasses.dataclass
class _Benchmark:
    """One benchmarked configuration, compiled and ready to step: batch `i` is `fetch(i)`."""
    config: Any
    stage: Any
    model: Any
    decoder_config: Any
    mesh: Any
    state: Any
    compiled: dict            # bucket length -> compiled train step
    fetch: Callable           # index -> (bucket length, device batch)
    stats: list               # batch_stats of every batch the run will use
    compile_sec: float
    precompute_sec: Optional[float]
    mean_pairs_per_step: int  # over the whole data (the batch TRL is given)
    next_index: int = 0

    def run(self, num_steps):
        """Steps through the next `num_steps` batches: their `Round`."""
        indices = range(self.next_index, self.next_index + num_steps)
        cpu_started = time.process_time()
        self.state, seconds, waited = _run_steps(self.compiled, self.state, self.fetch, indices, self.config.bench)
        cpu_seconds = time.process_time() - cpu_started
        self.next_index += num_steps
        stats = tuple(self.stats[i] for i in indices)
        return Round(seconds, cpu_seconds, sum(s["pairs"] for s in stats), sum(s["real_tokens"] for s in stats),
                     waited, stats)


def _prepare(config, num_batches):
    """Data, state and compiled steps of a resolved config, with `num_batches` batches planned."""
    options = config.bench
    decoder_config = models.decoder_config(config.model)
    live = dpo_stage.reference_mode(config.dpo) == "live"
    mesh = sharding.make_mesh(config.mesh)
    model = planning.plan_model(config, mesh)
    stage = stages.STAGES["dpo"].plan(config, mesh, model)
    arrays = task.load_task(config).pairs_train
    params = models.init_params(config.model, seed=config.seed, shardings=model.param_shardings)
    precompute_sec = None
    if dpo_stage.reference_mode(config.dpo) == "precomputed":  # the reference pass over the data, once
        started = time.perf_counter()
        arrays = reference.with_reference_logps(
            {"train": arrays}, params, graphdef=model.graphdef, mesh=mesh, param_shardings=model.param_shardings,
            batch_size=config.eval.batch_size, cache_dir=os.path.join(options.workdir, "reference_logps"))["train"]
        precompute_sec = time.perf_counter() - started
    state = planning.init_state(stage, params)
    del params
    batches = loader.train_batches(arrays, global_batch_size=config.train.global_batch_size, seed=config.seed)
    row_length = next(v for k, v in arrays.items() if k.endswith("input_ids")).shape[1]

    # Host-side pass over the run's batches: which bucket each needs, and what it holds.
    buckets, stats = [], []
    for index in range(num_batches):
        host_batch = batches[index]
        buckets.append(_bucket(host_batch, tuple(options.length_buckets), row_length))
        stats.append(batch_stats(_trim(host_batch, buckets[-1]), decoder_config, live))

    step_fn = planning.jit_train_step(stage, mesh, donate=options.donate)  # the step training jits

    def fetch(index):
        length = buckets[index]
        return length, sharding.global_batch(_trim(batches[index], length), mesh)

    compiled, started = {}, time.perf_counter()
    for length in sorted(set(buckets)):  # one compile per bucket the run uses
        compiled[length] = step_fn.lower(state, fetch(buckets.index(length))[1]).compile()
    compile_sec = time.perf_counter() - started
    return _Benchmark(config, stage, model, decoder_config, mesh, state, compiled, fetch, stats, compile_sec,
                      precompute_sec, mean_pairs_per_step(arrays, config.train.global_batch_size))


def _report(bench, rounds, probes, peak_source):
    """The result fields of the timed `rounds` (MFU against the median of the peak `probes` taken
    before them), phases measured now."""
    config, options = bench.config, bench.config.bench
    stats = [s for r in rounds for s in r.stats]
    seconds, waited = sum(r.seconds for r in rounds), sum(r.waited for r in rounds)
    peak_flops = statistics.median(probes)
    num_steps = len(stats)
    totals = {key: sum(s[key] for s in stats) for key in stats[0]}
    live = dpo_stage.reference_mode(config.dpo) == "live"
    first = next(iter(bench.compiled.values()))
    with jax.set_mesh(bench.mesh):  # as the step has it (`sharding.on_mesh`), for the fused attention kernels
        phases = phase_seconds(bench.stage, bench.model, bench.decoder_config, bench.state, bench.fetch(0)[1],
                               options.phase_repeats)
    phases["input_wait"] = waited / num_steps
    peak_memory_bytes, peak_memory_source = peak_memory()
    result = {
        "mode": "step", "backend": jax.default_backend(), "devices": bench.mesh.size, "dtype": config.model.dtype,
        "layout": config.data.layout, "reference": dpo_stage.reference_mode(config.dpo) or "none",
        "steps": num_steps, "rounds": len(rounds),
        "pairs_per_step": totals["pairs"] / num_steps,
        "pairs_per_sec": totals["pairs"] / seconds,
        "tokens_per_sec": totals["real_tokens"] / seconds,
        "padded_tokens_per_sec": totals["padded_tokens"] / seconds,
        "padding_fraction": 1 - totals["real_tokens"] / totals["padded_tokens"],
        "attention_pairs_attended": (totals["attended_pairs"] / totals["computed_attention_pairs"]
                                     if totals["computed_attention_pairs"] else None),  # None: a fused kernel
        "round_pairs_per_sec": [r.pairs_per_sec for r in rounds],
        "cpu_sec_per_pair": sum(r.cpu_seconds for r in rounds) / totals["pairs"],
        "step_sec": seconds / num_steps,
        "model_flops_per_step": totals["model_flops"] / num_steps,
        "xla_flops_per_step": (first.cost_analysis() or {}).get("flops"),
        "peak_flops": peak_flops, "peak_flops_range": [min(probes), max(probes)], "peak_flops_source": peak_source,
        "mfu": totals["model_flops"] / seconds / peak_flops,
        "compile_sec": bench.compile_sec, "compiles": len(bench.compiled),
        "precompute_reference_sec": bench.precompute_sec,
        "peak_memory_bytes": peak_memory_bytes, "peak_memory_source": peak_memory_source,
        "state_bytes": sharding.bytes_per_device(bench.state),
        "reference_bytes": sharding.bytes_per_device(bench.state.ref_params) if live else 0,
        "step_temp_bytes": first.memory_analysis().temp_size_in_bytes,
        "phase_sec": phases,
        "levers": {key: options[key] for key in ("prefetch", "donate", "lagged_metrics", "length_buckets",
                                                 "compilation_cache_dir")}
                  | {key: config.model[key] for key in ("remat", "attention_block_size", "fused_qkv",
                                                      "fused_gate_up", "fused_parallel_inputs",
                                                      "logits_chunk_size")}
                  | {"xla_flags": os.environ.get("XLA_FLAGS", "")},  # process-wide: the compiler's own levers
    }
    print(f"{result['pairs_per_sec']:.2f} pairs/s, {result['tokens_per_sec']:,.0f} real tokens/s "
          f"({result['padded_tokens_per_sec']:,.0f} padded), {result['model_flops_per_step'] / 1e9:.1f} GFLOP/step, "
          f"MFU {result['mfu']:.1%} of the median peak {peak_flops / 1e9:,.1f} GFLOP/s ({peak_source}, "
          f"{min(probes) / 1e9:,.1f}-{max(probes) / 1e9:,.1f} over {len(probes)} rounds), "
          f"compile {bench.compile_sec:.1f} s ({len(bench.compiled)}), "
          f"peak memory {peak_memory_bytes / 2**20:,.0f} MiB ({peak_memory_source})")
    print("per step: " + ", ".join(f"{name} {value * 1e3:.1f} ms" for name, value in phases.items()
                                   if name != "policy_attention")
          + f" (of which attention {phases['policy_attention'] * 1e3:.1f} ms"
          + ("" if result["attention_pairs_attended"] is None else
             f", {result['attention_pairs_attended']:.0%} of the (query, key) pairs it computes attended")
          + f"); fused step {result['step_sec'] * 1e3:.1f} ms")
    return result


def _start(config):
    """Process-wide settings of the benchmark, the config resolved: (peak probe, its source)."""
    options = config.bench
    os.makedirs(options.workdir, exist_ok=True)
    if options.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", options.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # cache the small programs too
    _resolve(config, options.workdir)
    return _peak_probe(config)


def alternate(sides, rounds, probe):
    """`rounds` rounds in which each of `sides` (name -> a function timing one round) runs in turn,
    with `probe` (the peak FLOP/s) re-run before each: ({name: [Round]}, [probe figures]). Both sides
    see the machine as it is in each round, so a per-round ratio cancels what load does to both."""
    timed, probes = {name: [] for name in sides}, []
    for index in range(rounds):
        probes.append(probe())
        for name, run in sides.items():
            timed[name].append(run())
        print(f"round {index + 1}/{rounds}: " + ", ".join(f"{name} {timed[name][-1].pairs_per_sec:.2f} pairs/s"
                                                            for name in sides), flush=True)
    return timed, probes


def round_ratios(a_rounds, b_rounds):
    """A against B from alternated rounds: the median of the per-round ratios of pairs/s with their
    range, and B's CPU-seconds per pair over A's."""
    ratios = [a.pairs_per_sec / b.pairs_per_sec for a, b in zip(a_rounds, b_rounds, strict=True)]
    cpu_per_pair = [sum(r.cpu_seconds for r in rounds) / sum(r.pairs for r in rounds)
                    for rounds in (a_rounds, b_rounds)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": ratios,
            "cpu_sec_per_pair": cpu_per_pair[1] / cpu_per_pair[0]}


def _format_ratio(ratio):
    return (f"{ratio['median']:.2f}x (median of {len(ratio['rounds'])} rounds, {ratio['min']:.2f}-{ratio['max']:.2f}; "
            f"CPU-seconds per pair {ratio['cpu_sec_per_pair']:.2f}x)")


def step_benchmark(config, compare):
    """The step benchmark of `config`; with compare="trl", TRL's DPOTrainer on the same pairs in a
    subprocess, its rounds alternated with dpo_jax's."""
    probe, peak_source = _start(config)
    options = config.bench
    bench = _prepare(config, options.warmup_steps + options.rounds * options.steps)
    bench.run(options.warmup_steps)
    sides = {"dpo_jax": functools.partial(bench.run, options.steps)}
    with contextlib.ExitStack() as stack:
        if compare == "trl":  # started after dpo_jax's warm-up, and warmed up before the first round
            worker = stack.enter_context(TRLWorker(trl_spec(config, bench.mean_pairs_per_step), options.workdir))
            sides["trl"] = functools.partial(worker.run, options.trl_steps or options.steps)
        timed, probes = alternate(sides, options.rounds, probe)
        result = _report(bench, timed["dpo_jax"], probes, peak_source)
        if compare == "trl":
            result["trl"] = worker.finish(timed["trl"])
    if compare == "trl":
        ratio = round_ratios(timed["dpo_jax"], timed["trl"])
        result.update(trl_ratio=ratio["median"], trl_ratio_range=[ratio["min"], ratio["max"]],
                      trl_round_ratios=ratio["rounds"], trl_cpu_ratio=ratio["cpu_sec_per_pair"],
                      trl_memory_ratio=result["trl"]["peak_memory_bytes"] / result["peak_memory_bytes"])
        print(f"TRL {result['trl']['pairs_per_sec']:.2f} pairs/s ({result['trl']['pairs_per_step']} pairs per step, "
              f"peak memory {result['trl']['peak_memory_bytes'] / 2**20:,.0f} MiB); dpo_jax / TRL = "
              + _format_ratio(ratio))
    return result


def ab_benchmark(config, other):
    """`config` (A) against `other` (B) in one process: after both compile and warm up, rounds of
    `bench.steps` steps alternate between them, so both see the same machine; the ratio is the
    median of the per-round ratios of pairs/s. Each side's MFU is against a probe in its own compute
    dtype, one probe per round when the two share it. (The persistent compilation cache and
    XLA_FLAGS are process-wide: compare those across processes.)"""
    peaks = {"a": _start(config)}
    _resolve(other, other.bench.workdir)
    same_dtype = jnp.dtype(other.model.dtype) == jnp.dtype(config.model.dtype)
    peaks["b"] = peaks["a"] if same_dtype else _peak_probe(other)

    def probe():
        figures = {"a": peaks["a"][0]()}
        return figures | {"b": figures["a"] if same_dtype else peaks["b"][0]()}

    options = config.bench
    benches = {"a": _prepare(config, options.warmup_steps + options.rounds * options.steps),
               "b": _prepare(other, options.warmup_steps + options.rounds * options.steps)}
    for bench in benches.values():
        bench.run(options.warmup_steps)
    timed, probes = alternate({name: functools.partial(bench.run, options.steps) for name, bench in benches.items()},
                              options.rounds, probe)
    results = {}
    for name, bench in benches.items():
        print(f"{name.upper()}:")
        results[name] = _report(bench, timed[name], [figures[name] for figures in probes], peaks[name][1])
    ratio = round_ratios(timed["a"], timed["b"])
    print("A / B = " + _format_ratio(ratio))
    return {"mode": "ab", "rounds": options.rounds, "ratio": ratio["median"],
            "ratio_range": [ratio["min"], ratio["max"]], "round_ratios": ratio["rounds"],
            "cpu_ratio": ratio["cpu_sec_per_pair"], "a": results["a"], "b": results["b"]}


# ---------------------------------------------------------------------------------------------
# --compare=trl
# ---------------------------------------------------------------------------------------------

def mean_pairs_per_step(arrays, global_batch_size):
    """Pairs a step of `global_batch_size` units of DPO `arrays` holds on average, rounded: a unit
    holds one pair, or, packed, a varying number (its `pair_mask`)."""
    pairs_per_unit = arrays["pair_mask"].sum(axis=1).mean() if "pair_mask" in arrays else 1.0
    return max(1, round(global_batch_size * float(pairs_per_unit)))


def _padded_pairs(config, total_steps, pairs_per_step):
    """The token ids {prompt, chosen, rejected} of the pairs of `total_steps` TRL batches of
    `pairs_per_step` pairs in the padded layout, in the order dpo_jax's loader serves them."""
    padded = _without_bench(config)
    padded.data.update(layout="padded", row_length=0, max_pairs_per_row=1)
    arrays = task.load_task(padded).pairs_train
    arrays = {**arrays, "example_id": np.arange(len(arrays["chosen_input_ids"]))}
    batches = loader.train_batches(arrays, global_batch_size=pairs_per_step, seed=config.seed)
    pairs = []
    for index in range(total_steps):
        for i in batches[index]["example_id"]:
            ids, masks = {}, {}
            for side in ("chosen", "rejected"):
                real = arrays[f"{side}_segment_ids"][i] > 0
                ids[side] = arrays[f"{side}_input_ids"][i][real].tolist()
                masks[side] = arrays[f"{side}_loss_mask"][i][real].astype(bool)
            prompt_length = int(np.argmax(masks["chosen"]))
            pairs.append({"prompt_ids": ids["chosen"][:prompt_length],
                          **{f"{side}_ids": np.asarray(ids[side])[masks[side]].tolist()
                             for side in ("chosen", "rejected")}})
    return pairs


def trl_spec(config, pairs_per_step):
    """What the TRL worker runs: the same pairs (in dpo_jax's order), tokenizer, architecture (as a
    Hugging Face config.json), optimizer settings and reference strategy, `pairs_per_step` pairs per
    step (dpo_jax's average, `mean_pairs_per_step`)."""
    options = config.bench
    steps_per_round = options.trl_steps or options.steps
    pairs = _padded_pairs(config, options.warmup_steps + options.rounds * steps_per_round, pairs_per_step)
    return {"pairs": pairs, "pairs_per_step": pairs_per_step, "warmup_steps": options.warmup_steps,
            "hf_config": hf.hf_config_dict(models.decoder_config(config.model)),
            "tokenizer": config.data.tokenizer, "max_length": config.data.max_length,
            "learning_rate": config.dpo.learning_rate, "beta": config.dpo.beta, "seed": config.seed,
            "grad_clip_norm": config.train.grad_clip_norm, "dtype": options.trl_dtype,
            "matmul_probe_size": options.matmul_probe_size,
            "precompute_ref_log_probs": dpo_stage.reference_mode(config.dpo) == "precomputed",
            "gradient_checkpointing": options.trl_gradient_checkpointing}


class TRLWorker:
    """TRL's DPOTrainer in a subprocess (`--trl_worker`) that times a round of steps on request and
    waits in between, so that its rounds alternate with dpo_jax's on one machine. One JSON line
    answers each request on its stdout; its stderr goes to a file, quoted when it fails."""

    def __init__(self, spec, workdir):
        self._scratch = tempfile.TemporaryDirectory(dir=workdir)
        spec_path = os.path.join(self._scratch.name, "spec.json")
        with open(spec_path, "w", encoding="utf-8") as f:
            json.dump(spec, f)
        self._log = open(os.path.join(self._scratch.name, "stderr.log"), "w+", encoding="utf-8")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "dpo_jax.bench", f"--trl_worker={spec_path}"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._log, text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        try:
            self._receive()  # built and warmed up
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._log.close()
        self._scratch.cleanup()

    def _failure(self):
        code = self._process.wait()
        self._log.seek(0)
        return RuntimeError(f"The TRL run failed ({code}):\n{self._log.read()[-4000:]}")

    def _request(self, line):
        try:
            self._process.stdin.write(line + "\n")
            self._process.stdin.flush()
        except BrokenPipeError:
            raise self._failure() from None
        return self._receive()

    def _receive(self):
        line = self._process.stdout.readline()
        if not line:
            raise self._failure()
        return json.loads(line)

    def run(self, num_steps):
        """Times the next `num_steps` TRL steps: their `Round`."""
        timed = self._request(str(num_steps))
        return Round(timed["seconds"], timed["cpu_seconds"], timed["pairs"], timed["real_tokens"])

    def finish(self, rounds):
        """Ends the run: TRL's result fields over its timed `rounds`, and what it ran with."""
        summary = self._request("stop")
        self._process.wait()
        seconds, pairs = sum(r.seconds for r in rounds), sum(r.pairs for r in rounds)
        steps = pairs // summary["pairs_per_step"]
        return {"pairs_per_sec": pairs / seconds, "tokens_per_sec": sum(r.real_tokens for r in rounds) / seconds,
                "step_sec": seconds / steps, "steps": steps, "rounds": len(rounds),
                "round_pairs_per_sec": [r.pairs_per_sec for r in rounds],
                "cpu_sec_per_pair": sum(r.cpu_seconds for r in rounds) / pairs, **summary}


def torch_matmul_peak(torch, dtype, size, repeats=5):
    """FLOP/s of the best of `repeats` square `dtype` matmuls of `size` in PyTorch (the TRL side's
    `matmul_peak`)."""
    a, b = (torch.randn(size, size, dtype=dtype) for _ in range(2))
    torch.matmul(a, b)
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best


def trl_dtype(asked, peaks):
    """TRL's compute dtype: `asked`, or for "auto" the faster by `peaks` (dtype name -> FLOP/s).
    PyTorch's CPU bf16 matmuls use AMX or AVX-512 BF16 where the CPU has them, and are far slower
    than float32 where it does not, so neither is right everywhere."""
    return max(peaks, key=peaks.get) if asked == "auto" else asked


def trl_worker(spec_path):
    """TRL's DPOTrainer on CPU PyTorch after its warm-up steps, timing rounds of steps that the
    parent asks for on stdin (a number of steps, or `stop`); run in a subprocess by `TRLWorker`."""
    import datasets
    import torch
    import transformers
    import trl

    # The protocol keeps the real stdout; whatever the libraries print goes to stderr.
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    def send(message):
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    torch.manual_seed(spec["seed"])
    tokenizer_dir = spec["tokenizer"]
    with open(os.path.join(tokenizer_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        eos_token = json.load(f)["eos_token"]
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(tokenizer_dir, "tokenizer.json"),
                                                     eos_token=eos_token, pad_token=eos_token)
    fields = {k: v for k, v in spec["hf_config"].items() if k not in ("model_type", "architectures", "torch_dtype")}
    hf_config = transformers.AutoConfig.for_model(spec["hf_config"]["model_type"], **fields,
                                                  bos_token_id=tokenizer.eos_token_id,
                                                  eos_token_id=tokenizer.eos_token_id)
    for name in TRL_DROPOUTS:  # dpo_jax trains without dropout; GPT-2's config defaults to 0.1
        if hasattr(hf_config, name):
            setattr(hf_config, name, 0.0)
    policy = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa",
                                                           torch_dtype=torch.float32)
    reference_model = None
    if not spec["precompute_ref_log_probs"]:
        reference_model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa",
                                                                        torch_dtype=torch.float32)
        reference_model.load_state_dict(policy.state_dict())

    class PreTokenizedDPOTrainer(trl.DPOTrainer):
        """DPOTrainer on dpo_jax's token ids, in dpo_jax's order: both frameworks see the same tokens."""

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # already {prompt_ids, chosen_ids, rejected_ids}, truncated as dpo_jax does

        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    pairs, pairs_per_step = spec["pairs"], spec["pairs_per_step"]
    peaks = {name: torch_matmul_peak(torch, getattr(torch, name), spec["matmul_probe_size"])
             for name in ("float32", "bfloat16")}
    dtype = trl_dtype(spec["dtype"], peaks)

    class Rounds(transformers.TrainerCallback):
        """At the end of warm-up and of each round: report, then wait for the next request."""

        def __init__(self):
            self.round_end, self.round_start, self.started = spec["warmup_steps"], None, None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step < self.round_end:
                return
            if self.round_start is None:
                send({"ready": True})
            else:
                timed = pairs[self.round_start * pairs_per_step:state.global_step * pairs_per_step]
                send({"seconds": time.perf_counter() - self.started[0],
                      "cpu_seconds": time.process_time() - self.started[1], "pairs": len(timed),
                      "real_tokens": sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"])
                                         for p in timed)})
            request = sys.stdin.readline().strip()
            if request in ("", "stop"):
                control.should_training_stop = True
                return
            self.round_start, self.round_end = state.global_step, state.global_step + int(request)
            self.started = (time.perf_counter(), time.process_time())

    total = len(pairs) // pairs_per_step
    with tempfile.TemporaryDirectory() as output_dir:
        args = trl.DPOConfig(
            output_dir=output_dir, per_device_train_batch_size=pairs_per_step, max_length=spec["max_length"],
            max_steps=total, learning_rate=spec["learning_rate"], beta=spec["beta"], lr_scheduler_type="constant",
            max_grad_norm=spec["grad_clip_norm"], use_cpu=True, bf16=dtype == "bfloat16", seed=spec["seed"],
            precompute_ref_log_probs=spec["precompute_ref_log_probs"], report_to=[], logging_steps=total + 1,
            gradient_checkpointing=spec["gradient_checkpointing"],
            save_strategy="no", dataloader_num_workers=0, disable_tqdm=True)
        trainer = PreTokenizedDPOTrainer(
            model=policy, ref_model=reference_model, args=args, processing_class=tokenizer,
            train_dataset=datasets.Dataset.from_list(pairs), callbacks=[Rounds()])
        trainer.train()
    send({"pairs_per_step": pairs_per_step, "torch_threads": torch.get_num_threads(),
          "architecture": type(policy).__name__,
          "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
          "attn_implementation": policy.config._attn_implementation,
          # What TRL ran with, read back from the trainer rather than from what was asked.
          "gradient_checkpointing": bool(trainer.model.is_gradient_checkpointing),
          "precompute_ref_log_probs": bool(trainer.args.precompute_ref_log_probs), "bf16": bool(trainer.args.bf16),
          "dtype_asked": spec["dtype"], "matmul_peak_flops": peaks,
          "dtype": str(next(trainer.model.parameters()).dtype).removeprefix("torch."),
          "peak_memory_bytes": _peak_rss()})


# ---------------------------------------------------------------------------------------------
# --suite
# ---------------------------------------------------------------------------------------------

def run_suite(config_spec, shapes, directory, overrides):
    """Runs `python -m dpo_jax.bench --compare=trl` on each of `shapes` (names in SUITE), each in its
    own process so that peak memory is its own: `<directory>/<shape>.json` and `suite.md`. The
    `config_spec` (path[:args]) gets each shape's args; `overrides` are --config.* flags for all."""
    path, _, base_arg = config_spec.partition(":")
    os.makedirs(directory, exist_ok=True)
    results = {}
    for index, name in enumerate(shapes):
        arg = ",".join(filter(None, (base_arg, SUITE[name].arg)))
        command = [sys.executable, "-m", "dpo_jax.bench", f"--config={path}" + (f":{arg}" if arg else ""),
                   "--compare=trl", *overrides]
        print(f"[{index + 1}/{len(shapes)}] {name}: {SUITE[name].what}", flush=True)
        started = time.perf_counter()
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
            lines = []
            for line in process.stdout:  # progress as it comes; the last line is the JSON
                print(f"  {line}", end="", flush=True)
                lines.append(line)
        if process.returncode != 0 or not lines:
            raise RuntimeError(f"--suite: shape {name} failed ({process.returncode}): {shlex.join(command)}")
        result = json.loads(lines[-1])
        xla_flags = os.environ.get("XLA_FLAGS")  # the shapes' processes inherit it: part of the command
        result.update(shape=name, target=SUITE[name].target, what=SUITE[name].what,
                      command=(f"XLA_FLAGS={shlex.quote(xla_flags)} " if xla_flags else "")
                      + shlex.join(["python", *command[1:]]), wall_sec=time.perf_counter() - started)
        with open(os.path.join(directory, f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        results[name] = result
    table = format_suite_table(results)
    with open(os.path.join(directory, "suite.md"), "w", encoding="utf-8") as f:
        f.write(table)
    print(table)
    return {"mode": "suite", "directory": directory,
            "shapes": {name: {key: r[key] for key in SUITE_SUMMARY} | {"trl_pairs_per_sec": r["trl"]["pairs_per_sec"]}
                       for name, r in results.items()}}


def format_suite_table(results):
    """The markdown table of `--suite` results (shape name -> step result with `trl`)."""
    lines = ["| shape | dpo_jax pairs/s | TRL pairs/s | dpo_jax / TRL (median, range) | target | "
             "CPU-s per pair, TRL / dpo_jax | MFU (probe range, GFLOP/s) | compile | peak memory, dpo_jax / TRL |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        low, high = r["trl_ratio_range"]
        short = "met" if r["trl_ratio"] >= r["target"] else f"short by {1 - r['trl_ratio'] / r['target']:.0%}"
        probe_low, probe_high = (value / 1e9 for value in r["peak_flops_range"])
        lines.append(
            f"| {name}: {r['what']} | {r['pairs_per_sec']:.2f} | {r['trl']['pairs_per_sec']:.2f} | "
            f"**{r['trl_ratio']:.2f}x** ({low:.2f}-{high:.2f}, {r['rounds']} rounds) | >= {r['target']:g}x: {short} | "
            f"{r['trl_cpu_ratio']:.2f}x | {r['mfu']:.1%} ({probe_low:.0f}-{probe_high:.0f}) | "
            f"{r['compile_sec']:.1f} s | {r['peak_memory_bytes'] / 2**20:,.0f} / "
            f"{r['trl']['peak_memory_bytes'] / 2**20:,.0f} MiB |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    if _TRL_WORKER.value:
        trl_worker(_TRL_WORKER.value)
        return
    if _MODE.value == "device_check":  # builds its own configs; exit code 1 when a check failed
        result = device_check.run(device_check.Options(
            workdir=_DEVICE_CHECK_WORKDIR.value, data=_DEVICE_CHECK_DATA.value, size=_DEVICE_CHECK_SIZE.value),
            sys.modules[__name__])
        print(json.dumps(result))
        return 0 if result["ok"] else 1
    config = _CONFIG.value
    if _SUITE.value:
        unknown = sorted(set(_SUITE_SHAPES.value) - set(SUITE))
        if unknown:
            raise app.UsageError(f"--suite_shapes: {', '.join(unknown)} not in SUITE ({', '.join(SUITE)})")
        workdir = config.bench.workdir if "bench" in config else bench_config().workdir
        overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
        result = run_suite(flags.FLAGS["config"].config_filename, _SUITE_SHAPES.value or list(SUITE),
                           _SUITE_DIR.value or os.path.join(workdir, "suite"), overrides)
    elif _PLAN.value:
        result = plan(config, _ACCELERATOR.value, _MESH.value)
    elif _MODE.value == "state_memory":
        result = state_memory(config)
    elif _MODE.value == "sampling":
        result = sampling_benchmark(config)
    elif _MODE.value == "logps":
        result = logps_memory(config, [int(size) for size in _LOGPS_VOCAB_SIZES.value])
    else:
        if "bench" not in config:  # a training config: the benchmark's default options
            config.bench = bench_config()
        if _AB_CONFIG.value is not None:
            other = _AB_CONFIG.value
            if "bench" not in other:
                other.bench = config.bench.copy_and_resolve_references()
            result = ab_benchmark(config, other)
        else:
            result = step_benchmark(config, _COMPARE.value)
    print(json.dumps(result))


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main)
