"""Online DPO (iterative) and GRPO in the training loop, through `python -m dpo_jax.main`: the workdir
contract and TRL's metric names, exact resume mid-round and mid-stage, and meshes of 8 devices."""

import math
import os

import pytest
from conftest import host_devices, run_python, workdir_records, workdir_summary

from dpo_jax import checkpointing, fingerprints, planning, sharding
from dpo_jax.configs.args import load_config

pytestmark = pytest.mark.slow
# Iterative DPO in rounds of 3 iterations, a beta schedule, RLOO advantages, DAPO's normalisation.
OPTIONS = ["-m", "dpo_jax.main", "--config=configs/quickstart.py:runlocal,method=online_dpo",
           "--config.online_dpo.round_steps=3", "--config.online_dpo.beta_schedule=0.2,0.1",
           "--config.grpo.baseline=leave_one_out", "--config.grpo.loss_type=dapo", "--config.grpo.epsilon_high=0.28",
           "--config.grpo.num_minibatches=2"]
ONLINE = OPTIONS + ["--config.stages=('sft','reward','online_dpo','grpo')"]
EIGHT_DEVICES = host_devices(8)
ONLINE_DPO_METRICS = ("objective/kl", "objective/scores", "objective/rlhf_reward", "objective/non_score_reward",
                      "objective/scores_margin", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                      "rewards/margins", "logps/chosen", "logps/rejected", "beta", "loss", "grad_norm",
                      "learning_rate")
GRPO_METRICS = ("objective/kl", "objective/scores", "objective/rlhf_reward", "reward", "reward_std",
                "frac_reward_zero_std", "completions/mean_length", "kl", "clip_ratio/low_mean",
                "clip_ratio/high_mean", "clip_ratio/region_mean", "loss", "grad_norm", "learning_rate")
STAGES = ("sft", "reward", "online_dpo", "grpo")


@pytest.fixture(scope="module")
def online_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("online"))
    run_python(ONLINE + [f"--workdir={workdir}"])
    return workdir


def test_online_dpo_and_grpo_write_the_workdir_contract_with_trls_metric_names(online_run):
    summary = workdir_summary(online_run)
    assert set(summary) == set(STAGES) | {"data"}
    assert sorted(os.listdir(os.path.join(online_run, "checkpoints"))) == sorted(STAGES)
    records = workdir_records(online_run)
    for stage, keys in (("online_dpo", ONLINE_DPO_METRICS), ("grpo", GRPO_METRICS)):
        train = [r for r in records if r["stage"] == stage and r["split"] == "train"]
        assert [r["step"] for r in train] == [2, 4, 6], stage
        for record in train:
            for key in keys:
                assert math.isfinite(record[key]), (stage, record["step"], key)
        evals = [r for r in records if r["stage"] == stage and r["split"] == "eval"]
        assert evals[0]["step"] == 0 and abs(evals[0]["objective/kl"]) < 1e-5, stage  # the start is its reference
        assert {"objective/scores", "objective/kl", "objective/entropy", "response_length"} <= set(evals[-1])
    online = [r for r in records if r["stage"] == "online_dpo" and r["split"] == "train"]
    # The schedule's two betas over 6 iterations: 0.2 for iterations 0-2, 0.1 for 3-5; the record of step s
    # holds iteration s - 1's.
    assert [r["beta"] for r in online] == pytest.approx([0.2, 0.1, 0.1])


# After 6 SFT and 6 reward steps: inside online DPO's first round (iterations 0-2); inside GRPO.
@pytest.mark.parametrize("halt_after_steps", [14, 19])
def test_a_halted_run_resumes_to_the_same_parameters_and_metrics(online_run, tmp_path, halt_after_steps):
    workdir = str(tmp_path / "halted")
    halted = run_python(ONLINE + [f"--workdir={workdir}", f"--halt_after_steps={halt_after_steps}"], check=False)
    assert halted.returncode == 3, halted.stderr[-2000:]
    run_python(ONLINE + [f"--workdir={workdir}"])
    for stage in STAGES:
        assert (workdir_summary(workdir)[stage]["params_fingerprint"]
                == workdir_summary(online_run)[stage]["params_fingerprint"]), stage
    assert workdir_records(workdir) == workdir_records(online_run)


@pytest.mark.parametrize("mesh", [("--config.mesh.data=8",),
                                  ("--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2")],
                         ids=["data8", "2x2x2"])
def test_online_stages_on_eight_devices_match_one_device(online_run, tmp_path, mesh):
    """Both stages start from the single-device run's checkpoints (bit-equal starts), so that the first
    rollouts sample the same tokens: their step-0 eval and their first train record must agree."""
    workdir = str(tmp_path / "mesh")
    checkpoints = os.path.join(online_run, "checkpoints")
    run_python(OPTIONS + [f"--workdir={workdir}", "--config.stages=('online_dpo','grpo')",
                         f"--config.online_dpo.init_from={checkpoints}/sft",
                         f"--config.online_dpo.reward_from={checkpoints}/reward",
                         f"--config.grpo.init_from={checkpoints}/online_dpo",
                         f"--config.grpo.reward_from={checkpoints}/reward", *mesh], env=EIGHT_DEVICES)
    for stage in ("online_dpo", "grpo"):
        sharded = [r for r in workdir_records(workdir) if r["stage"] == stage]
        single = [r for r in workdir_records(online_run) if r["stage"] == stage]
        assert [(r["split"], r["step"]) for r in sharded] == [(r["split"], r["step"]) for r in single], stage
        for a, b in zip(sharded[:2], single[:2]):
            for key in a:
                if key not in ("stage", "split", "step", "rewards/accuracies"):
                    assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-4), (stage, a["step"], key)


def test_an_online_stages_checkpoints_restore_as_a_policy_to_start_from(online_run):
    """`init_from` of a later stage (or another run) may name an online stage's checkpoints, whose
    params are {"policy": ...}: it gets that policy, the stage's final parameters."""
    config = load_config("configs/quickstart.py:runlocal,method=online_dpo")
    model = planning.plan_model(config, sharding.make_mesh(config.mesh))
    for stage in ("online_dpo", "grpo"):
        policy = checkpointing.restore_params(os.path.join(online_run, "checkpoints", stage), model.abstract_params)
        assert (fingerprints.params_fingerprint({"policy": policy})
                == workdir_summary(online_run)[stage]["params_fingerprint"]), stage
