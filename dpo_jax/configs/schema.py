"""The config tree every run shares: `base_config()`, one comment per key.

Run configs (`configs/*.py`) build on `base_config()` and override what they need, so that all
runs share one schema and validation (`dpo_jax.configs.validation`) knows every key. Each stage's
block (`config.sft`, `config.dpo`, ...) is defined by its module in `dpo_jax/stages/`.

List-valued keys are tuples. On the command line a comma string works too
(`--config.dpo.loss_type=sigmoid,sft`); validation splits it, in `LIST_KEYS`' element type. Paths
go one per flag, repeated (`--config.data.train_files=/a.jsonl --config.data.train_files=/b.jsonl`):
config_flags reads `/a.jsonl,/b.jsonl` as Python and refuses it.

Validation (`dpo_jax.configs.validation`) refuses NaN and inf in every float key, and holds the
range of each number (`validation.RANGES`, e.g. train.b1 in [0, 1)): a float key added here needs
its range there (tests/test_bad_configs.py checks that every one has one).
"""

import ml_collections

from dpo_jax import stages
from dpo_jax.configs import presets

# Tuple-valued keys whose items may come as one comma-separated string, and their items' type.
LIST_KEYS = {
    "stages": str, "data.name": str, "data.weights": float, "data.train_files": str, "data.eval_files": str,
    "data.sft_train_files": str, "data.sft_eval_files": str, "data.pretrain_files": str,
    "data.pretrain_eval_files": str, "evaluation.temperatures": float, "experiment.dpo_betas": float,
    "experiment.ppo_kl_coefs": float, "experiment.ppo_gt_kl_coefs": float, "experiment.best_of_n": int,
    "experiment.ipo_betas": float, "experiment.online_dpo_betas": float, "experiment.grpo_betas": float,
    "experiment.dpo_learning_rates": float, "experiment.ppo_target_kls": float, "experiment.seeded_methods": str,
    "experiment.kl_budgets": float,
    "model.lora.targets": str, "bench.length_buckets": int, **stages.LIST_KEYS,
}

# The methods of the controlled-sentiment experiment (dpo_jax/experiment.py): their names in its
# results, and their keys in config.experiment.seeded_methods.
EXPERIMENT_METHODS = {"DPO": "dpo", "IPO": "ipo", "PPO": "ppo", "PPO-GT": "ppo_gt", "Online DPO": "online_dpo",
                      "GRPO": "grpo", "Preferred-FT": "preferred_ft", "Unlikelihood": "unlikelihood"}


def base_config():
    """The full config tree with defaults; run configs override what they need."""
    config = ml_collections.ConfigDict()
    config.stages = ("sft", "dpo")            # stages run in order (dpo_jax.stages.STAGES); each starts from the
                                              #   previous policy stage's params
    config.seed = 0                           # seeds init, data order and dropout-free rngs

    config.model = presets.model_config()

    config.data = ml_collections.ConfigDict(dict(
        name=("synthetic",),                  # synthetic | hh_rlhf/<helpful-base|harmless-base|helpful-online|
                                              #   helpful-rejection-sampled> | stanford_shp | ultrafeedback_binarized |
                                              #   tldr_comparisons | imdb_prefixes | preference_files; several make
                                              #   a mixture
        weights=(),                           # mixture weights, one per name (empty: equal)
        data_dir="",                          # where TFDS prepares datasets ("": TFDS's default ~/tensorflow_datasets)
        manual_dir="",                        # raw files already on disk, laid out as their source repo ("": download)
        train_files=(),                       # preference_files: preference files (train split)
        eval_files=(),                        # preference_files: preference files of the "test" split
        sft_train_files=(),                   # preference_files: SFT files ({prompt, completion} or {messages})
        sft_eval_files=(),                    # preference_files: held-out SFT files
        pretrain_files=(),                    # pretrain stage: JSONL files of {"text": ...} (any data.name; none with
                                              #   synthetic: its pairs' prompt + chosen ids)
        pretrain_eval_files=(),               # pretrain stage: held-out {"text": ...} files
        train_split="train",                  # split DPO trains on
        eval_split="test",                    # split DPO evaluates on (tldr_comparisons, stanford_shp: validation)
        sft_split="",                         # split SFT trains on ("": the chosen responses of train_split)
        sft_eval_split="",                    # split SFT evaluates on ("": the chosen responses of eval_split)
        tokenizer="",                         # Hugging Face model dir (or its tokenizer.json); "": model.init_from_hf
        chat_template=False,                  # render examples that have chat messages with the tokenizer's template
        check_boundaries=True,                # assert ids(prompt) + ids(response) == ids(prompt + response)
        on_bad_example="error",               # error | skip: a bad record raises (naming file and line) or is counted
        layout="padded",                      # padded | packed | prefix_shared | packed_prefix_shared
        row_length=0,                         # packed: tokens per row, >= max_length (0: 2 * max_length, fits any pair)
        max_pairs_per_row=8,                  # packed layouts: pairs per row at most (SFT: twice as many sequences)
        max_length=24,                        # tokens per sequence (prompt + response)
        max_prompt_length=12,                 # prompt tokens kept (truncated from the left, keeping a BOS)
        num_train=4096,                       # synthetic: training pairs
        num_eval=256,                         # synthetic: held-out pairs
    ))

    config.train = ml_collections.ConfigDict(dict(
        global_batch_size=32,                 # pairs (DPO) or sequences (SFT) per step, over all devices
        optimizer="adamw",                    # adamw | rmsprop
        b1=0.9,                               # adamw beta1
        b2=0.999,                             # adamw beta2
        weight_decay=0.0,                     # adamw decoupled weight decay
        grad_clip_norm=1.0,                   # global-norm gradient clipping (0 = off)
        grad_accum_steps=1,                   # micro-batches per step (gradient accumulation; same update)
        max_nonfinite_steps=10,               # stop after this many steps in a row with a non-finite loss/gradient
        log_every_steps=10,                   # train metrics to metrics.jsonl / TensorBoard
    ))

    for stage in stages.STAGES.values():
        config[stage.name] = stage.config_block()

    config.evaluation = ml_collections.ConfigDict(dict(
        scorer="",                            # what scores samples: vader | command:<cmd> | reward_model:<dir> |
                                              #   hf_classifier:<dir> ("" = no sample evaluation)
        judge="",                             # win rates against reference responses: command:<cmd> |
                                              #   scorer:<scorer spec>, e.g. scorer:reward_model:<dir> ("" = none)
        temperatures=(1.0,),                  # sampling temperatures
        samples_per_prompt=4,                 # samples drawn per held-out prompt and temperature
        num_prompts=256,                      # held-out prompts evaluated (the first N of the eval split)
        max_new_tokens=24,                    # sampled response length at most
        batch_size=64,                        # prompts per sampling batch
    ))

    config.experiment = ml_collections.ConfigDict(dict(
        name="",                              # "": one run of config.stages | controlled_sentiment: the DPO paper's
                                              #   IMDb pipeline (dpo_jax/experiment.py): a base run of config.stages,
                                              #   pairs sampled from it and labelled by a scorer, a reward model, then
                                              #   one run per method below, all evaluated on the same prompts
        generate_corpus=False,                # train on a review corpus generated offline (dpo_jax/data/reviews.py)
        corpus_reviews=20000,                 # generate_corpus: pretraining reviews (SFT gets a fifth more)
        samples_per_prompt=4,                 # completions sampled per prompt; every two with different scores make
                                              #   a pair
        num_pair_prompts=0,                   # training prompts sampled for pairs (0 = all)
        pair_scorer="",                       # the ground-truth scorer labelling pairs ("" = evaluation.scorer)
        dpo_betas=(0.1,),                     # one DPO run per beta
        ppo_kl_coefs=(),                      # one PPO run (learned reward model) per KL coefficient
        ppo_gt_kl_coefs=(),                   # one PPO-GT run (reward = the pair scorer) per KL coefficient
        ipo_betas=(),                         # one IPO run (dpo.loss_type='ipo') per beta
        online_dpo_betas=(),                  # one online DPO run (pairs sampled and labelled by the reward model
                                              #   during training) per beta
        grpo_betas=(),                        # one GRPO run (learned reward) per KL-penalty weight beta
        preferred_ft=False,                   # Preferred-FT: SFT on the chosen responses of the pairs
        unlikelihood=False,                   # Unlikelihood on the pairs
        best_of_n=(),                         # Best-of-N against the reward model, one evaluation per N
        dpo_learning_rates=(),                # DPO (and IPO) runs per beta at each of these learning rates (() =
                                              #   dpo.learning_rate)
        ppo_target_kls=(),                    # one PPO run (learned reward) per target KL, its kl_coef adapted from
                                              #   ppo.kl_coef by the adaptive controller (horizon ppo.kl_horizon)
        num_seeds=1,                          # runs of the seeded_methods repeat with seeds seed, seed + 1, ...; the
                                              #   shared pieces (corpus, base run, pairs, reward model) use seed
        seeded_methods=("dpo", "ppo", "online_dpo"),  # the methods num_seeds repeats, out of dpo, ipo, ppo,
                                              #   ppo_gt, online_dpo, grpo, preferred_ft, unlikelihood
        trajectory_every=0,                   # 0: each method run evaluated at its end | N: each keeps a checkpoint
                                              #   every N steps, each evaluated (the run's trajectory)
        kl_budgets=(1.0, 2.0, 5.0, 10.0),     # the budget table's limits (nats): each method's best score at KL <= each
    ))

    config.eval = ml_collections.ConfigDict(dict(
        every_steps=50,                       # evaluate on held-out data every N steps (and at 0 and the end)
        batch_size=64,                        # held-out pairs per eval batch
    ))

    config.checkpoint = ml_collections.ConfigDict(dict(
        every_steps=50,                       # save every N steps (and at the end of a stage, and on SIGTERM)
        every_minutes=0.0,                    # also save when this many minutes passed since the last save (0 = off)
        max_to_keep=2,                        # the latest checkpoints kept per stage
        best_metric="",                       # also keep the best checkpoint by this eval metric (e.g. loss)
        best_mode="min",                      # min | max: which value of best_metric is best
    ))

    config.mesh = ml_collections.ConfigDict(dict(
        dcn=1,                                # data-parallel axis across TPU slices (multi-slice runs)
        data=-1,                              # data-parallel axis size (-1: all remaining devices)
        fsdp=1,                               # parameter-sharding axis size
        tensor=1,                             # tensor-parallel axis size
    ))
    return config


def bench_config():
    """The `config.bench` block of `python -m dpo_jax.bench`: how it runs and which levers are on (all by default)."""
    return ml_collections.ConfigDict(dict(
        workdir="/tmp/dpo_jax_bench",     # TFDS data, the trained tokenizer, reference log-probs, TRL's files
        rounds=5,                         # timed rounds; --compare=trl and --ab_config alternate the two sides
                                          #   round by round, and the matmul probe is re-run before each
        steps=4,                          # timed steps per round
        warmup_steps=3,                   # steps run before timing (after compilation), at least 1
        phase_repeats=5,                  # runs of each separately jitted phase (the median is reported)
        compute_dtype="auto",             # model.dtype: auto = float32 on CPU, bfloat16 on TPU/GPU
        attention_block_size=-1,          # model.attention_block_size: -1 = auto: 64 on CPU (blockwise attention,
                                          #   masked blocks skipped), 0 on TPU/GPU (jax.nn.dot_product_attention)
        matmul_probe_size=2048,           # CPU peak: a square float matmul of this size, best of 5
        prefetch=True,                    # assemble and place batch i+1 in a thread while step i runs
        donate=True,                      # donate the train state's buffers to the step (updated in place)
        lagged_metrics=True,              # read step metrics late, as training does (False: the host waits every step)
        length_buckets=(),                # trim trailing padding columns to the smallest of these lengths that
                                          #   fits the batch, one compile per bucket used; () = the full row
        compilation_cache_dir="",         # JAX persistent compilation cache ("" = off): a rerun loads, not compiles
        trl_steps=0,                      # --compare=trl: timed TRL steps per round (0 = as many as `steps`)
        trl_gradient_checkpointing=False,  # --compare=trl: TRL's gradient checkpointing (its default is on)
        trl_dtype="auto",                 # --compare=trl: TRL's compute, float32 or bfloat16 (PyTorch's autocast
                                          #   over float32 weights); auto = the faster of the two by a torch
                                          #   matmul probe on this host, whatever dpo_jax computes in
    ))
