"""What the online stages (ppo, online_dpo, grpo) share: their reward, the options of their rollouts,
and, for those without a value model, their plan, starting params and report."""

import functools

import numpy as np

from dpo_jax import models, planning, rollout, scorers, steps, storage
from dpo_jax.data import synthetic
from dpo_jax.stages import base


def block_keys(**extra):
    """The keys of an online stage's block that say where its reward comes from and how it samples."""
    return dict(
        reward_from="",                       # reward-stage checkpoint dir, the reward model ("" = this run's
                                              #   reward stage)
        reward="model",                       # model: the learned reward model | a scorer spec (e.g. "vader",
                                              #   "command:<cmd>"): a ground-truth reward on the host
        temperature=1.0,                      # rollout sampling temperature
        max_new_tokens=24,                    # rollout response length at most (EOS ends a response earlier)
        **extra,
    )


def check_block(config, name):
    """The checks of `block_keys`'s keys of `config.<name>`: a reward model to start from when
    `reward` is 'model', a positive temperature and response length."""
    block, stages = config[name], tuple(config.stages)
    base.check(not block.reward_from or storage.isdir(block.reward_from), f"{name}.reward_from",
          f"{block.reward_from!r} is not a directory")
    base.check(name not in stages or block.reward != "model" or block.reward_from or block.get("judge")
          or ("reward" in stages and stages.index("reward") < stages.index(name)),
          f"{name}.reward", f"'model' needs a reward model: a 'reward' stage before '{name}' in config.stages, "
          f"or {name}.reward_from (a reward stage's checkpoint directory); or set a scorer")
    base.check(block.temperature > 0, f"{name}.temperature", "must be > 0")
    base.check(block.max_new_tokens > 0, f"{name}.max_new_tokens", "must be > 0")


def host_reward_fn(scorer, decode):
    """Token arrays of rollouts -> scores of their texts, on the host (the step calls it via
    jax.pure_callback): `scorer(prompts, responses)` on the decoded texts."""
    def texts(ids, lengths):
        return [decode(row[:length].tolist()) for row, length in zip(np.asarray(ids), np.asarray(lengths))]

    def score(prompt_ids, prompt_lengths, response_ids, response_lengths):
        return np.asarray(scorer(texts(prompt_ids, prompt_lengths), texts(response_ids, response_lengths)),
                          np.float32)
    return score


def host_judge_fn(judge, decode):
    """Token arrays of rollouts, two responses per prompt in consecutive rows -> a judge's P(first
    better than second) on each pair's first row and its complement on the second, as scores."""
    return host_reward_fn(lambda prompts, responses: _pair_preferences(judge, prompts, responses), decode)


def _pair_preferences(judge, prompts, responses):
    preferences = np.asarray(judge(prompts[0::2], responses[0::2], responses[1::2]), np.float32)
    return np.stack([preferences, 1.0 - preferences], axis=1).reshape(-1)


def rollout_options(config, name, task):
    """What the rollouts of stage `name` need beyond its block: the end-of-response ids and, for a
    scorer (or a judge) as the reward, the host function that decodes rollouts and scores them."""
    if task is None:  # shapes only
        return {"eos_ids": (), "host_reward_fn": None}
    block, tokenizer = config[name], task.tokenizer
    eos_ids = tuple(tokenizer.eos_ids) if tokenizer is not None else (synthetic.EOS,)
    judge = block.get("judge")
    if block.reward == "model" and not judge:
        return {"eos_ids": eos_ids, "host_reward_fn": None}
    if tokenizer is None:
        key, spec = (f"{name}.judge", judge) if judge else (f"{name}.reward", block.reward)
        raise ValueError(f"config.{key}={spec!r} reads text, but config.data has no tokenizer")
    if judge:
        return {"eos_ids": eos_ids, "host_reward_fn": host_judge_fn(scorers.make_judge(judge), tokenizer.decode)}
    return {"eos_ids": eos_ids, "host_reward_fn": host_reward_fn(scorers.make_scorer(block.reward), tokenizer.decode)}


def reward_model(config, name, abstract_scalar_params, results):
    """The frozen reward model of stage `name`: `reward_from`'s checkpoint, else this run's reward
    stage (validation made sure there is one); None when a scorer is the reward."""
    block = config[name]
    if block.reward != "model":
        return None
    return planning.restore_or(block.reward_from, abstract_scalar_params, lambda: results["reward_model"])


def plan_stage(name, config, mesh, model, task, step_fn, *, extra_references=(), eval_logps_temperature=None):
    """The plan of an online stage without a value model (GRPO, online DPO): params {"policy"},
    ref_params {"reference", "reward", *extra_references}; `step_fn(state, batch, *, graphdef,
    value_graphdef, optimizer, schedule, eos_ids, pad_id, host_reward_fn, micro_batches, trainable)`
    with the stage's block already bound. eval_logps_temperature: of the eval's KL (default: the
    sampling temperature)."""
    block = config[name]
    scalar = planning.plan_model(config, mesh, scalar_head=True)
    param_plan = planning.ModelPlan(None, {"policy": model.abstract_params}, {"policy": model.param_shardings})
    trainable = models.trainable_mask(param_plan.abstract_params)
    # Several updates per iteration: the schedule counts updates.
    optimizer, schedule = steps.make_optimizer(config.train, rollout.updates_schedule_config(block), trainable)
    with_reward_model = block.reward == "model" and not block.get("judge")
    options = dict(graphdef=model.graphdef, value_graphdef=scalar.graphdef, pad_id=0,
                   **rollout_options(config, name, task))
    step_fn = functools.partial(step_fn, optimizer=optimizer, schedule=schedule, trainable=trainable,
                                micro_batches=config.train.grad_accum_steps, **options)
    eval_fn = functools.partial(rollout.eval_step, block=block, seed=config.seed,
                                logps_temperature=eval_logps_temperature, **options)
    init_state = lambda start: rollout.init_online_state(start["policy"], start["reward"], optimizer, seed=config.seed,
                                                         extra_references=extra_references)
    abstract_start = {"policy": model.abstract_params, "reward": scalar.abstract_params if with_reward_model else None}
    ref_shardings = {"reference": model.param_shardings,
                     "reward": scalar.param_shardings if with_reward_model else None,
                     **{extra: model.param_shardings for extra in extra_references}}
    return planning.plan_custom_stage(name, mesh, param_plan, optimizer, schedule, step_fn, eval_fn, init_state,
                                      abstract_start, trainable=trainable, reference_mode=name,
                                      ref_shardings=ref_shardings)


def initial_params(config, model, stage_plan, results):
    """{"policy": the stage's start, "reward": its reward model (None with a scorer or judge)}."""
    policy = base.start_from_policy(config, model, stage_plan, results)
    abstract_reward = stage_plan.abstract_state.ref_params["reward"]
    reward = None if abstract_reward is None else reward_model(config, stage_plan.name, abstract_reward, results)
    return {"policy": policy, "reward": reward}


def report(result):
    """Held-out samples' score and KL to the reference, before and after the stage."""
    before, final = result.get("eval_before"), result.get("eval") or {}
    if not before:
        return base.final_eval_lines(result)
    lines = [f"  {'held-out samples':<22}{'before':>12}{'after':>12}"]
    for key, name in (("objective/scores", "score"), ("objective/kl", "KL to reference")):
        lines.append(f"  {name:<22}{before[key]:>12.4f}{final[key]:>12.4f}")
    return lines
