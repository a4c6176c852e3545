"""The training driver: SFT then DPO (or any chain of stages) on a device mesh, read top to bottom.

Sections: workdir / mesh / data / model and shardings / stage loop (state, steps, checkpoints,
evaluation, logging) / summary. This is the only module that wires the others together.
"""

import collections
import dataclasses
import functools
import json
import os
import signal
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dpo_jax import checkpointing, configuration, data, evaluation, fingerprints, models, ppo, reference, \
    scorers, sharding, steps
from dpo_jax.data import loader
from dpo_jax.metrics import MetricWriter, progress_bar, read_jsonl, to_python


class Halted(Exception):
    """Raised after `halt_after_steps` steps, once the checkpoint is safely written."""


class Preempted(Exception):
    """Raised after a preemption notice (SIGTERM), once the checkpoint is safely written."""


class NonFiniteError(RuntimeError):
    """Raised after `train.max_nonfinite_steps` steps in a row had a non-finite loss or gradient."""


_SIGTERM_RECEIVED = []


def _on_sigterm(signum, frame):
    del signum, frame
    _SIGTERM_RECEIVED.append(time.time())


def _preempted(checkpoints, step):
    """True once a preemption notice arrived: SIGTERM in a single process; across processes,
    JAX's preemption service agrees on the step, so every process saves the same one."""
    if jax.process_count() > 1:
        return checkpoints.reached_preemption(step)
    return bool(_SIGTERM_RECEIVED)


class _LaggedMetrics:
    """Reads step metrics `LAG` steps after their step was dispatched: writes the logged ones,
    counts steps whose update was skipped as non-finite, and stops a run that keeps failing."""

    LAG = 2

    def __init__(self, stage, writer, bar, max_nonfinite_steps):
        self.stage, self.writer, self.bar, self.max_nonfinite_steps = stage, writer, bar, max_nonfinite_steps
        self.pending = collections.deque()
        self.nonfinite_in_a_row = self.nonfinite_total = 0
        self.window_start, self.window_tokens = time.perf_counter(), 0

    def push(self, step, metrics, example_ids, tokens, *, log):
        self.pending.append((step, metrics, example_ids, tokens, log))
        while len(self.pending) > self.LAG:
            self._read(*self.pending.popleft())

    def drain(self):
        while self.pending:
            self._read(*self.pending.popleft())

    def _read(self, step, metrics, example_ids, tokens, log):
        metrics = to_python(metrics)
        self.window_tokens += tokens
        if metrics.pop("nonfinite"):
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            ids = np.asarray(example_ids).tolist()
            logging.warning("%s step %d: non-finite loss or gradient, update skipped (examples %s)",
                            self.stage, step, ids)
            self.writer.write(self.stage, "nonfinite", step, {"loss": metrics["loss"]}, example_ids=ids)
            if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
                raise NonFiniteError(
                    f"{self.stage}: {self.nonfinite_in_a_row} steps in a row up to step {step} had a non-finite "
                    f"loss or gradient (train.max_nonfinite_steps={self.max_nonfinite_steps}); their updates "
                    f"were skipped, so the checkpoints hold the last good parameters. Last batch: examples {ids}")
        else:
            self.nonfinite_in_a_row = 0
        if log:
            now = time.perf_counter()
            metrics["tokens_per_sec"] = self.window_tokens / max(now - self.window_start, 1e-9)
            self.window_start, self.window_tokens = now, 0
            self.writer.write(self.stage, "train", step, metrics)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}")


def _read_summary(workdir):
    path = os.path.join(workdir, "summary.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path, value):
    if jax.process_index() == 0:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2, sort_keys=True)
        os.replace(path + ".tmp", path)


def _eval_record(workdir, stage, step=None):
    """Eval metrics of a stage at `step` (default: the last) from metrics.jsonl, or None."""
    path = os.path.join(workdir, "metrics.jsonl")
    records = [r for r in read_jsonl(path) if r["stage"] == stage and r["split"] == "eval"
               and step in (None, r["step"])] if os.path.exists(path) else []
    return {k: v for k, v in records[-1].items() if k not in ("stage", "split", "step")} if records else None


def run(config, workdir, *, halt_after_steps=None):
    """Runs `config.stages` in `workdir`, resuming from its checkpoints; returns the summary dict.

    `halt_after_steps`: stop (raising `Halted`) after this many optimizer steps in this process,
    once a checkpoint of that step is written, e.g. to split a run over time-limited jobs.
    """
    # ----------------------------------------------------------------------------- workdir
    configuration.validate(config)
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_size(config.train.global_batch_size // config.train.grad_accum_steps, mesh,
                              "config.train.global_batch_size / config.train.grad_accum_steps")
    sharding.check_batch_size(config.eval.batch_size, mesh, "config.eval.batch_size")
    if jax.process_index() == 0:
        configuration.bind_workdir(config, workdir)
    logging.info("Mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())

    # ----------------------------------------------------------------------------- data
    task = data.load_task(config)
    if task.num_truncated:
        logging.warning("%d pairs were truncated to data.max_length=%d", task.num_truncated, config.data.max_length)

    # ----------------------------------------------------------------------------- model and shardings
    model = plan_model(config, mesh)
    # Final parameters of this run's stages: the last policy (what the next policy stage starts
    # from) and the reward model.
    results = {"policy": None, "reward": None}
    last_policy_stage = None  # (its plan, the results it started from): where a sample evaluation's reference is
    summary = _read_summary(workdir)
    writer = MetricWriter(workdir)
    budget = [halt_after_steps]  # steps this process may still take (None: unbounded)
    _SIGTERM_RECEIVED.clear()
    # Across processes JAX's preemption service handles SIGTERM; a single process catches it here.
    previous_handler = signal.signal(signal.SIGTERM, _on_sigterm) if jax.process_count() == 1 else None
    try:
        rollout = _rollout_options(config, task)
        for stage in config.stages:
            plan = plan_stage(stage, config, mesh, model, **(rollout if stage == "ppo" else {}))
            final, summary[stage] = _run_stage(plan, config, workdir, mesh, task, model, results,
                                               summary.get(stage), writer, budget)
            if stage == "reward":
                results["reward"] = final
            else:
                last_policy_stage = (plan, dict(results))
                results["policy"] = final["policy"] if stage == "ppo" else final
            _write_json(os.path.join(workdir, "summary.json"), summary)
        if (config.evaluation.scorer or config.evaluation.judge) and "evaluation" not in summary:
            summary["evaluation"] = _evaluate_samples(config, workdir, task, model, results, last_policy_stage)
            _write_json(os.path.join(workdir, "summary.json"), summary)
    finally:
        writer.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    return summary


def _restore_or(init_from, abstract_params, fallback):
    """The params of checkpoint directory `init_from` when given, else `fallback()`."""
    return checkpointing.restore_params(init_from, abstract_params) if init_from else fallback()


def _initial_params(plan, config, results, model):
    """A stage's starting parameters: its `init_from` checkpoint, else this run's earlier stages
    (the last policy; PPO: also the reward model), else the model init.

    reward: the policy's decoder under a fresh scalar head. ppo: {"policy", "value", "reward"}; the
    value model starts as the reward model (as in TRL), or as the policy's decoder with a fresh head
    when the reward is a ground-truth scorer and there is no reward model.
    """
    stage = plan.name
    decoder_config = models.decoder_config(config.model)

    def policy():
        if results["policy"] is not None:
            return results["policy"]
        return models.init_params(config.model, seed=config.seed, shardings=model.param_shardings)

    if stage == "reward":
        decoder = _restore_or(config.reward.init_from, model.abstract_params, policy)
        return models.init_scalar_params(decoder_config, decoder, seed=config.seed,
                                         shardings=plan.param_plan.param_shardings)
    if stage != "ppo":
        return _restore_or(config[stage].init_from, model.abstract_params, policy)
    policy_params = _restore_or(config.ppo.init_from, model.abstract_params, policy)
    scalar_plan = plan.param_plan.abstract_params["value"]
    if config.ppo.reward != "model":
        value = models.init_scalar_params(decoder_config, policy_params, seed=config.seed,
                                          shardings=plan.param_plan.param_shardings["value"])
        return {"policy": policy_params, "value": value, "reward": None}

    # Validation made sure there is one: reward_from, or this run's reward stage.
    reward = _restore_or(config.ppo.reward_from, scalar_plan, lambda: results["reward"])
    # The value model trains; the reward model stays frozen: separate buffers.
    value = jax.tree.map(lambda x: jnp.array(x, copy=True), reward)
    return {"policy": policy_params, "value": value, "reward": reward}


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    graphdef: Any                 # the Flax graph of the decoder (static)
    abstract_params: Any          # ShapeDtypeStructs carrying their shardings
    param_shardings: Any          # NamedShardings from the logical axis rules


def plan_model(config, mesh, *, scalar_head=False):
    """The model's graph and its parameters' shapes and shardings on `mesh`, nothing allocated.

    scalar_head: the reward / value model (the decoder's trunk and a scalar head) instead of the decoder.
    """
    if scalar_head:
        graphdef, abstract_params, logical_specs = models.abstract_scalar_model(models.decoder_config(config.model))
    else:
        graphdef, abstract_params, logical_specs = models.abstract_model(config.model)
    param_shardings = sharding.param_shardings(abstract_params, logical_specs, mesh)
    return ModelPlan(graphdef, checkpointing.with_shardings(abstract_params, param_shardings), param_shardings)


@dataclasses.dataclass(frozen=True)
class StagePlan:
    name: str
    optimizer: Any
    schedule: Any
    loss_fn: Optional[Callable]   # (params, ref_params, batch, rng) -> (loss, (metrics, weight)); None for PPO
    step_fn: Callable             # (state, batch) -> (state, metrics): the train step to jit
    eval_fn: Callable             # (params, ref_params, batch) -> metrics
    reference_mode: Optional[str] # None (no reference) | live | precomputed | lora | ppo
    param_plan: ModelPlan         # the stage's params: the decoder; reward: the scalar model; ppo: {policy, value}
    trainable: Any                # bools shaped like the params: what the optimizer updates (LoRA: adapters)
    init_state: Callable          # starting params -> TrainState at step 0
    abstract_state: Any
    state_shardings: Any


def _rollout_options(config, task):
    """What a PPO stage needs beyond the config: the end-of-response ids and, for a ground-truth
    reward (PPO-GT), the host function that decodes rollouts and scores them."""
    if "ppo" not in config.stages:
        return {}
    tokenizer = task.tokenizer
    eos_ids = tuple(tokenizer.eos_ids) if tokenizer is not None else (data.synthetic.EOS,)
    host_reward_fn = None
    if config.ppo.reward != "model":
        if tokenizer is None:
            raise ValueError(f"config.ppo.reward={config.ppo.reward!r} scores text, but config.data has no tokenizer")
        host_reward_fn = _host_reward_fn(scorers.make_scorer(config.ppo.reward), tokenizer.decode)
    return {"eos_ids": eos_ids, "host_reward_fn": host_reward_fn}


def _host_reward_fn(scorer, decode):
    """Token arrays of rollouts -> scores of their texts, on the host (PPO calls it via jax.pure_callback)."""
    def texts(ids, lengths):
        return [decode(row[:length].tolist()) for row, length in zip(np.asarray(ids), np.asarray(lengths))]

    def score(prompt_ids, prompt_lengths, response_ids, response_lengths):
        return np.asarray(scorer(texts(prompt_ids, prompt_lengths), texts(response_ids, response_lengths)),
                          np.float32)
    return score


def plan_stage(stage, config, mesh, model, *, eos_ids=(), host_reward_fn=None):
    """Everything a stage compiles: optimizer, step and eval functions, and the train state's shapes
    and shardings. `eos_ids` and `host_reward_fn` are PPO's (see `_rollout_options`)."""
    replicated = sharding.replicated(mesh)
    if stage in ("reward", "ppo"):
        scalar = plan_model(config, mesh, scalar_head=True)
    if stage == "reward":
        param_plan = scalar
    elif stage == "ppo":
        param_plan = ModelPlan(None, {"policy": model.abstract_params, "value": scalar.abstract_params},
                               {"policy": model.param_shardings, "value": scalar.param_shardings})
    else:
        param_plan = model
    trainable = models.trainable_mask(param_plan.abstract_params)
    # PPO's optimizer updates several times per step: its schedule counts updates.
    schedule_config = ppo.optimizer_schedule_config(config.ppo) if stage == "ppo" else config[stage]
    optimizer, schedule = steps.make_optimizer(config.train, schedule_config, trainable)
    opt_state_shardings = lambda abstract_state: sharding.opt_state_shardings(
        optimizer, abstract_state.opt_state, param_plan.param_shardings, mesh)

    if stage == "ppo":
        with_reward_model = config.ppo.reward == "model"
        rollout = dict(graphdef=model.graphdef, value_graphdef=scalar.graphdef, ppo_config=config.ppo,
                       eos_ids=eos_ids, pad_id=0, host_reward_fn=host_reward_fn)
        step_fn = functools.partial(ppo.ppo_step, optimizer=optimizer, schedule=schedule, trainable=trainable,
                                    micro_batches=config.train.grad_accum_steps, **rollout)
        eval_fn = functools.partial(ppo.ppo_eval_step, seed=config.seed, **rollout)
        init_state = lambda start: ppo.init_ppo_state(start["policy"], start["value"], start["reward"], optimizer,
                                                      seed=config.seed, kl_coef=config.ppo.kl_coef)
        abstract_start = {"policy": model.abstract_params, "value": scalar.abstract_params,
                          "reward": scalar.abstract_params if with_reward_model else None}
        abstract_state = jax.eval_shape(init_state, abstract_start)
        ref_shardings = {"reference": model.param_shardings,
                         "reward": scalar.param_shardings if with_reward_model else None}
        state_shardings = steps.TrainState(
            step=replicated, params=param_plan.param_shardings, opt_state=opt_state_shardings(abstract_state),
            rng=replicated, ref_params=ref_shardings, stage_state=jax.tree.map(lambda _: replicated,
                                                                               abstract_state.stage_state))
        return StagePlan(stage, optimizer, schedule, None, step_fn, eval_fn, "ppo", param_plan, trainable,
                         init_state, checkpointing.with_shardings(abstract_state, state_shardings), state_shardings)

    loss_fn, eval_fn = steps.stage_functions(stage, param_plan.graphdef, config)
    reference_mode = config.dpo.reference if stage == "dpo" else None
    live_reference = reference_mode == "live"
    reference_update = None
    if live_reference and config.dpo.reference_update_every:
        reference_update = (config.dpo.reference_update_every, config.dpo.reference_update_alpha)
    step_fn = functools.partial(steps.train_step, loss_fn=loss_fn, optimizer=optimizer, schedule=schedule,
                                micro_batches=config.train.grad_accum_steps, reference_update=reference_update,
                                trainable=trainable)
    init_state = functools.partial(steps.init_state, optimizer=optimizer, seed=config.seed,
                                   live_reference=live_reference, reference_dtype=config.dpo.reference_dtype or None)
    abstract_state = jax.eval_shape(init_state, param_plan.abstract_params)
    state_shardings = steps.TrainState(
        step=replicated, params=param_plan.param_shardings, opt_state=opt_state_shardings(abstract_state),
        rng=replicated, ref_params=param_plan.param_shardings if live_reference else None)
    return StagePlan(stage, optimizer, schedule, loss_fn, step_fn, eval_fn, reference_mode, param_plan, trainable,
                     init_state, checkpointing.with_shardings(abstract_state, state_shardings), state_shardings)


# The arrays each stage trains and evaluates on (Task fields, "<name>_train" / "<name>_eval").
STAGE_DATA = {"pretrain": "pretrain", "sft": "sft", "reward": "dpo", "unlikelihood": "dpo", "dpo": "dpo",
              "ppo": "prompts"}


def _run_stage(plan, config, workdir, mesh, task, model, results, done, writer, budget):
    """Trains one stage (or finds it finished); returns its final params and its summary entry."""
    stage, stage_config = plan.name, config[plan.name]
    data_name = STAGE_DATA[stage]
    train_arrays, eval_arrays = getattr(task, f"{data_name}_train"), getattr(task, f"{data_name}_eval")
    replicated = sharding.replicated(mesh)

    checkpoints = checkpointing.StageCheckpoints(
        os.path.join(workdir, "checkpoints", stage), max_to_keep=config.checkpoint.max_to_keep,
        save_every_steps=config.checkpoint.every_steps, save_every_minutes=config.checkpoint.every_minutes,
        best_metric=config.checkpoint.best_metric, best_mode=config.checkpoint.best_mode)
    latest = checkpoints.latest_step()
    if done is not None and latest == stage_config.num_steps:  # finished in an earlier invocation
        params = checkpoints.restore_params(plan.param_plan.abstract_params)
        checkpoints.close()
        return params, done

    # A precomputed reference is the stage's starting point, rebuilt on resume to find its cached
    # log-probs; training never holds it.
    start_params = None
    if latest is None or plan.reference_mode == "precomputed":
        start_params = _initial_params(plan, config, results, model)
    if latest is None and plan.reference_mode == "lora":
        # Adapters off must give this stage's starting model (e.g. the LoRA-SFT result), not the base.
        start_params = models.fold_adapters(config.model, start_params, seed=config.seed,
                                            shardings=model.param_shardings)
    if plan.reference_mode == "precomputed":
        splits = reference.with_reference_logps(
            {"train": train_arrays, "eval": eval_arrays}, start_params, graphdef=model.graphdef, mesh=mesh,
            param_shardings=model.param_shardings, batch_size=config.eval.batch_size,
            cache_dir=config.dpo.reference_cache_dir or os.path.join(workdir, "reference_logps"))
        train_arrays, eval_arrays = splits["train"], splits["eval"]
    # Row indices travel with each batch (host side only), to name the examples of a bad step.
    train_arrays = {**train_arrays, "example_id": np.arange(len(next(iter(train_arrays.values()))))}

    resumed = latest is not None
    if resumed:
        state = checkpoints.restore(plan.abstract_state)
        logging.info("%s: resumed from step %d of %s", stage, int(state.step), checkpoints.directory)
        writer.drop_after(stage, int(state.step))
    else:
        writer.drop_after(stage, -1)  # what a run killed before its first checkpoint wrote
        state = jax.jit(plan.init_state, out_shardings=plan.state_shardings)(start_params)
    del start_params
    start_step = int(state.step)

    # ------------------------------------------------------------------------- compiled steps
    batch_sharding = sharding.batch_sharding(mesh)
    train_step = jax.jit(plan.step_fn, in_shardings=(plan.state_shardings, batch_sharding),
                         out_shardings=(plan.state_shardings, replicated), donate_argnums=0)
    eval_step = jax.jit(plan.eval_fn, in_shardings=(plan.param_plan.param_shardings, plan.state_shardings.ref_params,
                                                    batch_sharding), out_shardings=replicated)
    train_batches = loader.train_batches(train_arrays, global_batch_size=config.train.global_batch_size,
                                         seed=config.seed, mixture=getattr(task, f"{data_name}_mixture", None))
    eval_batches = loader.eval_batches(eval_arrays, global_batch_size=config.eval.batch_size)

    def evaluate(step):
        totals = None
        for local_batch in eval_batches:
            metrics = eval_step(state.params, state.ref_params, sharding.global_batch(local_batch, mesh))
            totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
        metrics = to_python(jax.tree.map(lambda total: total / len(eval_batches), totals))
        writer.write(stage, "eval", step, metrics)
        return metrics

    # ------------------------------------------------------------------------- loop
    num_steps = stage_config.num_steps
    eval_metrics = None if resumed else evaluate(0)  # a resumed run recorded its step-0 eval already
    bar = progress_bar(stage, start_step, num_steps)
    # Step metrics are read a few steps late, so the host never waits for the device.
    lagged = _LaggedMetrics(stage, writer, bar, config.train.max_nonfinite_steps)
    started, tokens = time.perf_counter(), 0

    def stop(exception):
        """Saves the current step and raises; the checkpoint is complete before the process exits."""
        lagged.drain()
        if checkpoints.latest_step() != int(state.step):
            checkpoints.save(int(state.step), state, force=True)
        raise exception

    try:
        for step in range(start_step, num_steps):
            if budget[0] == 0:
                stop(Halted(f"{stage}: halted at step {step}; rerun the same command to resume"))
            local_batch = dict(train_batches[step])
            example_ids = local_batch.pop("example_id")
            batch_tokens = jax.process_count() * int(sum(
                np.count_nonzero(value) for key, value in local_batch.items() if key.endswith("segment_ids")))
            state, metrics = train_step(state, sharding.global_batch(local_batch, mesh))
            tokens += batch_tokens
            if budget[0] is not None:
                budget[0] -= 1
            completed = step + 1
            bar.update(1)
            log = completed % config.train.log_every_steps == 0 or completed == num_steps
            lagged.push(completed, metrics, example_ids, batch_tokens, log=log)
            is_eval_step = completed % config.eval.every_steps == 0 or completed == num_steps
            if is_eval_step:
                lagged.drain()  # evaluation waits for the step anyway; keeps records in step order
                eval_metrics = evaluate(completed)
            with_best = bool(is_eval_step and config.checkpoint.best_metric)
            force = completed == num_steps or with_best
            if force or checkpoints.should_save(completed):
                # A checkpoint of step s comes with every record up to s, so that a resumed run
                # rewrites exactly the records after its checkpoint.
                lagged.drain()
                checkpoints.save(completed, state, metrics=eval_metrics if with_best else None, force=force)
            if _preempted(checkpoints, completed):
                stop(Preempted(f"{stage}: preempted; saved step {completed}, rerun the same command to resume"))
        lagged.drain()
    finally:
        bar.close()
        checkpoints.wait()
        checkpoints.close()
    wall = time.perf_counter() - started

    # ------------------------------------------------------------------------- summary
    if eval_metrics is None:  # resumed after the final step: its eval is in metrics.jsonl
        eval_metrics = _eval_record(workdir, stage)
    return state.params, {
        "steps": num_steps,
        "eval_before": _eval_record(workdir, stage, step=0),
        "eval": eval_metrics,
        "wall_seconds": wall,  # of the invocation that finished the stage
        "tokens_per_sec": tokens / wall if tokens else None,
        "params_fingerprint": fingerprints.params_fingerprint(state.params),
        "nonfinite_steps": lagged.nonfinite_total,  # skipped updates in the invocation that finished the stage
    }


def _evaluate_samples(config, workdir, task, model, results, last_policy_stage):
    """Samples from the final policy on held-out prompts, scored by `config.evaluation.scorer` and judged
    against the reference responses by `config.evaluation.judge`, with the sequence KL to the last policy
    stage's starting point (e.g. the SFT model for DPO or PPO)."""
    if last_policy_stage is None:
        raise ValueError("config.evaluation.scorer / judge evaluate a policy, but config.stages trains none")
    plan, results_before = last_policy_stage
    reference_params = _initial_params(plan, config, results_before, model)
    if plan.name == "ppo":
        reference_params = reference_params["policy"]
    evaluation_config = config.evaluation
    prompts = {key: value[:evaluation_config.num_prompts] for key, value in task.prompts_eval.items()}
    tokenizer = task.tokenizer
    judge = scorers.make_judge(evaluation_config.judge) if evaluation_config.judge else None
    result = evaluation.evaluate_policy(
        model.graphdef, results["policy"], reference_params, prompts["prompt_ids"], prompts["prompt_lengths"],
        decode=tokenizer.decode,
        scorer=scorers.make_scorer(evaluation_config.scorer) if evaluation_config.scorer else None,
        temperatures=[float(t) for t in evaluation_config.temperatures.split(",")],
        samples_per_prompt=evaluation_config.samples_per_prompt, max_new_tokens=evaluation_config.max_new_tokens,
        eos_ids=tuple(tokenizer.eos_ids), pad_id=0, seed=config.seed, batch_size=evaluation_config.batch_size,
        judge=judge, reference_responses=[tokenizer.decode(ids[:length].tolist()) for ids, length in
                                          zip(prompts["reference_ids"], prompts["reference_lengths"])])
    logging.info("sample evaluation: %s", result)
    if jax.process_index() == 0:  # results.json / results.md, and with a judge win_rates.png
        rows = evaluation.evaluation_rows(plan.name, result)
        evaluation.write_results(rows, workdir)
        if judge is not None:
            evaluation.plot_win_rates(rows, os.path.join(workdir, "win_rates.png"))
    return result


def format_report(summary):
    """The end-of-run table: per stage, the final eval numbers (for DPO, before and after); then the
    sample evaluation, if any."""
    lines = []
    for stage, result in summary.items():
        if stage == "evaluation":
            continue
        final = result.get("eval") or {}
        lines.append(f"{stage}: {result['steps']} steps, {result['wall_seconds']:.1f} s, "
                     f"fingerprint {result['params_fingerprint'][:12]}")
        if stage == "dpo" and result.get("eval_before"):
            before = result["eval_before"]
            lines.append(f"  {'held-out':<22}{'before DPO':>12}{'after DPO':>12}")
            for key, name in (("rewards/accuracies", "preference accuracy"), ("rewards/margins", "reward margin"),
                              ("kl", "KL to reference")):
                if key in final:  # no KL without a reference model (dpo.reference='precomputed')
                    lines.append(f"  {name:<22}{before[key]:>12.4f}{final[key]:>12.4f}")
        elif final:
            lines.append("  " + ", ".join(f"{key}={value:.4f}" for key, value in sorted(final.items())))
    if "evaluation" in summary:
        evaluation_result = summary["evaluation"]
        kl = f", KL to reference {evaluation_result['kl']:.4f}" if "kl" in evaluation_result else ""
        lines.append(f"samples of the final policy{kl}")
        for temperature, result in sorted(evaluation_result["temperatures"].items(), key=lambda item: float(item[0])):
            numbers = ", ".join(f"{key} {result[key]:.4f}" for key in ("score", "win_rate") if key in result)
            lines.append(f"  temperature {temperature}: {numbers}")
    return "\n".join(lines)
