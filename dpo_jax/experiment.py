"""Multi-run experiments: the DPO paper's controlled-sentiment pipeline and its baselines, end to end.

`config.experiment.name = "controlled_sentiment"` (configs/imdb_gpt2_large.py, configs/sentiment_frontier.py):

1. corpus   (`experiment.generate_corpus`) a review corpus generated offline, and its tokenizer
2. base     a run of `config.stages` (e.g. pretrain then SFT): the SFT model, every method's start
3. pairs    `samples_per_prompt` completions per prompt sampled from the SFT model and scored by the
            ground-truth scorer; every two completions of a prompt with different scores make a pair
4. reward   a reward model (Bradley-Terry) trained on the pairs, from the SFT model
5. methods  one run per setting of each method, each from the SFT model: DPO betas (times learning
            rates), IPO betas, PPO fixed KL coefficients and adaptive-KL targets (learned reward), PPO-GT
            coefficients (reward = the ground-truth scorer), online DPO and GRPO betas (learned reward),
            Preferred-FT and Unlikelihood; the `seeded_methods` once per seed (`num_seeds`)
6. results  every policy sampled on the same held-out prompts with common random numbers, scored by
            `config.evaluation.scorer`, with its sequence KL to the SFT model (and the KL's standard
            error): each method run at its checkpoints every `trajectory_every` steps (its
            trajectory), the SFT model and Best-of-N. results.{json,md} (final points),
            trajectories.json, budgets.{json,md} (`frontier.budget_table`) and frontier.png

Each run is an ordinary workdir under `<workdir>/runs/`, so rerunning the command resumes every
piece where it stopped, and finished pieces are read back rather than recomputed.
"""

import copy
import functools
import os
import tempfile
import time
from typing import NamedTuple

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from dpo_jax import checkpointing, evaluation, frontier, lock, planning, scorers, sharding, storage, train
from dpo_jax.configs import schema, validation
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
    """A plain run of `stages` with the experiment's settings and `overrides` ({"a.b": value})."""
    sub = copy.deepcopy(config)
    sub.unlock()
    # The runs depend neither on which methods the experiment lists nor on how it evaluates them
    # (the experiment samples and scores every policy itself), so that changing those keeps them.
    defaults = schema.base_config()
    sub.experiment, sub.evaluation = defaults.experiment, defaults.evaluation
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
    eval_prompts = {key: value[:config.evaluation.num_prompts] for key, value in prompt_task.prompts_eval.items()}
    evaluate = functools.partial(_evaluate, config, model, sft_params, eval_prompts, tokenizer,
                                 scorers.make_scorer(config.evaluation.scorer))
    baselines = _sft_and_best_of_n(config, workdir, model, sft_params, eval_prompts, tokenizer, mesh,
                                   reward_checkpoints, evaluate)
    sft_point = {"step": 0, **{key: baselines[0][key] for key in ("kl", "kl_standard_error", "score", "score_std")}}
    runs = []
    for method_run in method_runs(config, workdir, sft_checkpoints, reward_checkpoints, pair_scorer_spec):
        run_dir = os.path.join(workdir, "runs", method_run.name)
        summary = _run(_sub_config(config, (method_run.stage,), **pair_data, **method_run.overrides), run_dir,
                       method_run.name)
        runs.append(_trajectory(method_run, run_dir, summary, config, model, evaluate, sft_point))

    # ------------------------------------------------------------------------- results
    rows = [_row(run["method"], run["setting"], run["seed"], run["points"][-1]) for run in runs] + baselines
    # The SFT model and Best-of-N as runs of the frontier too: from the SFT model's point (Best-of-N's
    # point at step N).
    runs += [{"method": row["method"], "setting": row["setting"], "seed": row["seed"],
              "points": [sft_point] + ([{**_point_of(row), "step": row["step"]}]
                                       if row["method"] == "Best-of-N" else [])}
             for row in baselines]
    if jax.process_index() == 0:
        evaluation.write_results(rows, workdir)
        storage.write_json(os.path.join(workdir, "trajectories.json"), runs, only_process_zero=False, sort_keys=False)
        table = frontier.budget_table(runs, experiment.kl_budgets)
        storage.write_json(os.path.join(workdir, "budgets.json"), table, only_process_zero=False, sort_keys=False)
        frontier.write_budget_table(table, os.path.join(workdir, "budgets.md"))
        frontier.plot_trajectories(runs, os.path.join(workdir, "frontier.png"))
    return rows


class MethodRun(NamedTuple):
    """One run of the experiment: `stage` from the SFT model with `overrides` ({"a.b": value})."""
    method: str    # as the results name it, e.g. "DPO"
    setting: str   # e.g. "beta=0.1 lr=2e-05"
    seed: int
    stage: str
    overrides: dict
    name: str      # its directory under <workdir>/runs/


def method_runs(config, workdir, sft_checkpoints, reward_checkpoints, pair_scorer_spec):
    """The experiment's method runs, in order: every method and setting `config.experiment` lists,
    each at `num_seeds` seeds if among `seeded_methods`."""
    experiment = config.experiment
    start = {"init_from": sft_checkpoints}
    learned = {**start, "reward_from": reward_checkpoints}
    # DPO's reference log-probs are the SFT model's on the experiment's pairs: computed once, for every run.
    dpo = {**start, "reference": "precomputed", "reference_cache_dir": os.path.join(workdir, "reference_logps")}
    learning_rates = experiment.dpo_learning_rates or (None,)
    lr = lambda rate: {} if rate is None else {"learning_rate": rate}
    lr_setting = lambda rate: "" if rate is None else f" lr={rate:g}"
    settings = []  # (method, setting, stage, {key of the stage's block: value})
    settings += [("DPO", f"beta={beta:g}" + lr_setting(rate), "dpo", {**dpo, "beta": beta, **lr(rate)})
                 for beta in experiment.dpo_betas for rate in learning_rates]
    settings += [("IPO", f"beta={beta:g}" + lr_setting(rate), "dpo",
                  {**dpo, "beta": beta, "loss_type": ("ipo",), **lr(rate)})
                 for beta in experiment.ipo_betas for rate in learning_rates]
    settings += [("PPO", f"kl_coef={coef:g}", "ppo", {**learned, "kl_coef": coef}) for coef in experiment.ppo_kl_coefs]
    settings += [("PPO", f"target_kl={target:g}", "ppo", {**learned, "adaptive_kl": True, "target_kl": target})
                 for target in experiment.ppo_target_kls]
    settings += [("PPO-GT", f"kl_coef={coef:g}", "ppo", {**start, "kl_coef": coef, "reward": pair_scorer_spec})
                 for coef in experiment.ppo_gt_kl_coefs]
    settings += [("Online DPO", f"beta={beta:g}", "online_dpo", {**learned, "beta": beta})
                 for beta in experiment.online_dpo_betas]
    settings += [("GRPO", f"beta={beta:g}", "grpo", {**learned, "beta": beta}) for beta in experiment.grpo_betas]
    if experiment.preferred_ft:
        settings.append(("Preferred-FT", "", "sft", start))
    if experiment.unlikelihood:
        settings.append(("Unlikelihood", f"alpha={config.unlikelihood.alpha:g}", "unlikelihood", start))

    runs = []
    for method, setting, stage, block in settings:
        seeded = schema.EXPERIMENT_METHODS[method] in experiment.seeded_methods and experiment.num_seeds > 1
        for offset in range(experiment.num_seeds if seeded else 1):
            overrides = {f"{stage}.{key}": value for key, value in block.items()}
            overrides["seed"] = config.seed + offset
            if experiment.trajectory_every:  # a checkpoint every trajectory_every steps, each kept to be evaluated
                overrides["checkpoint.every_steps"] = experiment.trajectory_every
                overrides["checkpoint.max_to_keep"] = config[stage].num_steps // experiment.trajectory_every + 2
            parts = (schema.EXPERIMENT_METHODS[method], setting.replace("=", "").replace(" ", "_"),
                     f"seed{config.seed + offset}" if seeded else "")
            name = "_".join(part for part in parts if part)
            runs.append(MethodRun(method, setting, config.seed + offset, stage, overrides, name))
    return runs


def _evaluate(config, model, sft_params, prompts, tokenizer, scorer, params):
    """`evaluation.evaluate_policy` of `params` at temperature 1 on the experiment's held-out prompts,
    with the KL to the SFT model: every policy with the same seed, so the same random numbers."""
    evaluation_config = config.evaluation
    return evaluation.evaluate_policy(
        model.graphdef, params, sft_params, prompts["prompt_ids"], prompts["prompt_lengths"], decode=tokenizer.decode,
        scorer=scorer, temperatures=[1.0], samples_per_prompt=evaluation_config.samples_per_prompt,
        max_new_tokens=evaluation_config.max_new_tokens, eos_ids=tuple(tokenizer.eos_ids), pad_id=0, seed=config.seed,
        batch_size=evaluation_config.batch_size)


def _point_of(result):
    """The trajectory point's statistics of an `evaluate_policy` result (or of a results row)."""
    at_one = result["temperatures"]["1.0"] if "temperatures" in result else result
    return {"kl": result["kl"], "kl_standard_error": result.get("kl_standard_error"), "score": at_one["score"],
            "score_std": at_one.get("score_std")}


def _trajectory(method_run, run_dir, summary, config, model, evaluate, sft_point):
    """The run's trajectory: its checkpoints at every `experiment.trajectory_every` steps and its last
    (only the last when 0) evaluated, after the SFT model's point (step 0). Cached point by point in
    <run_dir>/trajectory.json, so a rerun evaluates only what is missing; the evaluated checkpoints
    but the last are then deleted. "eval_seconds" against the stage's "train_seconds" is the
    evaluation's cost."""
    path = os.path.join(run_dir, "trajectory.json")
    saved = storage.read_json(path) if storage.exists(path) else {"points": [], "eval_seconds": 0.0}
    stage_summary = summary[method_run.stage]
    every, last = config.experiment.trajectory_every, stage_summary["steps"]
    checkpoints = checkpointing.StageCheckpoints(os.path.join(run_dir, "checkpoints", method_run.stage))
    try:
        steps = [step for step in checkpoints.all_steps() if step == last or (every and step % every == 0)]
        if last not in steps:
            raise checkpointing.CheckpointError(f"{run_dir}: the final checkpoint (step {last}) of the run is missing")
        done = {point["step"] for point in saved["points"]}
        for step in sorted(set(steps) - done):
            started = time.perf_counter()
            params = checkpoints.restore_params(model.abstract_params, step=step)
            saved["points"].append({"step": step, **_point_of(evaluate(params))})
            saved["eval_seconds"] += time.perf_counter() - started
            saved["points"].sort(key=lambda point: point["step"])
            storage.write_json(path, saved, sort_keys=False)
        for step in steps:  # evaluated: a rerun needs only the final one, so the disk holds one per run
            if step != last:
                checkpoints.delete(step)
    finally:
        checkpoints.close()
    return {"method": method_run.method, "setting": method_run.setting, "seed": method_run.seed,
            "name": method_run.name, "train_seconds": stage_summary["wall_seconds"],
            "eval_seconds": saved["eval_seconds"],
            "points": [sft_point] + saved["points"]}


def _sync(name):
    """Waits until every process got here (files process 0 writes are then there for all)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"dpo_jax.experiment: {name}")


def _row(method, setting, seed, point):
    """A results row: a policy's point (`_point_of`) under its method, setting and seed."""
    return {"method": method, "setting": setting, "seed": seed, **point}


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


def _sft_and_best_of_n(config, workdir, model, sft_params, prompts, tokenizer, mesh, reward_checkpoints, evaluate):
    """Rows of the SFT model itself (KL 0 by definition; estimated here as a check) and of Best-of-N
    against the reward model (N=<n> settings), cached in <workdir>/baselines.json."""
    path = os.path.join(workdir, "baselines.json")
    if os.path.exists(path):
        return storage.read_json(path)
    evaluation_config = config.evaluation
    rows = [_row("SFT", "", config.seed, {**_point_of(evaluate(sft_params)), "step": 0})]
    if config.experiment.best_of_n:
        reward_plan = planning.plan_model(config, mesh, scalar_head=True)
        reward_params = checkpointing.restore_params(reward_checkpoints, reward_plan.abstract_params)
        reward_scorer = scorers.RewardModelScorer(reward_plan.graphdef, reward_params, tokenizer,
                                                  max_length=config.data.max_length,
                                                  max_prompt_length=config.data.max_prompt_length,
                                                  batch_size=evaluation_config.batch_size)
        scorer = scorers.make_scorer(evaluation_config.scorer)
        for n in config.experiment.best_of_n:
            result = evaluation.best_of_n(model.graphdef, sft_params, prompts["prompt_ids"], prompts["prompt_lengths"],
                                          n=int(n), decode=tokenizer.decode, reward_scorer=reward_scorer, scorer=scorer,
                                          eos_ids=tuple(tokenizer.eos_ids), pad_id=0, seed=config.seed,
                                          batch_size=evaluation_config.batch_size,
                                          max_new_tokens=evaluation_config.max_new_tokens)
            rows.append(_row("Best-of-N", f"N={int(n)}", config.seed,
                             {"kl": result["kl"], "kl_standard_error": None, "score": result["score"],
                              "score_std": result.get("score_std"), "step": int(n)}))
    storage.write_json(path, rows, sort_keys=False)
    _sync("baselines written")
    return rows


def format_rows(rows):
    """The results as a plain-text table, for the end of a run."""
    lines = [f"{'method':<14}{'setting':<22}{'seed':>6}{'KL':>10}{'score':>10}"]
    lines += [f"{row['method']:<14}{row['setting']:<22}{row['seed']:>6}{row['kl']:>10.3f}{row['score']:>10.4f}"
              for row in rows]
    return "\n".join(lines)
