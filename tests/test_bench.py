"""The benchmark: end to end in a tiny setting, its FLOP accounting, and `--plan`'s memory estimate.

No timing is asserted: speed is what the benchmark prints, not what a test checks.
"""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SHARED_DATA, config_path, host_devices, run_config, run_python
from flax import nnx

from dpo_jax import bench, configs, models, steps
from dpo_jax.data import layouts, loader
from dpo_jax.data.task import load_task
from dpo_jax.models import transformer

HH_DIR = os.path.join(SHARED_DATA, "hh-rlhf")
STEP_FIELDS = ("pairs_per_sec", "tokens_per_sec", "padded_tokens_per_sec", "model_flops_per_step", "mfu",
               "peak_flops", "compile_sec", "peak_memory_bytes", "state_bytes", "reference_bytes", "phase_sec")
# An XLA flag at its default value: the benchmarks that run under it must record it, not change.
HARMLESS_XLA_FLAGS = "--xla_cpu_enable_fast_math=false"
PHASES = ("policy_forward_backward", "policy_attention", "reference_forward", "optimizer", "input_wait")


def _last_json(result):
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.isdir(HH_DIR), reason=f"needs the HH manual dir {HH_DIR}")
def test_benchmark_runs_on_hh_and_ends_with_its_json(tmp_path):
    """The real pipeline (hh_rlhf builder, a BPE trained on it, packed prefix-shared rows), and TRL
    on the same pairs when it is installed."""
    with_trl = all(importlib.util.find_spec(name) for name in ("trl", "torch", "transformers"))
    result = _last_json(run_python(
        ["-m", "dpo_jax.bench", "--config=configs/bench_hh.py:runlocal", f"--config.bench.workdir={tmp_path}",
         f"--compare={'trl' if with_trl else 'none'}"]))
    for field in STEP_FIELDS:
        assert field in result, field
    assert set(result["phase_sec"]) == set(PHASES)
    assert result["layout"] == "packed_prefix_shared" and result["compiles"] == 1
    assert 0 < result["mfu"] and 0 < result["pairs_per_sec"] <= result["tokens_per_sec"]
    assert result["tokens_per_sec"] <= result["padded_tokens_per_sec"]
    assert result["reference_bytes"] > 0  # a live reference
    assert 0 < result["attention_pairs_attended"] < 1  # blockwise on CPU: some computed pairs are masked
    assert result["levers"]["attention_block_size"] == bench.DEFAULT_CPU_ATTENTION_BLOCK
    assert os.path.exists(os.path.join(tmp_path, "bpe512-hh_rlhf-harmless-base-test", "tokenizer.json"))
    # Rounds: the probe re-run before each, MFU against its median.
    assert result["rounds"] == len(result["round_pairs_per_sec"]) == 2 and result["steps"] == 4
    low, high = result["peak_flops_range"]
    assert low <= result["peak_flops"] <= high and result["cpu_sec_per_pair"] > 0
    if with_trl:
        assert result["trl"]["pairs_per_sec"] > 0 and result["trl_ratio"] > 0
        # The ratio is the median of the per-round ratios, each dpo_jax's round over TRL's.
        assert result["trl_round_ratios"] == pytest.approx(
            [a / b for a, b in zip(result["round_pairs_per_sec"], result["trl"]["round_pairs_per_sec"])])
        assert result["trl_ratio"] == pytest.approx(np.median(result["trl_round_ratios"]))
        assert result["trl_ratio_range"] == [min(result["trl_round_ratios"]), max(result["trl_round_ratios"])]
        assert result["trl_cpu_ratio"] == pytest.approx(result["trl"]["cpu_sec_per_pair"] / result["cpu_sec_per_pair"])
        assert result["trl"]["steps"] == 4 and result["trl"]["architecture"] == "GPT2LMHeadModel"
        # TRL at its fastest correct configuration: no recomputed forward, the same reference strategy.
        assert result["trl"]["gradient_checkpointing"] is False
        assert result["trl"]["precompute_ref_log_probs"] is False and result["trl"]["attn_implementation"] == "sdpa"
        # TRL's precision is its faster one on this host by its own matmul probe (bench.trl_dtype="auto").
        peaks = result["trl"]["matmul_peak_flops"]
        assert result["trl"]["dtype_asked"] == "auto" and set(peaks) == {"float32", "bfloat16"}
        assert result["trl"]["bf16"] is (peaks["bfloat16"] > peaks["float32"])
        config = run_config("bench_hh", "runlocal")
        bench._resolve(config, str(tmp_path))
        arrays = load_task(bench._without_bench(config)).pairs_train
        assert result["trl"]["pairs_per_step"] == bench.mean_pairs_per_step(arrays, config.train.global_batch_size)


def _round(pairs_per_sec, cpu_sec_per_pair, pairs=8):
    return bench.Round(seconds=pairs / pairs_per_sec, cpu_seconds=pairs * cpu_sec_per_pair, pairs=pairs,
                       real_tokens=10 * pairs)


def test_alternated_rounds_interleave_the_sides_after_a_probe_each():
    calls = []
    probes = iter([3.0, 1.0, 2.0])

    def side(name, rate):
        return lambda: calls.append(name) or _round(rate, 0.1)

    def probe():
        calls.append("probe")
        return next(probes)

    timed, figures = bench.alternate({"a": side("a", 4.0), "b": side("b", 2.0)}, 3, probe)
    assert calls == ["probe", "a", "b"] * 3 and figures == [3.0, 1.0, 2.0]
    assert [r.pairs_per_sec for r in timed["b"]] == pytest.approx([2.0] * 3)


def test_round_ratios_take_the_median_of_per_round_ratios():
    """A slow round slows both sides: its ratio, not the ratio of totals, is what a round says."""
    a = [_round(10.0, 0.1), _round(2.0, 0.2), _round(12.0, 0.1)]
    b = [_round(2.0, 0.5), _round(1.0, 0.5), _round(3.0, 0.5)]
    ratio = bench.round_ratios(a, b)
    assert ratio["rounds"] == pytest.approx([5.0, 2.0, 4.0])
    assert (ratio["median"], ratio["min"], ratio["max"]) == pytest.approx((4.0, 2.0, 5.0))
    # B's CPU-seconds per pair (0.5) over A's: (0.8 + 1.6 + 0.8) / 24 pairs.
    assert ratio["cpu_sec_per_pair"] == pytest.approx(0.5 / (3.2 / 24))
    with pytest.raises(ValueError):
        bench.round_ratios(a, b[:2])  # unpaired rounds


def test_the_suite_table_says_by_how_much_a_target_is_missed():
    result = {"what": "w", "pairs_per_sec": 8.0, "trl": {"pairs_per_sec": 2.0, "peak_memory_bytes": 2 * 2**20},
              "trl_ratio": 4.0, "trl_ratio_range": [3.5, 4.5], "rounds": 5, "target": 8.0, "trl_cpu_ratio": 3.0,
              "mfu": 0.5, "peak_flops_range": [1e11, 2e11], "compile_sec": 6.0, "peak_memory_bytes": 2**20}
    table = bench.format_suite_table({"x": result, "y": {**result, "target": 2.0}})
    rows = table.splitlines()[2:]
    assert len(rows) == 2
    assert "**4.00x** (3.50-4.50, 5 rounds)" in rows[0] and ">= 8x: short by 50%" in rows[0]
    assert ">= 2x: met" in rows[1] and "50.0% (100-200)" in rows[1] and "1 / 2 MiB" in rows[1]


def test_bench_configs_refuse_an_unknown_model_zero_rounds_and_a_trl_dtype_it_cannot_run():
    with pytest.raises(ValueError, match="model='gpt3' is not one of gpt2_4x256"):
        run_config("bench_hh", "model=gpt3")
    config = run_config("bench_hh", "runlocal,synthetic")
    config.bench.rounds = 0
    with pytest.raises(ValueError, match=r"config.bench.rounds: must be >= 1, got 0"):
        bench._resolve(config, "/nonexistent")  # pylint: disable=protected-access
    config = run_config("bench_hh", "runlocal,synthetic")
    config.bench.trl_dtype = "float16"
    with pytest.raises(ValueError, match=r"config.bench.trl_dtype: must be one of \('auto', 'float32', 'bfloat16'\)"):
        bench._resolve(config, "/nonexistent")  # pylint: disable=protected-access


def test_trl_dtype_auto_takes_the_faster_probe_and_otherwise_what_was_asked():
    assert bench.trl_dtype("auto", {"float32": 2e11, "bfloat16": 9e11}) == "bfloat16"
    assert bench.trl_dtype("auto", {"float32": 2e11, "bfloat16": 5e10}) == "float32"
    assert bench.trl_dtype("float32", {"float32": 2e11, "bfloat16": 9e11}) == "float32"


def test_the_llama_shape_is_a_llama_decoder_that_hugging_face_can_express():
    """Shape (c): GQA, SwiGLU, RoPE, untied embeddings, as LlamaForCausalLM's config.json says it."""
    from dpo_jax.models import hf  # pylint: disable=import-outside-toplevel
    config = run_config("bench_hh", "model=llama_6x512")
    decoder = models.decoder_config(config.model)
    assert (decoder.num_layers, decoder.embed_dim, decoder.num_heads, decoder.num_kv_heads) == (6, 512, 8, 2)
    exported = hf.hf_config_dict(decoder)
    assert exported["architectures"] == ["LlamaForCausalLM"] and exported["num_key_value_heads"] == 2
    assert exported["tie_word_embeddings"] is False and exported["hidden_act"] == "silu"


@pytest.mark.skipif(not all(importlib.util.find_spec(name) for name in ("trl", "torch", "transformers")),
                    reason="needs the bench extra (trl, torch, transformers): pip install -e '.[bench]'")
def test_a_failing_trl_worker_is_an_error_quoting_its_output(tmp_path):
    spec = {"pairs": [], "pairs_per_step": 1, "warmup_steps": 1, "hf_config": {}, "seed": 0,
            "tokenizer": str(tmp_path / "no-tokenizer")}
    with pytest.raises(RuntimeError, match=r"(?s)The TRL run failed \(1\).*no-tokenizer"):
        bench.TRLWorker(spec, str(tmp_path))
    assert os.listdir(tmp_path) == []  # its scratch directory removed


@pytest.mark.skipif(not os.path.isdir(HH_DIR), reason=f"needs the HH manual dir {HH_DIR}")
@pytest.mark.skipif(not all(importlib.util.find_spec(name) for name in ("trl", "torch", "transformers")),
                    reason="needs the bench extra (trl, torch, transformers): pip install -e '.[bench]'")
def test_the_suite_writes_a_json_per_shape_and_the_table(tmp_path):
    """Two shapes of the suite in the runlocal setting: the Llama one against LlamaForCausalLM, and
    the precomputed reference on both sides."""
    shapes = ["c_llama_6x512", "f_precomputed"]
    summary = _last_json(run_python(
        ["-m", "dpo_jax.bench", "--config=configs/bench_hh.py:runlocal", "--suite", f"--suite_dir={tmp_path}/suite",
         f"--suite_shapes={','.join(shapes)}", f"--config.bench.workdir={tmp_path}"],
        env={"XLA_FLAGS": HARMLESS_XLA_FLAGS}, timeout=900))
    assert list(summary["shapes"]) == shapes
    results = {}
    for name in shapes:
        with open(tmp_path / "suite" / f"{name}.json", encoding="utf-8") as f:
            results[name] = json.load(f)
        assert results[name]["trl_ratio"] == summary["shapes"][name]["trl_ratio"]
        assert f"--config=configs/bench_hh.py:runlocal,{bench.SUITE[name].arg}" in results[name]["command"]
        # The shapes' processes inherit XLA_FLAGS, so the recorded command sets them as the run had them.
        assert results[name]["command"].startswith(f"XLA_FLAGS={HARMLESS_XLA_FLAGS} python -m dpo_jax.bench ")
        assert results[name]["levers"]["xla_flags"] == HARMLESS_XLA_FLAGS
    llama = results["c_llama_6x512"]
    assert llama["trl"]["architecture"] == "LlamaForCausalLM" and llama["trl"]["gradient_checkpointing"] is False
    precomputed = results["f_precomputed"]
    assert precomputed["reference"] == "precomputed" and precomputed["reference_bytes"] == 0
    assert precomputed["trl"]["precompute_ref_log_probs"] is True
    table = (tmp_path / "suite" / "suite.md").read_text(encoding="utf-8").splitlines()
    assert len(table) == 2 + len(shapes) and table[2].startswith("| c_llama_6x512: ")


def test_ab_rounds_give_the_median_of_per_round_ratios(tmp_path):
    result = _last_json(run_python(
        ["-m", "dpo_jax.bench", "--config=configs/bench_hh.py:runlocal,synthetic", f"--config.bench.workdir={tmp_path}",
         "--ab_config=configs/bench_hh.py:runlocal,synthetic", "--ab_config.bench.prefetch=False",
         f"--ab_config.bench.workdir={tmp_path}"]))
    rates = [result[side]["round_pairs_per_sec"] for side in ("a", "b")]
    assert len(result["round_ratios"]) == result["rounds"] == 2
    assert result["round_ratios"] == pytest.approx([a / b for a, b in zip(*rates)])
    assert result["ratio"] == pytest.approx(np.median(result["round_ratios"])) and result["cpu_ratio"] > 0
    assert result["a"]["peak_flops"] == result["b"]["peak_flops"]  # one probe per round for both
    assert result["a"]["levers"]["prefetch"] and not result["b"]["levers"]["prefetch"]


def test_ab_sides_in_two_dtypes_each_get_a_probe_in_their_own(tmp_path):
    """float32 against bf16: each side's MFU is against a matmul probe in its compute dtype."""
    result = _last_json(run_python(
        ["-m", "dpo_jax.bench", "--config=configs/bench_hh.py:runlocal,synthetic", f"--config.bench.workdir={tmp_path}",
         "--ab_config=configs/bench_hh.py:runlocal,synthetic", "--ab_config.bench.compute_dtype=bfloat16",
         f"--ab_config.bench.workdir={tmp_path}"]))
    assert (result["a"]["dtype"], result["b"]["dtype"]) == ("float32", "bfloat16")
    assert result["a"]["peak_flops_source"] == "float32 matmul probe"
    assert result["b"]["peak_flops_source"] == "bfloat16 matmul probe"
    # Two probes timed apart: their medians differ (one probe shared would make them equal, as above).
    assert result["a"]["peak_flops"] != result["b"]["peak_flops"]
    for side in ("a", "b"):
        low, high = result[side]["peak_flops_range"]
        assert 0 < low <= result[side]["peak_flops"] <= high


@pytest.mark.parametrize("layout", ["padded", "packed_prefix_shared"])
def test_trl_steps_hold_as_many_pairs_as_a_dpo_jax_step_on_average(tmp_path, layout):
    """TRL's batch is dpo_jax's: the units per step when a unit is a pair, else the pairs that
    packed rows hold per step on average (fewer than they could hold at most)."""
    config = run_config("bench_hh", f"runlocal,synthetic,layout={layout}")
    bench._resolve(config, str(tmp_path))
    arrays = load_task(bench._without_bench(config)).pairs_train
    units = config.train.global_batch_size
    trl_pairs_per_step = bench.mean_pairs_per_step(arrays, units)
    if layout == "padded":
        assert trl_pairs_per_step == units
    else:  # every pair served in one epoch of dpo_jax's batches, counted
        batches = loader.train_batches(arrays, global_batch_size=units, seed=config.seed)
        served = [int(batches[i]["pair_mask"].sum()) for i in range(len(arrays["pair_mask"]) // units)]
        assert trl_pairs_per_step == round(np.mean(served))
        assert units < trl_pairs_per_step < units * config.data.max_pairs_per_row
    assert len(bench._padded_pairs(config, 3, trl_pairs_per_step)) == 3 * trl_pairs_per_step


def test_benchmark_levers_off_on_the_synthetic_task(tmp_path):
    """Every lever off, a precomputed reference, padding trimmed to buckets, and the compilation cache."""
    cache = tmp_path / "xla_cache"
    result = _last_json(run_python(
        ["-m", "dpo_jax.bench", "--config=configs/bench_hh.py:runlocal,synthetic,layout=padded",
         f"--config.bench.workdir={tmp_path}", "--config.dpo.reference=precomputed",
         "--config.bench.prefetch=False", "--config.bench.donate=False", "--config.bench.lagged_metrics=False",
         "--config.bench.length_buckets=(16,32)", f"--config.bench.compilation_cache_dir={cache}"],
        env={"XLA_FLAGS": HARMLESS_XLA_FLAGS}))
    for field in STEP_FIELDS:
        assert field in result, field
    assert result["reference_bytes"] == 0 and "reference_forward" not in result["phase_sec"]
    assert result["precompute_reference_sec"] > 0
    assert result["levers"]["length_buckets"] == [16, 32] and result["compiles"] >= 1
    assert result["levers"]["xla_flags"] == HARMLESS_XLA_FLAGS  # the compiler's process-wide levers
    assert os.listdir(cache)


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
def test_attention_flops_count_the_pairs_the_model_attends(layout):
    """The FLOP accounting's (query, key) pairs equal the true entries of the model's own mask."""
    rng = np.random.default_rng(0)
    pairs = [{"prompt": rng.integers(1, 50, n).tolist(), "chosen": rng.integers(1, 50, c).tolist(),
              "rejected": rng.integers(1, 50, r).tolist()} for n, c, r in ((5, 3, 4), (2, 6, 1), (7, 2, 2))]
    arrays = layouts.pair_arrays(pairs, layout, max_length=16, row_length=32, max_pairs_per_row=3)
    rows = steps._dpo_rows(arrays)  # pylint: disable=protected-access
    segment_ids = np.asarray(rows["segment_ids"])
    index = np.arange(segment_ids.shape[1])
    mask = transformer.attention_mask(segment_ids, segment_ids, index, index)[:, 0]
    if "branch_ids" in arrays:
        mask = mask & transformer.branch_mask(rows["branch_ids"])
    expected = int(np.sum(np.asarray(mask) & (segment_ids > 0)[:, :, None]))
    counted = sum(bench._attended_pairs(arrays[key], arrays.get("branch_ids"))  # pylint: disable=protected-access
                  for key in arrays if key.endswith("segment_ids"))
    assert counted == expected


def test_computed_attention_pairs_count_the_visible_blocks_by_hand():
    """Blocks of 4 over rows of 8 slots: a 6-token sequence (21 pairs attended) needs blocks (0, 0),
    (1, 0), (1, 1); two of 4 tokens (20 pairs) only the diagonal; padding attends nothing."""
    count = lambda segments, branches=None, block=4: bench.computed_attention_pairs(
        models.decoder_config(configs.model_config("tiny", attention_block_size=block)), np.array(segments),
        None if branches is None else np.array(branches))
    assert count([[1, 1, 1, 1, 1, 1, 0, 0]]) == 3 * 16
    assert count([[1, 1, 1, 1, 2, 2, 2, 2]]) == 2 * 16
    assert count([[1, 1, 1, 2, 2, 2, 0, 0]]) == 3 * 16  # the second sequence straddles a block boundary
    # prefix-shared, blocks of 2: the rejected branch (blocks 2, 3) sees the prompt (block 0), not the chosen (1)
    assert count([[1] * 8], [[0, 0, 1, 1, 2, 2, 2, 2]], block=2) == (1 + 2 + 2 + 3) * 4
    assert count([[1, 1, 1, 1, 1, 1, 0, 0]], block=0) == 64  # dense: the whole row


def _layout_rows_and_mask(layout, seed):
    """Model rows of random pairs in `layout` (row length 70: not a multiple of the block sizes) and
    the model's mask of them [rows, 1, T, T], as the DPO step builds it."""
    rng = np.random.default_rng(seed)
    pairs = [{side: rng.integers(1, 50, int(rng.integers(1, 12))).tolist() for side in ("prompt", "chosen", "rejected")}
             for _ in range(6)]
    arrays = layouts.pair_arrays(pairs, layout, max_length=35, row_length=70, max_pairs_per_row=3)
    rows = steps._dpo_rows(arrays)  # pylint: disable=protected-access
    index = np.arange(rows["segment_ids"].shape[1])
    mask = transformer.attention_mask(rows["segment_ids"], rows["segment_ids"], index, index)
    if "branch_ids" in rows:
        mask = mask & transformer.branch_mask(rows["branch_ids"])[:, None]
    return rows, mask


@pytest.mark.parametrize("layout,num_kv_heads,block_size", [(layout, 4, 16) for layout in layouts.LAYOUTS]
                         + [("packed_prefix_shared", 2, 32)])  # grouped queries, a block of half the row
def test_blockwise_attention_equals_the_dense_masked_attention(layout, num_kv_heads, block_size):
    """Outputs and gradients of `blockwise_attention` against jax.nn.dot_product_attention with the
    full mask, on every layout's rows (padding included), with and without grouped queries."""
    rows, mask = _layout_rows_and_mask(layout, seed=num_kv_heads)
    num_rows, length = rows["segment_ids"].shape
    keys = jax.random.split(jax.random.PRNGKey(block_size), 4)
    query = jax.random.normal(keys[0], (num_rows, length, 4, 8))
    key, value = (jax.random.normal(k, (num_rows, length, num_kv_heads, 8)) for k in keys[1:3])
    weights = jax.random.normal(keys[3], query.shape)  # a random cotangent
    dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask)
    blockwise = lambda q, k, v: transformer.blockwise_attention(q, k, v, mask, block_size)
    np.testing.assert_allclose(blockwise(query, key, value), dense(query, key, value), atol=1e-5)
    gradients = [jax.grad(lambda *args, fn=fn: jnp.sum(fn(*args) * weights), argnums=(0, 1, 2))(query, key, value)
                 for fn in (dense, blockwise)]
    for dense_grad, blockwise_grad in zip(*gradients):
        np.testing.assert_allclose(blockwise_grad, dense_grad, atol=1e-5)


def test_blockwise_attention_skips_the_blocks_the_mask_hides():
    """Packed rows of short sequences: most block pairs are hidden, and those are not computed (a
    hidden block filled with NaN keys and values changes nothing)."""
    rows, mask = _layout_rows_and_mask("packed", seed=0)
    num_rows, length = rows["segment_ids"].shape
    # [rows, query blocks, key blocks] of 10: does the block pair hold a visible (query, key) pair?
    visible = np.asarray(mask[:, 0]).reshape(num_rows, length // 10, 10, length // 10, 10).any(axis=(2, 4))
    assert 0 < int(visible.sum()) < visible.size // 2
    query, key, value = (jax.random.normal(jax.random.PRNGKey(i), (num_rows, length, 2, 8)) for i in range(3))
    # Keys of the last block are seen by no query of the first block: NaN there must not leak into it.
    poisoned = lambda x: x.at[:, -10:].set(jnp.nan)
    out = transformer.blockwise_attention(query, poisoned(key), poisoned(value), mask, 10)
    assert not visible[:, 0, -1].any() and np.isfinite(np.asarray(out[:, :10])).all()


def test_decoder_logits_do_not_depend_on_the_attention_path():
    """The benchmark's model with `attention_block_size` gives the dense path's logits at every real
    token (prefix-shared mask). Padding attends to nothing there, so its blocks are skipped."""
    rows, mask = _layout_rows_and_mask("packed_prefix_shared", seed=1)
    config = run_config("bench_hh", "runlocal").model
    dense_model = models.Decoder(models.decoder_config(config), rngs=nnx.Rngs(0))
    config.attention_block_size = 16
    blockwise_model = models.Decoder(models.decoder_config(config), rngs=nnx.Rngs(0))
    inputs = dict(input_ids=rows["input_ids"], positions=rows["positions"], segment_ids=rows["segment_ids"],
                  mask=mask[:, 0])
    real = np.asarray(rows["segment_ids"]) > 0
    assert (~real).any()  # the rows hold padding
    np.testing.assert_allclose(np.asarray(blockwise_model(**inputs))[real], np.asarray(dense_model(**inputs))[real],
                               atol=1e-5)


def test_matmul_flops_per_token_counts_every_weight_matmul():
    """2 FLOPs per weight of every matmul: all kernels, plus the tied embedding as the output layer."""
    config = run_config("bench_hh")
    _, abstract_params, _ = models.abstract_model(config.model)
    kernels = sum(int(np.prod(leaf.shape)) for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params)
                  if "kernel" in jax.tree_util.keystr(path))
    embedding = int(np.prod(abstract_params["token_embedding"]["embedding"].shape))
    assert bench.matmul_flops_per_token(models.decoder_config(config.model)) == 2 * (kernels + embedding)


PLAN_CHECK = """
import json, sys
import jax
from dpo_jax import bench, models, planning, sharding, stages
from dpo_jax.configs import load_config
result = {}
for mesh_text, axes in (("data=1", dict(data=-1)), ("data=2,fsdp=4", dict(data=2, fsdp=4)),
                        ("fsdp=2,tensor=4", dict(data=1, fsdp=2, tensor=4))):
    config = load_config(sys.argv[1])
    config.model.update(vocab_size=512, embed_dim=128, mlp_dim=512, num_layers=2)
    planned = bench.plan(config, "tpu-v5e", mesh_text)["bytes_per_device"]
    config.mesh.update(axes)
    devices = jax.devices()[:1] if mesh_text == "data=1" else None
    mesh = sharding.make_mesh(config.mesh, devices)
    model = planning.plan_model(config, mesh)
    stage = stages.STAGES["dpo"].plan(config, mesh, model)
    params = models.init_params(config.model, seed=0, shardings=model.param_shardings)
    state = planning.init_state(stage, params)
    result[mesh_text] = {"planned": sum(planned[k] for k in ("params", "opt_state", "ref_params")),
                         "measured": sharding.bytes_per_device(state)}
print(json.dumps(result))
"""


def test_plan_memory_matches_the_measured_train_state():
    """--plan's per-device train-state bytes against a real state on 8 CPU devices, for three meshes."""
    result = _last_json(run_python(["-c", PLAN_CHECK, config_path("quickstart")],
                                   env=host_devices(8)))
    for mesh_text, figures in result.items():
        assert figures["planned"] == pytest.approx(figures["measured"], rel=0.03), mesh_text


def test_plan_command_line_for_a_preset_on_a_pod():
    result = _last_json(run_python(["-m", "dpo_jax.bench", "--plan", "--config=configs/quickstart.py:model=pythia-2.8b",
                                    "--accelerator=tpu-v5p", "--mesh=data=2,fsdp=8"]))
    memory = result["bytes_per_device"]
    assert result["devices"] == 16 and result["mode"] == "plan"
    # 2.8B parameters in float32, split 8 ways by fsdp: about 1.4 GB per device.
    assert memory["params"] > 1.2e9 and memory["params"] < 1.6e9
    assert memory["opt_state"] == pytest.approx(2 * memory["params"], rel=0.01)
    assert memory["activations_remat"] < memory["activations"]
    assert result["step_sec_lower_bound"] > 0
    assert result["attention"] == "splash"  # auto on a TPU
    table = result["activations_by_length"]
    assert list(table) == [str(length) for length in bench.PLAN_ROW_LENGTHS]
    assert all(figures["fused"] < figures["dense"] for figures in table.values())


def test_plan_without_the_reference_holds_no_reference_bytes():
    config = run_config("quickstart")
    config.dpo.reference = "precomputed"
    result = bench.plan(config, "h100", "data=1")
    assert result["bytes_per_device"]["ref_params"] == 0
    assert result["flops_per_step"] < bench.plan(run_config("quickstart"), "h100", "data=1")["flops_per_step"]


def _quickstart_decoder(dtype="float32"):
    config = run_config("quickstart").model
    config.dtype = dtype
    return models.decoder_config(config)


@pytest.mark.parametrize("remat", [False, True])
def test_plan_dense_activations_grow_quadratically_and_fused_ones_linearly(remat):
    """Doubling the row doubles everything the fused path keeps (it is all per token), while the
    dense path keeps 2 T^2 entries more than twice its bytes at T: of the float32 softmax output of
    each head of every kept layer (one with remat, recomputed), and of the boolean [T, T] mask. In
    bfloat16, so that the float32 entries are told from the compute dtype's."""
    c = _quickstart_decoder("bfloat16")
    assert jnp.dtype(c.dtype).itemsize == 2
    length = 512

    def kept(row_length, attention, prefix_shared=False):
        return bench.activation_bytes_per_row(c, row_length, attention=attention, remat=remat,
                                              prefix_shared=prefix_shared)

    layers = 1 if remat else c.num_layers
    quadratic = 2 * length ** 2 * (4 * c.num_heads * layers + 1)
    assert kept(2 * length, "dense") - 2 * kept(length, "dense") == quadratic
    for attention in ("splash", "pallas_gpu"):
        for prefix_shared in (False, True):
            assert kept(2 * length, attention, prefix_shared) == 2 * kept(length, attention, prefix_shared)
    # Prefix sharing gives the kernel a row of 2T slots: T more of q, k, v, the output and a float32
    # log-sum-exp per head, in each kept layer.
    width = c.resolved_head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    per_slot = jnp.dtype(c.dtype).itemsize * width + 4 * c.num_heads
    assert kept(length, "splash", True) - kept(length, "splash") == layers * length * per_slot
    # At one length the paths differ by the weights against the log-sum-exp, and the mask.
    assert kept(length, "dense") - kept(length, "splash") == (
        layers * length * 4 * c.num_heads * (length - 1) + length ** 2)


@pytest.mark.parametrize("accelerator,model_overrides,expected", [
    ("tpu-v5p", {}, "splash"), ("tpu-v5e", {}, "splash"), ("h100", {}, "pallas_gpu"), ("h200", {}, "pallas_gpu"),
    ("tpu-v5p", {"attention_kernel": "dense"}, "dense"), ("h100", {"attention_kernel": "pallas_gpu"}, "pallas_gpu"),
    ("tpu-v5p", {"sliding_window": 8}, "dense"), ("h200", {"sliding_window": 8}, "dense")])
def test_plan_assumes_the_attention_the_training_forward_takes_there(accelerator, model_overrides, expected):
    """auto is the chip's fused kernel; an explicit kernel is taken as given; a sliding window is dense.
    The activation estimate follows: the dense path keeps more than the fused one."""
    config = run_config("quickstart")
    config.model.update(model_overrides)
    result = bench.plan(config, accelerator, "data=1")
    assert result["attention"] == expected
    kernel_planned = bench.plan(run_config("quickstart"), accelerator, "data=1")
    if expected == "dense":
        assert result["bytes_per_device"]["activations"] > kernel_planned["bytes_per_device"]["activations"]
    else:
        assert result["bytes_per_device"]["activations"] == kernel_planned["bytes_per_device"]["activations"]


def test_plan_rejects_a_kernel_the_accelerator_does_not_run():
    config = run_config("quickstart")
    config.model.attention_kernel = "splash"
    with pytest.raises(ValueError, match="does not run on h100"):
        bench.plan(config, "h100", "data=1")


def test_plan_prefix_shared_rows_give_the_fused_kernel_a_row_twice_as_long():
    """Attention FLOPs per step of packed rows of T = 1024 slots with and without prefix sharing: the
    fused kernel visits the causal block pairs of its row, T / 128 = n blocks or, the prompts copied,
    2n; the dense path computes all T^2 pairs either way. Per step: the policy's forward, a backward
    of 3.5 forwards (fused: the scores recomputed) or 2 (dense), and the live reference's forward."""
    c = _quickstart_decoder()
    length, block = 1024, 128
    per_pair = 4 * c.num_layers * c.num_heads * c.resolved_head_dim
    n = length // block
    results = {}
    for layout in ("packed", "packed_prefix_shared"):
        for kernel in ("auto", "dense"):
            config = run_config("quickstart")
            config.data.update(layout=layout, row_length=length)
            config.model.update(attention_kernel=kernel, attention_kernel_block_size=block)
            results[layout, kernel] = bench.plan(config, "tpu-v5p", "data=1")
    rows = config.train.global_batch_size
    fused = {"packed": n * (n + 1) // 2, "packed_prefix_shared": 2 * n * (2 * n + 1) // 2}
    for layout, block_pairs in fused.items():
        result = results[layout, "auto"]
        assert result["attention"] == "splash"
        assert result["attention_length"] == (2 * length if layout == "packed_prefix_shared" else length)
        assert result["attention_flops_per_step"] == pytest.approx(
            rows * block_pairs * block ** 2 * per_pair * (1 + 3.5 + 1), rel=1e-12)
        assert results[layout, "dense"]["attention_flops_per_step"] == pytest.approx(
            rows * length ** 2 * per_pair * (1 + 2 + 1), rel=1e-12)
    prefix_over_packed = (results["packed_prefix_shared", "auto"]["attention_flops_per_step"]
                          / results["packed", "auto"]["attention_flops_per_step"])
    assert prefix_over_packed == pytest.approx((2 * length) ** 2 / length ** 2, rel=0.25)  # (2T)^2/2 over T^2/2
    step_difference = (results["packed_prefix_shared", "auto"]["flops_per_step"]
                       - results["packed", "auto"]["flops_per_step"])
    assert step_difference == pytest.approx(results["packed_prefix_shared", "auto"]["attention_flops_per_step"]
                                            - results["packed", "auto"]["attention_flops_per_step"], rel=1e-12)


def test_plan_tabulates_activations_by_row_length_dense_against_fused():
    """The table: per device, the config's rows (padded: 2 per pair) at each length. The fused column
    doubles with the length; the dense one outgrows that by the rows' softmax outputs and masks, so
    its share over the fused one rises with every doubling."""
    config = run_config("quickstart")
    config.model.dtype = "bfloat16"
    c = models.decoder_config(config.model)
    result = bench.plan(config, "h100", "data=1")
    table = {int(length): figures for length, figures in result["activations_by_length"].items()}
    rows = 2 * config.train.global_batch_size
    lengths = sorted(table)
    assert lengths == list(bench.PLAN_ROW_LENGTHS)
    for short, long in zip(lengths, lengths[1:]):
        assert long == 2 * short
        for column in ("fused", "fused_remat"):
            assert abs(table[long][column] - 2 * table[short][column]) <= 1  # int bytes per device
        assert table[long]["dense"] - 2 * table[short]["dense"] == pytest.approx(
            rows * 2 * short ** 2 * (4 * c.num_heads * c.num_layers + 1), abs=2)
        assert table[long]["dense"] / table[long]["fused"] > table[short]["dense"] / table[short]["fused"]
