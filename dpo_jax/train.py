"""The training driver: SFT then DPO (or any chain of stages) on a device mesh, read top to bottom.

Sections: workdir / mesh / data / model and shardings / stage loop (state, steps, checkpoints,
evaluation, logging) / summary. It names no stage: each stage of `config.stages` is a
`dpo_jax.stages.Stage`, whose plan (`dpo_jax.planning`) says what to compile and whose hooks say
where its parameters start and what it hands to the next stage.
"""

import collections
import json
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from dpo_jax import checkpointing, evaluation, fingerprints, lock, planning, scorers, sharding, stages, storage
from dpo_jax.configs import validation
from dpo_jax.data import loader
from dpo_jax.data import task as data_task
from dpo_jax.metrics import METRICS_LAG, MetricWriter, progress_bar, to_python
from dpo_jax.workdir import check_workdir, make_workdir, write_config


class Halted(Exception):
    """Raised after `halt_after_steps` steps, once the checkpoint is safely written."""


class Preempted(Exception):
    """Raised after a preemption notice (SIGTERM), once the checkpoint is safely written."""


class NonFiniteError(RuntimeError):
    """Raised after `train.max_nonfinite_steps` steps in a row had a non-finite loss, gradient or update."""


_SIGTERM_RECEIVED = []
_IN_STAGE_LOOP = []  # non-empty while a stage's loop runs, which saves a checkpoint before it stops


def _on_sigterm(signum, frame):
    """A preemption notice: the stage loop saves its step and stops; elsewhere (data preparation,
    compiling, between stages) there is nothing unsaved, so the run stops at once."""
    del signum, frame
    _SIGTERM_RECEIVED.append(time.time())
    if not _IN_STAGE_LOOP:
        raise Preempted("preempted (SIGTERM) outside a stage's training loop; every finished step is saved, "
                        "rerun the same command to resume")


def _preempted(checkpoints, step):
    """True once a preemption notice arrived: SIGTERM in a single process; across processes,
    JAX's preemption service agrees on the step, so every process saves the same one."""
    if jax.process_count() > 1:
        return checkpoints.reached_preemption(step)
    return bool(_SIGTERM_RECEIVED)


class _LaggedMetrics:
    """Reads step metrics `METRICS_LAG` steps after their step was dispatched: writes the logged ones,
    counts steps whose update was skipped as non-finite, and stops a run that keeps failing.

    `num_tokens` (as TRL logs it) counts the tokens the stage has trained on, from `tokens_before`
    (those of the steps before this invocation's first)."""

    def __init__(self, stage, writer, bar, max_nonfinite_steps, tokens_before=0):
        self.stage, self.writer, self.bar, self.max_nonfinite_steps = stage, writer, bar, max_nonfinite_steps
        self.pending = collections.deque()
        self.nonfinite_in_a_row = 0
        self.window_start, self.window_tokens = time.perf_counter(), 0
        self.num_tokens = tokens_before

    def push(self, step, metrics, example_ids, tokens, *, log):
        self.pending.append((step, metrics, example_ids, tokens, log))
        while len(self.pending) > METRICS_LAG:
            self._read(*self.pending.popleft())

    def drain(self):
        while self.pending:
            self._read(*self.pending.popleft())

    def _read(self, step, metrics, example_ids, tokens, log):
        metrics = to_python(metrics)
        self.window_tokens += tokens
        self.num_tokens += tokens
        if metrics.pop("nonfinite"):
            self.nonfinite_in_a_row += 1
            ids = np.asarray(example_ids).tolist()
            logging.warning("%s step %d: non-finite loss, gradient or update, update skipped (examples %s)",
                            self.stage, step, ids)
            self.writer.write(self.stage, "nonfinite", step, {"loss": metrics["loss"]}, example_ids=ids)
            if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
                raise NonFiniteError(
                    f"{self.stage}: {self.nonfinite_in_a_row} steps in a row up to step {step} had a non-finite "
                    f"loss, gradient or update (train.max_nonfinite_steps={self.max_nonfinite_steps}); their updates "
                    f"were skipped, so the checkpoints hold the last good parameters. Last batch: examples {ids}")
        else:
            self.nonfinite_in_a_row = 0
        if log:
            now = time.perf_counter()
            metrics["tokens_per_sec"] = self.window_tokens / max(now - self.window_start, 1e-9)
            metrics["num_tokens"] = float(self.num_tokens)
            self.window_start, self.window_tokens = now, 0
            self.writer.write(self.stage, "train", step, metrics)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}")


def _batch_tokens(local_batch):
    """Tokens of a global batch (not padding), from this process's share."""
    return jax.process_count() * int(sum(np.count_nonzero(value) for key, value in local_batch.items()
                                         if key.endswith("segment_ids")))


def _tokens_before(writer, stage, start_step, train_batches):
    """The stage's tokens trained on before `start_step`: the last logged `num_tokens` at or before it,
    plus the batches of the steps after that record."""
    logged = [r for r in writer.records() if r["stage"] == stage and r["split"] == "train" and
              r["step"] <= start_step and "num_tokens" in r]
    step, tokens = (logged[-1]["step"], int(logged[-1]["num_tokens"])) if logged else (0, 0)
    return tokens + sum(_batch_tokens(train_batches[s]) for s in range(step, start_step))


def _read_summary(workdir):
    path = storage.join(workdir, "summary.json")
    return storage.read_json(path) if storage.exists(path) else {}


def _eval_record(writer, stage, step=None):
    """Eval metrics of a stage at `step` (default: the last) from the run's records, or None."""
    records = [r for r in writer.records() if r["stage"] == stage and r["split"] == "eval"
               and step in (None, r["step"])]
    return {k: v for k, v in records[-1].items() if k not in ("stage", "split", "step")} if records else None


def run(config, workdir, *, halt_after_steps=None):
    """Runs `config.stages` in `workdir`, resuming from its checkpoints; returns the summary dict.

    `halt_after_steps`: stop (raising `Halted`) after this many optimizer steps in this process,
    once a checkpoint of that step is written, e.g. to split a run over time-limited jobs.
    """
    _SIGTERM_RECEIVED.clear()
    # Across processes JAX's preemption service handles SIGTERM; a single process catches it here.
    previous_handler = signal.signal(signal.SIGTERM, _on_sigterm) if jax.process_count() == 1 else None
    try:
        validation.validate(config)
        make_workdir(workdir)
        with lock.hold(workdir):  # from before the workdir is read until the run ends
            return _run(config, workdir, halt_after_steps)
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def _run(config, workdir, halt_after_steps):
    # ----------------------------------------------------------------------------- workdir
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_size(config.train.global_batch_size // config.train.grad_accum_steps, mesh,
                              "config.train.global_batch_size / config.train.grad_accum_steps")
    sharding.check_batch_size(config.eval.batch_size, mesh, "config.eval.batch_size")
    check_workdir(config, workdir)
    logging.info("Mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())

    # ----------------------------------------------------------------------------- data
    task = data_task.load_task(config)
    if task.num_truncated:
        logging.warning("%d examples were truncated to data.max_length=%d", task.num_truncated,
                        config.data.max_length)
    write_config(config, workdir)  # the run can run: the workdir is its

    # ----------------------------------------------------------------------------- model and shardings
    model = planning.plan_model(config, mesh)
    # What this run's stages produced so far (`Stage.outputs`): the last policy, which the next policy
    # stage starts from, and the reward model.
    results = {}
    last_policy_stage = None  # (stage, plan, the results it started from): where a sample evaluation's reference is
    summary = _read_summary(workdir)
    # Examples per dataset and split, bad ones skipped by reason, truncated ones.
    summary["data"] = json.loads(json.dumps(task.report, default=lambda value: np.asarray(value).tolist()))
    writer = MetricWriter(workdir)
    budget = [halt_after_steps]  # steps this process may still take (None: unbounded)
    try:
        for name in config.stages:
            stage = stages.STAGES[name]
            plan = stage.plan(config, mesh, model, task)
            done = summary.get(name)
            final, summary[name] = _run_stage(stage, plan, config, workdir, mesh, task, model, results, done,
                                              writer, budget)
            if summary[name] is not done:  # trained in this invocation: what was evaluated after it is stale
                summary.pop("evaluation", None)
            outputs = stage.outputs(final)
            if "policy" in outputs:
                last_policy_stage = (stage, plan, dict(results))
            results.update(outputs)
            storage.write_json(storage.join(workdir, "summary.json"), summary)
        # In the order of config.stages, for the report (summary.json sorts its keys).
        summary = {**{name: summary[name] for name in config.stages}, **summary}
        if (config.evaluation.scorer or config.evaluation.judge) and "evaluation" not in summary:
            summary["evaluation"] = _evaluate_samples(config, workdir, task, model, results, last_policy_stage)
            storage.write_json(storage.join(workdir, "summary.json"), summary)
    finally:
        writer.close()
    return summary


def _run_stage(stage, plan, config, workdir, mesh, task, model, results, done, writer, budget):
    """Trains one stage (or finds it finished); returns its final params and its summary entry."""
    name, stage_config = stage.name, config[stage.name]
    train_arrays, eval_arrays, mixture = task.arrays(stage.data)

    num_steps = stage_config.num_steps
    open_checkpoints = lambda: checkpointing.StageCheckpoints(
        storage.join(workdir, "checkpoints", name), max_to_keep=config.checkpoint.max_to_keep,
        save_every_steps=config.checkpoint.every_steps, save_every_minutes=config.checkpoint.every_minutes,
        best_metric=config.checkpoint.best_metric, best_mode=config.checkpoint.best_mode)
    checkpoints = open_checkpoints()
    latest = checkpoints.latest_step()
    if latest is not None and latest > num_steps:
        checkpoints.close()
        raise ValueError(f"config.{name}.num_steps={num_steps} is below step {latest}, saved in "
                         f"{checkpoints.directory}: a stage cannot be shortened. Set num_steps >= {latest}, or use "
                         f"a new --workdir.")
    # What the stage starts from, the earlier stages' outputs, is recorded with each of its checkpoints;
    # checkpoints trained from something else (an earlier stage trained again) are set aside.
    start = fingerprints.tree_digest(results)
    recorded = checkpoints.recorded_start()
    if recorded not in (None, start):
        checkpoints.close()
        _set_aside(storage.join(workdir, "checkpoints", name), workdir, name)
        checkpoints, latest, done = open_checkpoints(), None, None
    if done is not None and latest == num_steps:  # finished in an earlier invocation
        params = checkpoints.restore_params(plan.param_plan.abstract_params)
        if checkpoints.restored_step == num_steps:
            checkpoints.close()
            return params, done
        del params  # its final checkpoint did not restore: train again from the one that did
        latest = checkpoints.latest_step()

    # Data derived from the starting point (a precomputed reference) needs it on resume too;
    # training never holds it.
    start_params = None
    if latest is None or plan.prepare_data is not None:
        start_params = stage.initial_params(config, model, plan, results)
    if plan.prepare_data is not None:
        splits = plan.prepare_data({"train": train_arrays, "eval": eval_arrays}, start_params, workdir)
        train_arrays, eval_arrays = splits["train"], splits["eval"]
    # Row indices travel with each batch (host side only), to name the examples of a bad step.
    train_arrays = {**train_arrays, "example_id": np.arange(len(next(iter(train_arrays.values()))))}

    resumed = latest is not None
    if resumed:
        state = checkpoints.restore(plan.abstract_state)
        logging.info("%s: resumed from step %d of %s", name, int(state.step), checkpoints.directory)
        writer.drop_after(name, int(state.step))
    else:
        writer.drop_after(name, -1)  # what a run killed before its first checkpoint wrote
        state = planning.init_state(plan, start_params)
    del start_params
    start_step = int(state.step)

    # ------------------------------------------------------------------------- compiled steps
    train_step = planning.jit_train_step(plan, mesh)
    eval_step = planning.jit_eval_step(plan, mesh)
    train_batches = loader.train_batches(train_arrays, global_batch_size=config.train.global_batch_size,
                                         seed=config.seed, mixture=mixture)
    eval_batches = loader.eval_batches(eval_arrays, global_batch_size=config.eval.batch_size)

    def evaluate(step):
        totals = None
        for local_batch in eval_batches:
            metrics = eval_step(state.params, state.ref_params, sharding.global_batch(local_batch, mesh))
            totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
        metrics = to_python(jax.tree.map(lambda total: total / len(eval_batches), totals))
        best_metric = config.checkpoint.best_metric
        if best_metric and best_metric not in metrics:  # before any checkpoint is saved with it
            raise ValueError(f"config.checkpoint.best_metric={best_metric!r} is not an eval metric of stage {name} "
                             f"(it has {', '.join(sorted(metrics))})")
        writer.write(name, "eval", step, metrics)
        return metrics

    # ------------------------------------------------------------------------- loop
    eval_metrics = None if resumed else evaluate(0)  # a resumed run recorded its step-0 eval already
    bar = progress_bar(name, start_step, num_steps)
    # Step metrics are read a few steps late, so the host never waits for the device.
    lagged = _LaggedMetrics(name, writer, bar, config.train.max_nonfinite_steps,
                            tokens_before=_tokens_before(writer, name, start_step, train_batches))
    started, tokens = time.perf_counter(), 0

    def stop(exception):
        """Saves the current step and raises; the checkpoint is complete before the process exits."""
        lagged.drain()
        writer.flush()
        if checkpoints.latest_step() != int(state.step):
            checkpoints.save(int(state.step), state, force=True, start=start)
        raise exception

    _IN_STAGE_LOOP.append(name)
    try:
        if _SIGTERM_RECEIVED:  # the handler's exception was swallowed (raised inside a gc or __del__ callback)
            raise Preempted(f"{name}: preempted before its first step; rerun the same command to resume")
        for step in range(start_step, num_steps):
            if budget[0] == 0:
                stop(Halted(f"{name}: halted at step {step}; rerun the same command to resume"))
            local_batch = dict(train_batches[step])
            example_ids = local_batch.pop("example_id")
            batch_tokens = _batch_tokens(local_batch)
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
                writer.flush()
                checkpoints.save(completed, state, metrics=eval_metrics if with_best else None, force=force,
                                 start=start)
            if _preempted(checkpoints, completed):
                stop(Preempted(f"{name}: preempted; saved step {completed}, rerun the same command to resume"))
        lagged.drain()
    finally:
        bar.close()
        checkpoints.wait()
        checkpoints.close()
        _IN_STAGE_LOOP.clear()
    if _SIGTERM_RECEIVED:  # a notice during the last save, which is complete now
        raise Preempted(f"{name}: preempted; saved step {num_steps}, rerun the same command to resume")
    wall = time.perf_counter() - started

    # ------------------------------------------------------------------------- summary
    if eval_metrics is None:  # resumed after the final step: its eval is in metrics.jsonl
        eval_metrics = _eval_record(writer, name)
    return state.params, {
        "steps": num_steps,
        "eval_before": _eval_record(writer, name, step=0),
        "eval": eval_metrics,
        "wall_seconds": wall,  # of the invocation that finished the stage
        "tokens_per_sec": tokens / wall if tokens else None,
        "params_fingerprint": fingerprints.params_fingerprint(state.params),
        "nonfinite_steps": _nonfinite_steps(writer, name),
    }


def _nonfinite_steps(writer, stage):
    """Steps of `stage` whose update was skipped as non-finite, over every invocation (their records)."""
    return sum(1 for record in writer.records() if record["stage"] == stage and record["split"] == "nonfinite")


def _set_aside(directory, workdir, stage):
    """Moves the checkpoints of a stage trained from other parameters than it now starts from out of
    the way (kept, never deleted), so that it trains again."""
    target = storage.join(workdir, "checkpoints", "superseded", f"{stage}-{time.time_ns()}")
    logging.warning("%s: the checkpoints in %s were trained from other parameters than the stage now starts "
                    "from (an earlier stage was trained again); moved to %s, training %s again", stage, directory,
                    target, stage)
    if jax.process_index() == 0:
        storage.move(directory, target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"dpo_jax.train: {stage} set aside")


def _evaluate_samples(config, workdir, task, model, results, last_policy_stage):
    """Samples from the final policy on held-out prompts, scored by `config.evaluation.scorer` and judged
    against the reference responses by `config.evaluation.judge`, with the sequence KL to the last policy
    stage's starting point (e.g. the SFT model for DPO or PPO): `evaluation.evaluate_run`, which
    `python -m dpo_jax.evaluate` runs too, into the workdir."""
    if last_policy_stage is None:
        raise ValueError("config.evaluation.scorer / judge evaluate a policy, but config.stages trains none")
    stage, plan, results_before = last_policy_stage
    reference_params = stage.outputs(stage.initial_params(config, model, plan, results_before))["policy"]
    evaluation_config = config.evaluation
    return evaluation.evaluate_run(
        config, task, model.graphdef, results["policy"], reference_params, method=plan.name, out_dir=workdir,
        scorer=scorers.make_scorer(evaluation_config.scorer) if evaluation_config.scorer else None,
        judge=scorers.make_judge(evaluation_config.judge) if evaluation_config.judge else None)


def format_report(summary):
    """The end-of-run table: per stage, its heading and its own lines (`Stage.report`; DPO: before and
    after); then the sample evaluation, if any."""
    lines = []
    for where, counts in summary.get("data", {}).items():
        if counts.get("skipped"):
            reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(counts["skipped"].items()))
            lines.append(f"data {where}: {sum(counts['skipped'].values())} bad examples skipped ({reasons})")
    for name, result in summary.items():
        if name not in stages.STAGES:
            continue
        lines.append(f"{name}: {result['steps']} steps, {result['wall_seconds']:.1f} s, "
                     f"fingerprint {result['params_fingerprint'][:12]}")
        if result.get("nonfinite_steps"):
            lines.append(f"  {result['nonfinite_steps']} updates skipped as non-finite (metrics.jsonl: split "
                         f"\"nonfinite\")")
        lines += stages.STAGES[name].report(result)
    if "evaluation" in summary:
        evaluation_result = summary["evaluation"]
        kl = f", KL to reference {evaluation_result['kl']:.4f}" if "kl" in evaluation_result else ""
        lines.append(f"samples of the final policy{kl}")
        for temperature, result in sorted(evaluation_result["temperatures"].items(), key=lambda item: float(item[0])):
            numbers = ", ".join(f"{key} {result[key]:.4f}" for key in ("score", "win_rate") if key in result)
            lines.append(f"  temperature {temperature}: {numbers}")
    return "\n".join(lines)
