r"""The device check: the first thing to run on a machine with an accelerator, and what CI runs on CPU.

    python -m dpo_jax.bench --mode=device_check [--device_check_size=tiny] [--device_check_data=DIR]
    bash launch/device_check.sh [the same flags]

On whatever backend JAX finds (TPU, GPU; CPU with the fused kernels in Pallas interpret mode) it runs:
  1. parity: each fused attention kernel the backend runs (TPU: splash, GPU: pallas_gpu, CPU: both)
     against the dense path (`dpo_jax.models.kernels`), values and gradients, float32 and bfloat16, on
     packed and prefix-shared rows of the real layout; then a one-layer decoder's DPO loss and gradients
     with `model.attention_kernel` set to each kernel against "dense";
  2. a short SFT -> DPO run through `train.run` on Anthropic HH (the raw files of `hh_rlhf/harmless-base`,
     by default `../shared/data/hh-rlhf` next to the repository) or, without them, the synthetic task;
  3. the DPO step benchmark (`bench.step_benchmark`): pairs/s, tokens/s, MFU against the chip's vendor
     peak (a matmul probe on CPU), peak memory.
`run` returns one summary; its `ok` says that every parity error is within its tolerance, that the run
ended with a finite loss and that the benchmark ran. A part that raises is recorded (its traceback
logged) and the next part still runs, so one summary always comes out.

The configs are built here from the package's schema (`dpo_jax.configs`), so the check runs from a plain
`pip install` as well as from the repository.
"""

import dataclasses
import functools
import math
import os
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dpo_jax import models, steps, train
from dpo_jax.configs import base_config, bench_config, model_config
from dpo_jax.data import layouts
from dpo_jax.models import kernels

# How far a fused kernel may be from the dense path: max |kernel - dense| over the output (or a
# gradient), divided by max |dense| of it. float32: the kernels and XLA sum in different orders.
# bfloat16: a few bf16 roundings of the largest value (both cast the probabilities to bf16 before the
# value matmul, at different points of an online softmax). tests/test_kernels.py holds the kernels to
# the same figures.
TOLERANCES = {"float32": 1e-5, "bfloat16": 2e-2}
# The same measure for a decoder's DPO loss and its parameter gradients: the attention's differences
# pass through the projections, the MLP, the norms and the log-softmax.
DECODER_TOLERANCES = {"float32": 1e-4, "bfloat16": 5e-2}
DTYPES = ("float32", "bfloat16")

# The parity rows: (prompt, chosen, rejected) lengths of random pairs, packed by `layouts.packed_pairs`
# into 2 rows of 192 slots, so that a segment crosses the kernels' 128-slot block boundary: packed, a
# sequence spans slots 70-129 of a full first row, and the second row ends in padding; prefix-shared,
# a pair spans slots 91-166, and both rows end in padding.
PARITY_PAIR_LENGTHS = ((40, 30, 20), (30, 25, 20), (12, 10, 6), (20, 8, 14), (9, 5, 7))
PARITY_ROW_LENGTH = 192
PARITY_PAIRS_PER_ROW = 3
# Grouped-query attention: 4 query heads read 2 kv heads, of the head size most models use (128 fills
# the TPU's lanes).
PARITY_HEADS, PARITY_KV_HEADS, PARITY_HEAD_DIM = 4, 2, 128

HH_SUBSET = "harmless-base"
HH_FILE = os.path.join(HH_SUBSET, "test.jsonl.gz")  # the split on disk offline: the run trains and evaluates on it
SHARED_HH = os.path.normpath(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir,
                                          "shared", "data", "hh-rlhf"))
SYNTHETIC = "synthetic"


@dataclasses.dataclass(frozen=True)
class Size:
    """How much each part of the check does. On HH each model's vocabulary is a byte-level BPE of that
    size trained on the split, and prompts are kept to half of the max length; the synthetic task
    keeps the schema's lengths (its pairs are short)."""
    run_vocab_size: int
    run_max_length: int    # tokens per sequence (prompt + response) of the run, on HH
    run_model: dict        # `model_config("tiny", ...)` overrides of the SFT -> DPO run
    run_steps: int         # SFT steps, then as many DPO steps
    run_rows: int          # packed prefix-shared rows per step (rounded up to a multiple of the devices)
    bench_vocab_size: int
    bench_max_length: int
    bench_model: dict
    bench_row_length: int  # slots per packed prefix-shared row of the benchmark (up to 5 pairs each)
    bench_steps: int       # timed benchmark steps
    bench_warmup_steps: int
    bench_phase_repeats: int
    matmul_probe_size: int  # CPU: the matmul of the peak FLOP/s probe
    decoder_parity_dtypes: tuple  # the decoder-level parity's compute dtypes (the kernels': always both)


SIZES = {
    # Well under 10 minutes on an accelerator; a few minutes on a 2-core CPU, where the run's evaluations
    # of the whole HH split (2312 pairs, before and after each stage) take most of its time. The
    # benchmark is configs/bench_hh.py's (vocabulary 8192, 4 layers x 256 wide, rows of 832 slots) with
    # fewer steps. The run's heads are of the parity's size, 128, grouped 2 over 1.
    "standard": Size(run_vocab_size=2048, run_max_length=128,
                     run_model=dict(num_layers=2, embed_dim=128, num_heads=2, num_kv_heads=1, head_dim=128,
                                    mlp_dim=512),
                     run_steps=20, run_rows=4,
                     bench_vocab_size=8192, bench_max_length=512,
                     bench_model=dict(num_layers=4, embed_dim=256, num_heads=4, num_kv_heads=4, mlp_dim=1024),
                     bench_row_length=832, bench_steps=10, bench_warmup_steps=2, bench_phase_repeats=3,
                     matmul_probe_size=2048, decoder_parity_dtypes=DTYPES),
    # Every part exercised in seconds (the tests and CI): configs/bench_hh.py:runlocal's shapes, and the
    # decoder-level parity in float32 only (in interpret mode each kernel case is seconds of compiling).
    "tiny": Size(run_vocab_size=512, run_max_length=64,
                 run_model=dict(num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=1, mlp_dim=64),
                 run_steps=4, run_rows=4,
                 bench_vocab_size=512, bench_max_length=64,
                 bench_model=dict(num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=2, mlp_dim=64),
                 bench_row_length=128, bench_steps=2, bench_warmup_steps=1, bench_phase_repeats=1,
                 matmul_probe_size=256, decoder_parity_dtypes=("float32",)),
}


@dataclasses.dataclass(frozen=True)
class Options:
    workdir: str = ""      # where the run, the prepared data and the tokenizer go ("": a temporary directory,
                           #   removed at the end)
    data: str = ""         # the HH raw files' directory (holding harmless-base/test.jsonl.gz), or "synthetic"
                           #   ("": SHARED_HH when it holds them, else the synthetic task)
    size: str = "standard"  # a key of SIZES


# ---------------------------------------------------------------------------------------------
# Parity: the fused kernels against the dense path
# ---------------------------------------------------------------------------------------------

def fused_implementations(backend=None):
    """The fused kernels `backend` (default: JAX's) runs: its own (TPU: splash, GPU: pallas_gpu), or, on
    CPU, both in interpret mode."""
    backend = backend or jax.default_backend()
    if backend == "cpu":
        return tuple(name for name in kernels.IMPLEMENTATIONS if name != "dense")
    own = kernels.default_implementation(backend)
    return () if own == "dense" else (own,)


def parity_pairs():
    """Random token lists of PARITY_PAIR_LENGTHS (ids 1-99), the same on every call."""
    rng = np.random.default_rng(0)
    return [{part: rng.integers(1, 100, length).tolist() for part, length in zip(("prompt", "chosen", "rejected"),
                                                                                  lengths)}
            for lengths in PARITY_PAIR_LENGTHS]


def parity_rows(share_prompt):
    """The parity pairs in packed rows (`layouts.packed_pairs`): prefix-shared with `share_prompt`."""
    return layouts.packed_pairs(parity_pairs(), row_length=PARITY_ROW_LENGTH, max_pairs_per_row=PARITY_PAIRS_PER_ROW,
                                share_prompt=share_prompt)


def relative_error(actual, expected):
    """max |actual - expected| / max |expected|, in float32; inf where `actual` is not finite."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    if not np.isfinite(actual).all():
        return math.inf
    return float(np.abs(actual - expected).max() / max(float(np.abs(expected).max()), np.finfo(np.float32).tiny))


def _entry(errors, tolerance):
    """A parity check's record from its errors {what: relative error}: the worst, within `tolerance` or not."""
    worst = max(errors, key=errors.get)
    error = errors[worst]
    finite = math.isfinite(error)
    return {"error": error if finite else None, "worst": worst, "tolerance": tolerance,
            "ok": finite and error <= tolerance}


def _failed(error):
    """The record of a check that raised: its traceback logged, its message kept."""
    logging.error("%s", "".join(traceback.format_exception(error)))
    message = " ".join(str(error).split())[:500]
    return {"error": None, "ok": False, "raised": f"{type(error).__name__}: {message}"}


def kernel_parity(implementations=None, dtypes=DTYPES, *, interpret=None):
    """{"<implementation>/<function>/<dtype>": record} of `kernels.segment_attention` (packed rows) and
    `kernels.prefix_shared_attention` (packed prefix-shared rows) with each fused implementation against
    "dense": the output and the query, key and value gradients of <output, a random cotangent>.

    implementations: default `fused_implementations()`; interpret: default True on CPU. Matmuls run at
    full float32 precision (`jax.default_matmul_precision`), else on TPU and GPU XLA's float32 dense
    reference would itself be a bfloat16 or TF32 computation.
    """
    implementations = fused_implementations() if implementations is None else implementations
    interpret = jax.default_backend() == "cpu" if interpret is None else interpret
    packed, shared = parity_rows(share_prompt=False), parity_rows(share_prompt=True)
    functions = {
        "segment_attention": (kernels.segment_attention, (packed["segment_ids"],)),
        "prefix_shared_attention": (kernels.prefix_shared_attention, (shared["segment_ids"], shared["branch_ids"])),
    }
    records = {}
    with jax.default_matmul_precision("highest"):
        for dtype in dtypes:
            inputs = _attention_inputs(dtype)
            for function_name, (function, ids) in functions.items():
                ids = tuple(jnp.asarray(x) for x in ids)
                dense = _attention_and_grads(function, "dense", False, ids, inputs)
                for implementation in implementations:
                    name = f"{implementation}/{function_name}/{dtype}"
                    try:
                        fused = _attention_and_grads(function, implementation, interpret, ids, inputs)
                        errors = {what: relative_error(a, b) for what, a, b in
                                  zip(("output", "query_grad", "key_grad", "value_grad"), fused, dense)}
                        records[name] = _entry(errors, TOLERANCES[dtype])
                    except Exception as error:  # pylint: disable=broad-except  # a kernel failing here is a finding
                        records[name] = _failed(error)
    return records


def _attention_inputs(dtype):
    """(query, key, value, output cotangent) for the parity rows, standard normal in `dtype`."""
    rng = np.random.default_rng(1)
    batch = 2
    query_shape = (batch, PARITY_ROW_LENGTH, PARITY_HEADS, PARITY_HEAD_DIM)
    kv_shape = (batch, PARITY_ROW_LENGTH, PARITY_KV_HEADS, PARITY_HEAD_DIM)
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
                 for shape in (query_shape, kv_shape, kv_shape, query_shape))


def _attention_and_grads(function, implementation, interpret, ids, inputs):
    """(output, query, key, value gradients) of `function` by `implementation`, in one jit. The jit is
    made per call, so that a kernel replaced since (a test's) is traced afresh."""
    @jax.jit
    def forward_and_grads(ids, query, key, value, out_grad):
        attend = lambda q, k, v: function(q, k, v, *ids, implementation=implementation, interpret=interpret)
        out, vjp = jax.vjp(attend, query, key, value)
        return (out, *vjp(out_grad))

    return jax.device_get(forward_and_grads(ids, *inputs))


def decoder_parity(implementations=None, dtypes=DTYPES):
    """{"<implementation>/decoder_<layout>/<dtype>": record}: a one-layer decoder's DPO loss and
    parameter gradients on the parity pairs in the packed and the packed prefix-shared layout, with
    `model.attention_kernel` each fused implementation against "dense" (the loss: |difference| / |loss|;
    the gradients: max |difference| over all parameters / the largest dense gradient). On CPU the
    decoder runs the kernels in interpret mode itself; matmuls at full float32 precision, as
    `kernel_parity`."""
    implementations = fused_implementations() if implementations is None else implementations
    dpo_config = base_config().dpo
    records = {}
    with jax.default_matmul_precision("highest"):
        for dtype in dtypes:
            model = _parity_model_config(dtype, "dense")
            params = models.init_params(model, seed=0, shardings=None)
            ref_params = models.init_params(model, seed=1, shardings=None)  # so the loss is not log 2 at every pair
            for layout in ("packed", "packed_prefix_shared"):
                batch = {key: jnp.asarray(value) for key, value in layouts.pair_arrays(
                    parity_pairs(), layout, max_length=PARITY_ROW_LENGTH, row_length=PARITY_ROW_LENGTH,
                    max_pairs_per_row=PARITY_PAIRS_PER_ROW).items()}
                dense_loss, dense_grads = _dpo_loss_and_grads(model, dpo_config, params, ref_params, batch)
                for implementation in implementations:
                    name = f"{implementation}/decoder_{layout}/{dtype}"
                    try:
                        loss, grads = _dpo_loss_and_grads(_parity_model_config(dtype, implementation), dpo_config,
                                                          params, ref_params, batch)
                        errors = {"loss": relative_error(loss, dense_loss),
                                  "gradients": relative_error(_flat(grads), _flat(dense_grads))}
                        records[name] = _entry(errors, DECODER_TOLERANCES[dtype])
                    except Exception as error:  # pylint: disable=broad-except
                        records[name] = _failed(error)
    return records


def _flat(tree):
    """Every leaf of `tree` in one float32 vector: errors over all parameters, against the largest gradient."""
    return np.concatenate([np.ravel(np.asarray(leaf, np.float32)) for leaf in jax.tree.leaves(tree)])


def _parity_model_config(dtype, attention_kernel):
    return model_config("tiny", vocab_size=128, num_layers=1, embed_dim=128, num_heads=PARITY_HEADS,
                        num_kv_heads=PARITY_KV_HEADS, head_dim=PARITY_HEAD_DIM, mlp_dim=256,
                        max_position_embeddings=PARITY_ROW_LENGTH, dtype=dtype, attention_kernel=attention_kernel,
                        attention_block_size=0)


def _dpo_loss_and_grads(model, dpo_config, params, ref_params, batch):
    graphdef, _, _ = models.abstract_model(model)
    loss_fn = functools.partial(steps.dpo_loss, graphdef=graphdef, dpo_config=dpo_config)
    value_and_grad = jax.jit(jax.value_and_grad(lambda p, r, b: loss_fn(p, r, b, None)[0]))
    return jax.device_get(value_and_grad(params, ref_params, batch))


def parity(size):
    """The kernels' and the decoder's parity records, with whether all are within tolerance. The rows
    are the same at every size (they must cross a block boundary); `size` picks the decoder's dtypes."""
    started = time.perf_counter()
    checks = {**kernel_parity(), **decoder_parity(dtypes=size.decoder_parity_dtypes)}
    return {"ok": all(record["ok"] for record in checks.values()), "implementations": list(fused_implementations()),
            "interpret": jax.default_backend() == "cpu", "checks": checks, "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------------------------------------
# The run and the benchmark
# ---------------------------------------------------------------------------------------------

def hh_manual_dir(data):
    """The HH raw files' directory the check uses for `Options.data`, or None for the synthetic task."""
    if data == SYNTHETIC:
        return None
    if data:
        if not os.path.isfile(os.path.join(data, HH_FILE)):
            raise ValueError(f"--device_check_data={data}: no {HH_FILE} there (the hh_rlhf raw files), "
                             f"nor '{SYNTHETIC}'")
        return os.path.abspath(data)
    return SHARED_HH if os.path.isfile(os.path.join(SHARED_HH, HH_FILE)) else None


def _multiple_of_devices(count):
    devices = jax.device_count()
    return -(-count // devices) * devices


def _data_config(config, hh_dir, workdir, max_length):
    """The run's and the benchmark's data: HH's harmless-base split on disk, or the synthetic task."""
    data = config.data
    data.layout = "packed_prefix_shared"
    if hh_dir is None:
        data.name = (SYNTHETIC,)
        return
    data.name = (f"hh_rlhf/{HH_SUBSET}",)
    data.manual_dir = hh_dir
    data.data_dir = os.path.join(workdir, "tensorflow_datasets")  # prepared once, for both
    data.train_split = data.eval_split = "test"
    data.max_length, data.max_prompt_length = max_length, max_length // 2


def run_config(size, hh_dir, workdir):
    """SFT then DPO of a small decoder, evaluated before and after each stage (data.tokenizer: unset)."""
    config = base_config()
    config.stages = ("sft", "dpo")
    config.model = model_config("tiny", vocab_size=size.run_vocab_size, max_position_embeddings=size.run_max_length,
                                **size.run_model)
    _data_config(config, hh_dir, workdir, size.run_max_length)
    config.train.global_batch_size = _multiple_of_devices(size.run_rows)
    config.train.log_every_steps = max(1, size.run_steps // 4)
    for stage in ("sft", "dpo"):
        config[stage].num_steps = size.run_steps
        config[stage].warmup_steps = max(1, size.run_steps // 5)
    config.eval.every_steps = config.checkpoint.every_steps = size.run_steps
    config.eval.batch_size = _multiple_of_devices(16)
    return config


def benchmark_config(size, hh_dir, workdir):
    """configs/bench_hh.py's benchmark at `size`: a live reference, packed prefix-shared rows of up to 5
    pairs. On HH the benchmark trains its tokenizer itself, in its workdir."""
    config = base_config()
    config.stages = ("dpo",)
    config.model = model_config("tiny", vocab_size=size.bench_vocab_size,
                                max_position_embeddings=size.bench_max_length, **size.bench_model)
    _data_config(config, hh_dir, workdir, size.bench_max_length)
    config.data.row_length, config.data.max_pairs_per_row = size.bench_row_length, 5
    config.train.global_batch_size = _multiple_of_devices(2)
    config.dpo.update(reference="live", num_steps=1000, learning_rate=5e-6, warmup_steps=0)
    config.eval.batch_size = _multiple_of_devices(8)
    config.bench = bench_config()
    config.bench.update(workdir=os.path.join(workdir, "bench"), rounds=1, steps=size.bench_steps,
                        warmup_steps=size.bench_warmup_steps, phase_repeats=size.bench_phase_repeats,
                        matmul_probe_size=size.matmul_probe_size)
    return config


def training_run(config, workdir):
    """`train.run` of `config` in `workdir`: each stage's final eval metrics and seconds."""
    started = time.perf_counter()
    summary = train.run(config, workdir)
    seconds = time.perf_counter() - started
    kept = {"sft": ("loss", "nll"),
            "dpo": ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "kl")}
    result = {"data": config.data.name[0], "dtype": models.compute_dtype(config.model.dtype),
              "attention_kernel": kernels.resolve(config.model.attention_kernel), "seconds": seconds}
    for stage, names in kept.items():
        record = summary[stage]
        result[stage] = {"steps": record["steps"], "wall_seconds": record["wall_seconds"],
                         "tokens_per_sec": record["tokens_per_sec"],
                         **{name: record["eval"][name] for name in names if name in record["eval"]}}
    result["dpo"]["accuracy_before"] = summary["dpo"]["eval_before"].get("rewards/accuracies")
    result["ok"] = all(math.isfinite(result[stage]["loss"]) for stage in kept)
    return result


def benchmark(config, bench):
    """`bench.step_benchmark` of `config`: its throughput, MFU and memory figures."""
    started = time.perf_counter()
    result = bench.step_benchmark(config, "none")
    kept = ("pairs_per_sec", "tokens_per_sec", "padded_tokens_per_sec", "step_sec", "mfu", "peak_flops",
            "peak_flops_source", "model_flops_per_step", "compile_sec", "peak_memory_bytes", "peak_memory_source",
            "dtype", "devices", "steps", "pairs_per_step")
    figures = {key: result[key] for key in kept}
    figures["attention_kernel"] = kernels.resolve(config.model.attention_kernel)
    figures["seconds"] = time.perf_counter() - started  # data, tokenizer and compiles included
    figures["ok"] = bool(figures["pairs_per_sec"] > 0 and math.isfinite(figures["pairs_per_sec"]))
    return figures


# ---------------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------------

def run(options, bench):
    """The device check (the module docstring); returns its summary (plain JSON types, no NaN).

    bench: the `dpo_jax.bench` module, its caller (`bench --mode=device_check`), whose step benchmark,
    tokenizer training and peak memory the check uses; passed in, because `bench` imports this module.
    """
    if options.size not in SIZES:
        raise ValueError(f"--device_check_size={options.size!r}: one of {sorted(SIZES)}")
    hh_dir = hh_manual_dir(options.data)
    if options.workdir:
        if os.path.exists(os.path.join(options.workdir, "run")):
            raise ValueError(f"--device_check_workdir={options.workdir} holds a previous check's run/: give a new "
                             "directory")
        os.makedirs(options.workdir, exist_ok=True)
        return _check(SIZES[options.size], options, hh_dir, os.path.abspath(options.workdir), bench)
    with tempfile.TemporaryDirectory(prefix="dpo_jax_device_check_") as workdir:
        return _check(SIZES[options.size], options, hh_dir, workdir, bench)


def _check(size, options, hh_dir, workdir, bench):
    started = time.perf_counter()
    device = jax.devices()[0]
    summary = {"mode": "device_check", "ok": False, "backend": jax.default_backend(),
               "device_kind": device.device_kind, "device_count": jax.device_count(),
               "process_count": jax.process_count(), "jax_version": jax.__version__, "size": options.size,
               "data": f"hh_rlhf/{HH_SUBSET} ({hh_dir})" if hh_dir else SYNTHETIC,
               "workdir": workdir if options.workdir else None}  # None: a temporary one, removed
    print(f"device check: {summary['device_count']} x {summary['device_kind']} ({summary['backend']}), "
          f"size {options.size}, data {summary['data']}")
    summary["parity"] = _part("parity", lambda: parity(size))

    def run_part():
        config = run_config(size, hh_dir, workdir)
        # A byte-level BPE trained on the split, as the benchmark trains its own.
        bench.ensure_tokenizer(config, workdir)
        return training_run(config, os.path.join(workdir, "run"))

    summary["run"] = _part("run", run_part)
    summary["bench"] = _part("bench", lambda: benchmark(benchmark_config(size, hh_dir, workdir), bench))
    peak_memory, peak_memory_source = bench.peak_memory()
    summary.update(peak_memory_bytes=peak_memory, peak_memory_source=peak_memory_source)
    summary["failures"] = failures(summary)
    summary["ok"] = not summary["failures"]
    summary["seconds"] = time.perf_counter() - started
    return _json_safe(summary)


def _part(name, fn):
    """fn()'s record, or, if it raises, the failure's."""
    print(f"device check: {name}")
    try:
        return fn()
    except Exception as error:  # pylint: disable=broad-except  # recorded; the other parts still run
        return _failed(error)


def failures(summary):
    """What failed, one line each: a parity check out of tolerance or raising, a part that raised, a
    non-finite loss, a benchmark without pairs/s."""
    lines = []
    for part, not_ok in (("parity", None), ("run", "a final eval loss is not finite"),
                         ("bench", "no finite, positive pairs/s")):
        record = summary[part]
        if "raised" in record:
            lines.append(f"{part}: {record['raised']}")
        elif not record["ok"] and not_ok:
            lines.append(f"{part}: {not_ok}")
    for name, check in summary["parity"].get("checks", {}).items():
        if "raised" in check:
            lines.append(f"parity {name}: {check['raised']}")
        elif not check["ok"]:
            error = "not finite" if check["error"] is None else f"{check['error']:.3g}"
            lines.append(f"parity {name}: {check['worst']} error {error} > tolerance {check['tolerance']:g}")
    return lines


def _json_safe(value):
    """`value` with NaN and infinities as None, numpy scalars as Python's: strict JSON."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
