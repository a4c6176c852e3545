"""Multi-run experiments: the DPO paper's controlled-sentiment pipeline and its baselines, end to end.

`config.experiment.name = "controlled_sentiment"` (configs/imdb_gpt2_large.py, configs/sentiment_frontier.py):

1. corpus   (`experiment.generate_corpus`) a review corpus generated offline, and its tokenizer
2. base     a run of `config.stages` (e.g. pretrain then SFT): the SFT model, every method's start
3. pairs    `samples_per_prompt` completions per prompt sampled from the SFT model and scored by the
            ground-truth scorer; every two completions of a prompt with different scores make a pair
4. reward   a reward model (Bradley-Terry) trained on the pairs, from the SFT model
5. methods  one run per DPO beta, IPO beta, PPO KL coefficient (learned reward), PPO-GT KL
            coefficient (reward = the ground-truth scorer), online DPO beta and GRPO beta (learned
            reward), Preferred-FT and Unlikelihood, each from the SFT model
6. results  every policy (the SFT model and Best-of-N included) sampled on the same held-out prompts,
            scored by `config.evaluation.scorer`, with its sequence KL to the SFT model:
            results.json, results.md and frontier.png (reward against KL)

Each run is an ordinary workdir under `<workdir>/runs/`, so rerunning the command resumes every
piece where it stopped, and finished pieces are read back rather than recomputed.
"""

import copy
import functools
import os
import tempfile

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from dpo_jax import checkpointing, evaluation, lock, planning, scorers, sharding, storage, train
from dpo_jax.configs import validation
from dpo_jax.data import reviews, task, tokenize
from dpo_jax.workdir import bind_workdir, make_workdir

EXPERIMENTS = ("controlled_sentiment",)


def run(config, workdir):
    """Runs the experiment `config.experiment.name` in `workdir`; returns its results rows."""
    if config.experiment.name not in EXPERIMENTS:
        raise ValueError(f"config.experiment.name: {config.experiment.name!r} is not one of {EXPERIMENTS}")
    validation.validate(config)
    make_workdir(workdir)
    with lock.hold(workdir):  # its runs, in directories of their own, hold theirs
        if jax.process_index() == 0:
            bind_workdir(config, workdir)
        return _controlled_sentiment(config, workdir)


def _sub_config(config, stages, **overrides):
    """A plain run of `stages` with the experiment's settings and `overrides` ({"a.b": value}); it
    evaluates samples only when the overrides say so (the methods' runs)."""
    sub = copy.deepcopy(config)
    sub.unlock()
    sub.experiment.name = ""
    sub.evaluation.scorer = sub.evaluation.judge = ""
    sub.stages = tuple(stages)
    for key, value in overrides.items():
        node = sub
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return sub


def _run(config, workdir, name):
    logging.info("experiment: run %s in %s", name, workdir)
    return train.run(config, workdir)


def _controlled_sentiment(config, workdir):
    experiment = config.experiment
    pair_scorer_spec = experiment.pair_scorer or config.evaluation.scorer
    if not pair_scorer_spec or not config.evaluation.scorer:
        raise ValueError("config.evaluation.scorer: the controlled_sentiment experiment needs a scorer (e.g. 'vader')")

    # ------------------------------------------------------------------------- corpus
    data_overrides = {}
    if experiment.generate_corpus:
        corpus_dir = os.path.join(workdir, "corpus")
        if jax.process_index() == 0:
            write = functools.partial(reviews.write_corpus, num_pretrain=experiment.corpus_reviews,
                                      num_sft_train=experiment.corpus_reviews // 5,
                                      num_sft_eval=config.evaluation.num_prompts, seed=config.seed,
                                      vocab_size=config.model.vocab_size)
            if storage.is_remote(corpus_dir):  # generated on local disk (deterministic), then uploaded
                with tempfile.TemporaryDirectory() as local:
                    write(local)
                    storage.upload_tree(local, corpus_dir)
            else:
                write(corpus_dir)
        _sync("corpus written")
        data_overrides = {
            "data.name": ("preference_files",), "data.tokenizer": os.path.join(corpus_dir, "tokenizer"),
            "data.data_dir": os.path.join(workdir, "tensorflow_datasets"),
            "data.pretrain_files": (os.path.join(corpus_dir, "pretrain.jsonl"),),
            "data.pretrain_eval_files": (os.path.join(corpus_dir, "pretrain_eval.jsonl"),),
            "data.sft_train_files": (os.path.join(corpus_dir, "sft_train.jsonl"),),
            "data.sft_eval_files": (os.path.join(corpus_dir, "sft_eval.jsonl"),),
            "data.sft_split": "sft_train", "data.sft_eval_split": "sft_test"}

    # ------------------------------------------------------------------------- base (SFT) run
    base_config = _sub_config(config, config.stages, **data_overrides)
    base_dir = os.path.join(workdir, "runs", "sft")
    _run(base_config, base_dir, "sft")
    sft_checkpoints = os.path.join(base_dir, "checkpoints", config.stages[-1])

    # ------------------------------------------------------------------------- pairs
    tokenizer = tokenize.load(base_config.data.tokenizer or base_config.model.init_from_hf)
    mesh = sharding.make_mesh(config.mesh)
    model = planning.plan_model(config, mesh)
    sft_params = checkpointing.restore_params(sft_checkpoints, model.abstract_params)
    prompt_task = task.load_task(_sub_config(base_config, ("ppo",)))
    pairs_dir = os.path.join(workdir, "pairs")
    pair_scorer = scorers.make_scorer(pair_scorer_spec)
    pair_files = {}
    for split, prompts, seed in (("train", prompt_task.prompts_train, config.seed),
                                 ("test", prompt_task.prompts_eval, config.seed + 1)):
        if split == "train" and experiment.num_pair_prompts:
            prompts = {key: value[:experiment.num_pair_prompts] for key, value in prompts.items()}
        pair_files[split] = _write_pairs(os.path.join(pairs_dir, f"{split}.jsonl"), model.graphdef, sft_params,
                                         prompts, tokenizer, pair_scorer, config, seed)
    pair_data = {**data_overrides, "data.name": ("preference_files",), "data.train_files": (pair_files["train"],),
                 "data.eval_files": (pair_files["test"],), "data.on_bad_example": "skip",
                 "data.tokenizer": base_config.data.tokenizer}

    # ------------------------------------------------------------------------- reward model
    reward_dir = os.path.join(workdir, "runs", "reward")
    _run(_sub_config(config, ("reward",), **pair_data, **{"reward.init_from": sft_checkpoints}), reward_dir, "reward")
    reward_checkpoints = os.path.join(reward_dir, "checkpoints", "reward")

    # ------------------------------------------------------------------------- methods
    evaluated = {**pair_data, "evaluation.scorer": config.evaluation.scorer}
    methods = []  # (method, setting, stages, overrides)
    methods += [("DPO", f"beta={beta:g}", ("dpo",), {"dpo.beta": beta, "dpo.init_from": sft_checkpoints})
                for beta in experiment.dpo_betas]
    methods += [("IPO", f"beta={beta:g}", ("dpo",), {"dpo.beta": beta, "dpo.loss_type": ("ipo",),
                                                      "dpo.init_from": sft_checkpoints})
                for beta in experiment.ipo_betas]
    methods += [("PPO", f"kl_coef={coef:g}", ("ppo",), {"ppo.kl_coef": coef, "ppo.init_from": sft_checkpoints,
                                                        "ppo.reward_from": reward_checkpoints})
                for coef in experiment.ppo_kl_coefs]
    methods += [("PPO-GT", f"kl_coef={coef:g}", ("ppo",), {"ppo.kl_coef": coef, "ppo.init_from": sft_checkpoints,
                                                           "ppo.reward": pair_scorer_spec})
                for coef in experiment.ppo_gt_kl_coefs]
    methods += [(method, f"beta={beta:g}", (stage,), {f"{stage}.beta": beta, f"{stage}.init_from": sft_checkpoints,
                                                      f"{stage}.reward_from": reward_checkpoints})
                for method, stage, betas in (("Online DPO", "online_dpo", experiment.online_dpo_betas),
                                             ("GRPO", "grpo", experiment.grpo_betas))
                for beta in betas]
    if experiment.preferred_ft:
        methods.append(("Preferred-FT", "", ("sft",), {"sft.init_from": sft_checkpoints}))
    if experiment.unlikelihood:
        methods.append(("Unlikelihood", f"alpha={config.unlikelihood.alpha:g}", ("unlikelihood",),
                        {"unlikelihood.init_from": sft_checkpoints}))
    rows = []
    for method, setting, stages, overrides in methods:
        name = (method + ("_" + setting if setting else "")).lower().replace("=", "")
        name = name.replace("-", "_").replace(" ", "_")
        summary = _run(_sub_config(config, stages, **evaluated, **overrides), os.path.join(workdir, "runs", name),
                       name)
        rows.append(_row(method, setting, summary["evaluation"]))

    # ------------------------------------------------------------------------- SFT and Best-of-N
    rows += _sft_and_best_of_n(config, workdir, model, sft_params, prompt_task.prompts_eval, tokenizer, mesh,
                               reward_checkpoints)

    # ------------------------------------------------------------------------- results
    if jax.process_index() == 0:
        evaluation.write_results(rows, workdir)
        evaluation.plot_frontier(rows, os.path.join(workdir, "frontier.png"))
    return rows


def _sync(name):
    """Waits until every process got here (files process 0 writes are then there for all)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"dpo_jax.experiment: {name}")


def _row(method, setting, result):
    """A results row of an `evaluation.evaluate_policy` result: the score at temperature 1 and the KL."""
    at_one = result["temperatures"]["1.0"] if "temperatures" in result else result
    return {"method": method, "setting": setting, "kl": result["kl"], "score": at_one["score"],
            "score_std": at_one.get("score_std")}


def _write_pairs(path, graphdef, params, prompts, tokenizer, scorer, config, seed):
    """Samples completions per prompt, scores them, writes every pair with different scores as a
    preference record {"prompt", "chosen", "rejected"} (plus both scores); returns `path`."""
    if os.path.exists(path):  # written whole (renamed into place) by an earlier invocation
        return path
    samples = evaluation.sample_responses(
        graphdef, params, prompts["prompt_ids"], prompts["prompt_lengths"], rng=jax.random.key(seed),
        temperature=1.0, samples_per_prompt=config.experiment.samples_per_prompt,
        max_new_tokens=config.evaluation.max_new_tokens, eos_ids=tuple(tokenizer.eos_ids), pad_id=0,
        batch_size=config.evaluation.batch_size)
    prompt_texts = [tokenizer.decode(ids[:length].tolist())
                    for ids, length in zip(prompts["prompt_ids"], prompts["prompt_lengths"])]
    k = config.experiment.samples_per_prompt
    responses = [tokenizer.decode(ids) for ids in samples.responses]  # prompt-major: prompt i has rows i*k..i*k+k-1
    scores = np.asarray(scorer([prompt_texts[i // k] for i in range(len(responses))], responses))
    records = []
    for i, prompt in enumerate(prompt_texts):
        for a in range(i * k, (i + 1) * k):
            for b in range(a + 1, (i + 1) * k):
                if scores[a] == scores[b] or not responses[a].strip() or not responses[b].strip() \
                        or responses[a] == responses[b]:
                    continue
                chosen, rejected = (a, b) if scores[a] > scores[b] else (b, a)
                records.append({"prompt": prompt, "chosen": responses[chosen], "rejected": responses[rejected],
                                "chosen_score": float(scores[chosen]), "rejected_score": float(scores[rejected])})
    if not records:
        raise ValueError(f"No preference pairs: every sampled completion of {len(prompt_texts)} prompts scored the "
                         "same (is the SFT model trained, and does the scorer separate its completions?)")
    storage.write_jsonl(path, records)  # every process sampled the same pairs; process 0 writes them
    _sync(f"{path} written")
    logging.info("experiment: %d pairs from %d prompts in %s", len(records), len(prompt_texts), path)
    return path


def _sft_and_best_of_n(config, workdir, model, sft_params, prompts, tokenizer, mesh, reward_checkpoints):
    """Rows of the SFT model itself (KL 0 by definition; estimated here as a check) and of Best-of-N
    against the reward model, cached in <workdir>/baselines.json."""
    path = os.path.join(workdir, "baselines.json")
    if os.path.exists(path):
        return storage.read_json(path)
    evaluation_config = config.evaluation
    prompts = {key: value[:evaluation_config.num_prompts] for key, value in prompts.items()}
    scorer = scorers.make_scorer(evaluation_config.scorer)
    common = dict(eos_ids=tuple(tokenizer.eos_ids), pad_id=0, seed=config.seed, batch_size=evaluation_config.batch_size,
                  max_new_tokens=evaluation_config.max_new_tokens)
    sft = evaluation.evaluate_policy(model.graphdef, sft_params, sft_params, prompts["prompt_ids"],
                                     prompts["prompt_lengths"], decode=tokenizer.decode, scorer=scorer,
                                     temperatures=[1.0], samples_per_prompt=evaluation_config.samples_per_prompt,
                                     **common)
    rows = [_row("SFT", "", sft)]
    if config.experiment.best_of_n:
        reward_plan = planning.plan_model(config, mesh, scalar_head=True)
        reward_params = checkpointing.restore_params(reward_checkpoints, reward_plan.abstract_params)
        reward_scorer = scorers.RewardModelScorer(reward_plan.graphdef, reward_params, tokenizer,
                                                  max_length=config.data.max_length,
                                                  max_prompt_length=config.data.max_prompt_length,
                                                  batch_size=evaluation_config.batch_size)
        for n in config.experiment.best_of_n:
            result = evaluation.best_of_n(model.graphdef, sft_params, prompts["prompt_ids"], prompts["prompt_lengths"],
                                          n=int(n), decode=tokenizer.decode, reward_scorer=reward_scorer, scorer=scorer,
                                          **common)
            rows.append({"method": "Best-of-N", "setting": f"N={int(n)}", "kl": result["kl"],
                         "score": result["score"], "score_std": result.get("score_std")})
    storage.write_json(path, rows, sort_keys=False)
    _sync("baselines written")
    return rows


def format_rows(rows):
    """The results as a plain-text table, for the end of a run."""
    lines = [f"{'method':<14}{'setting':<16}{'KL':>10}{'score':>10}"]
    lines += [f"{row['method']:<14}{row['setting']:<16}{row['kl']:>10.3f}{row['score']:>10.4f}" for row in rows]
    return "\n".join(lines)
