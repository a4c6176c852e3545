r"""The DPO step benchmark on Anthropic HH (`python -m dpo_jax.bench`), and the switches of its levers.

Real HH pairs through the `hh_rlhf` builder, a byte-level BPE of 8192 tokens trained on them, a
GPT-2-architecture decoder (4 layers, width 256, 4 heads), 8 pairs per step, sequences of at most
512 tokens, a live reference; float32 compute on CPU, bfloat16 on TPU/GPU.

  python -m dpo_jax.bench --config=configs/bench_hh.py
  python -m dpo_jax.bench --config=configs/bench_hh.py --compare=trl            # + TRL's DPOTrainer
  python -m dpo_jax.bench --config=configs/bench_hh.py:layout=padded            # a lever off
  python -m dpo_jax.bench --config=configs/bench_hh.py --config.bench.prefetch=False
  python -m dpo_jax.bench --config=configs/bench_hh.py --config.bench.attention_block_size=0  # dense attention
  python -m dpo_jax.bench --config=configs/bench_hh.py --config.model.logits_chunk_size=0     # full logits
  python -m dpo_jax.bench --config=configs/bench_hh.py --ab_config=configs/bench_hh.py:layout=padded  # A/B, one process
  python -m dpo_jax.bench --config=configs/bench_hh.py:runlocal                 # seconds (tests)
  python -m dpo_jax.bench --config=configs/bench_hh.py:synthetic                # no HH data at hand
  python -m dpo_jax.bench --config=configs/bench_hh.py --suite                  # every shape below, beside TRL

Arg `layout=` picks the data layout with a batch of about 8 pairs: `padded` and `prefix_shared` hold
one pair per unit (8 units), the packed layouts up to 5 pairs per row (2 rows). `model=` picks the
architecture (`MODELS`); `long` allows pairs of 1024 tokens (prompts up to 768) in rows twice as
long, with the same pairs per step on average; `reference=` the DPO reference (live | precomputed). Offline, the raw
files come from `data.manual_dir` (by default ../shared/data/hh-rlhf next to the repository, when
it exists), whose harmless-base split `test` is the benchmark's data.
"""

import os

from dpo_jax.configs import base_config, bench_config, model_config, parse_arg

_SHARED_HH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir, "shared", "data",
                          "hh-rlhf")
# layout -> (row_length, max_pairs_per_row, units per batch): about 8 pairs per step in each layout.
# HH pairs take ~320 tokens packed and ~210 prefix-shared, so two rows of 1280 or 832 slots hold 7.8
# pairs on average, with 2% padding (`layouts.pack`); TRL's batch is that average, rounded (8).
LAYOUT_BATCHES = {
    "padded": (0, 1, 8),
    "prefix_shared": (0, 1, 8),
    "packed": (1280, 5, 2),
    "packed_prefix_shared": (832, 5, 2),
}
# `long`: rows of 2048 slots, as many pairs per step as the 512-token rows above on average.
LONG_LAYOUT_BATCHES = {
    "padded": (0, 1, 8),
    "prefix_shared": (0, 1, 8),
    "packed": (2048, 6, 2),
    "packed_prefix_shared": (2048, 10, 1),
}
_GPT2 = dict(num_heads=4, num_kv_heads=4, mlp_dim=1024)
_LLAMA = dict(hf_model_type="llama", position_embedding="rope", norm="rmsnorm", activation="silu", gated_mlp=True,
              tie_embeddings=False, attention_bias=False, attention_out_bias=False, mlp_bias=False)
# model= -> the decoder: GPT-2 architectures and a Llama one (GQA, SwiGLU, RoPE, untied embeddings).
MODELS = {
    "gpt2_4x256": dict(num_layers=4, embed_dim=256, **_GPT2),
    "gpt2_6x512": dict(num_layers=6, embed_dim=512, num_heads=8, num_kv_heads=8, mlp_dim=2048),
    # SwiGLU's three matrices of 1408 hold about the FLOPs of GPT-2's two of 2048.
    "llama_6x512": dict(_LLAMA, num_layers=6, embed_dim=512, num_heads=8, num_kv_heads=2, mlp_dim=1408),
}


def get_config(arg=None):
    arg = parse_arg(arg, layout="packed_prefix_shared", model="gpt2_4x256", long=False, reference="live",
                    runlocal=False, synthetic=False)
    if arg.model not in MODELS:
        raise ValueError(f"configs/bench_hh.py: model={arg.model!r} is not one of {', '.join(MODELS)}")
    config = base_config()
    config.stages = ("dpo",)
    max_length = 1024 if arg.long else 512
    config.model = model_config("tiny", vocab_size=8192, max_position_embeddings=max_length, **MODELS[arg.model])

    data = config.data
    data.name = ("hh_rlhf/harmless-base",)
    data.manual_dir = _SHARED_HH if os.path.isdir(_SHARED_HH) else ""
    data.train_split = data.eval_split = "test"  # the split on disk offline; the benchmark never evaluates
    data.tokenizer = ""  # "": the benchmark trains a byte-level BPE of model.vocab_size on the split
    if arg.synthetic:  # the quickstart's task at the benchmark's shapes (its pairs are short)
        data.name = ("synthetic",)
    data.max_length = max_length
    data.max_prompt_length = 768 if arg.long else 256
    data.layout = arg.layout
    batches = LONG_LAYOUT_BATCHES if arg.long else LAYOUT_BATCHES
    data.row_length, data.max_pairs_per_row, config.train.global_batch_size = batches[arg.layout]

    config.dpo.reference = arg.reference
    config.dpo.num_steps = 1000  # the schedule's horizon only: the benchmark runs bench.steps
    config.dpo.learning_rate = 5e-6
    config.dpo.warmup_steps = 0
    config.eval.batch_size = 8  # batch of the precomputed-reference pass
    config.bench = bench_config()

    if arg.runlocal:  # a tiny model on short HH pairs: the whole benchmark in seconds (tests)
        grouped = MODELS[arg.model]["num_kv_heads"] < MODELS[arg.model]["num_heads"]
        config.model.update(vocab_size=512, num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=1 if grouped else 2,
                            mlp_dim=64, max_position_embeddings=64)
        data.max_length, data.max_prompt_length = 64, 32
        if data.row_length:
            data.row_length = 2 * data.max_length
        config.bench.update(steps=2, warmup_steps=1, rounds=2, phase_repeats=1, matmul_probe_size=256)
    return config
