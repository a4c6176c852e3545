"""The RLHF stages (reward model, PPO) and Unlikelihood in the training loop, through `python -m dpo_jax.main`:
the workdir contract, exact resume, meshes, sample evaluation and bad config."""

import math
import os

import pytest
from conftest import host_devices, run_python, workdir_records, workdir_summary

pytestmark = pytest.mark.slow
STAGES = "--config.stages=('sft','reward','ppo','unlikelihood')"
RLHF = ["-m", "dpo_jax.main", "--config=configs/quickstart.py:runlocal", STAGES, "--config.reward.num_steps=6",
        "--config.ppo.num_steps=4", "--config.ppo.max_new_tokens=10", "--config.unlikelihood.num_steps=4",
        "--config.ppo.adaptive_kl=True", "--config.ppo.target_kl=1000.0", "--config.ppo.kl_horizon=16"]
EIGHT_DEVICES = host_devices(8)
PPO_METRICS = ("objective/kl", "objective/scores", "objective/rlhf_reward", "objective/non_score_reward",
               "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg",
               "kl_coef", "response_length", "loss", "grad_norm", "learning_rate")


@pytest.fixture(scope="module")
def rlhf_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("rlhf"))
    run_python(RLHF + [f"--workdir={workdir}"])
    return workdir


def test_reward_ppo_and_unlikelihood_stages_write_the_workdir_contract(rlhf_run):
    summary = workdir_summary(rlhf_run)
    assert set(summary) == {"sft", "reward", "ppo", "unlikelihood", "data"}
    assert sorted(os.listdir(os.path.join(rlhf_run, "checkpoints"))) == ["ppo", "reward", "sft", "unlikelihood"]
    records = workdir_records(rlhf_run)
    reward_eval = [r for r in records if r["stage"] == "reward" and r["split"] == "eval"][-1]
    assert {"loss", "rewards/accuracies", "rewards/margins"} <= set(reward_eval)
    ppo_train = [r for r in records if r["stage"] == "ppo" and r["split"] == "train"]
    assert [r["step"] for r in ppo_train] == [2, 4]
    for key in PPO_METRICS:
        assert math.isfinite(ppo_train[-1][key]), key
    # Far below its target KL, the adaptive controller shrinks the coefficient by the most it may per
    # rollout, 1 - 0.2 * 8 sequences / horizon 16 = 0.9; each record shows the coefficient its rollout used.
    assert [r["kl_coef"] for r in ppo_train] == pytest.approx([0.05 * 0.9, 0.05 * 0.9 ** 3], rel=1e-5)
    ppo_eval = [r for r in records if r["stage"] == "ppo" and r["split"] == "eval"]
    assert ppo_eval[0]["step"] == 0 and abs(ppo_eval[0]["objective/kl"]) < 1e-5  # the policy is its reference
    unlikelihood_eval = [r for r in records if r["stage"] == "unlikelihood" and r["split"] == "eval"][-1]
    assert {"loss", "nll", "unlikelihood"} <= set(unlikelihood_eval)


@pytest.mark.parametrize("halt_after_steps", [9, 15])  # inside the reward stage (6 SFT steps first); inside PPO
def test_a_halted_run_resumes_to_the_same_parameters_and_metrics(rlhf_run, tmp_path, halt_after_steps):
    workdir = str(tmp_path / "halted")
    halted = run_python(RLHF + [f"--workdir={workdir}", f"--halt_after_steps={halt_after_steps}"], check=False)
    assert halted.returncode == 3, halted.stderr[-2000:]
    run_python(RLHF + [f"--workdir={workdir}"])
    for stage in ("sft", "reward", "ppo", "unlikelihood"):
        assert (workdir_summary(workdir)[stage]["params_fingerprint"]
                == workdir_summary(rlhf_run)[stage]["params_fingerprint"]), stage
    assert workdir_records(workdir) == workdir_records(rlhf_run)


def test_ppo_on_an_eight_device_mesh_matches_one_device(rlhf_run, tmp_path):
    workdir = str(tmp_path / "mesh")
    run_python(RLHF + [f"--workdir={workdir}", "--config.mesh.data=2", "--config.mesh.fsdp=2",
                       "--config.mesh.tensor=2"], env=EIGHT_DEVICES)
    sharded = [r for r in workdir_records(workdir) if r["stage"] in ("reward", "ppo")]
    single = [r for r in workdir_records(rlhf_run) if r["stage"] in ("reward", "ppo")]
    assert [(r["stage"], r["split"], r["step"]) for r in sharded] == [
        (r["stage"], r["split"], r["step"]) for r in single]
    # The rollouts sample tokens, so identical draws need logits equal to rounding: compare the first PPO
    # step (its rollout comes from the same SFT model) and the reward model's whole stage.
    first_ppo = lambda records: [r for r in records if r["stage"] == "ppo"][:2]
    for a, b in zip([r for r in sharded if r["stage"] == "reward"] + first_ppo(sharded),
                    [r for r in single if r["stage"] == "reward"] + first_ppo(single)):
        for key in a:
            if key not in ("stage", "split", "step", "rewards/accuracies"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-4), (a["stage"], a["step"], key)


@pytest.mark.parametrize("flags,message", [
    (["--config.stages=('sft','ppo')"], "config.ppo.reward: 'model' needs a reward model"),
    (["--config.stages=('sft','dpo')", "--config.evaluation.temperatures=hot"], "config.evaluation.temperatures"),
    (["--config.stages=('sft','reward','ppo')", "--config.ppo.num_minibatches=3"], "config.ppo.num_minibatches"),
    (["--config.experiment.name=frontier"], "config.experiment.name"),
    (["--config.experiment.dpo_betas=0.1,-1"], "config.experiment.dpo_betas"),
    (["--config.stages=('pretrain','sft')", "--config.data.pretrain_files=/nonexistent.jsonl"], "config.data"),
])
def test_bad_rlhf_config_is_refused_before_anything_runs(tmp_path, flags, message):
    workdir = tmp_path / "run"
    result = run_python(["-m", "dpo_jax.main", "--config=configs/quickstart.py:runlocal", f"--workdir={workdir}"]
                        + flags, check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (workdir / "checkpoints").exists()
