"""End to end through `python -m dpo_jax.main`: the workdir contract, resume, meshes, bad input."""

import json
import os

import pytest
from conftest import host_devices, run_python, workdir_records, workdir_summary

RUNLOCAL = ["-m", "dpo_jax.main", "--config=configs/quickstart.py:runlocal"]
EIGHT_DEVICES = host_devices(8)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One uninterrupted run of the tiny config."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    result = run_python(RUNLOCAL + [f"--workdir={workdir}"])
    return workdir, result


def test_workdir_contract(finished_run):
    workdir, result = finished_run
    assert {"config.json", "metrics.jsonl", "summary.json", "tensorboard", "checkpoints"} <= set(os.listdir(workdir))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["dpo", "sft"]
    for stage in ("sft", "dpo"):  # one TensorBoard run per stage
        assert any(name.startswith("events.out.tfevents")
                   for name in os.listdir(os.path.join(workdir, "tensorboard", stage))), stage
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["dpo"]["beta"] == 0.1

    records = workdir_records(workdir, drop=())
    for record in records:
        assert record["stage"] in ("sft", "dpo") and record["split"] in ("train", "eval")
        assert isinstance(record["step"], int)
    dpo_train = [r for r in records if r["stage"] == "dpo" and r["split"] == "train"]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "tokens_per_sec"):
        assert key in dpo_train[-1], key
    dpo_eval_steps = [r["step"] for r in records if r["stage"] == "dpo" and r["split"] == "eval"]
    assert dpo_eval_steps[0] == 0 and dpo_eval_steps[-1] == 6  # before any update, and at the end
    assert "kl" in records[-1]
    sft_train = [r for r in records if r["stage"] == "sft" and r["split"] == "train"]
    assert {"loss", "nll", "tokens_per_sec"} <= set(sft_train[-1])

    summary = workdir_summary(workdir)
    for stage in ("sft", "dpo"):
        assert summary[stage]["steps"] == 6
        assert len(summary[stage]["params_fingerprint"]) == 64
        for key in ("wall_seconds", "tokens_per_sec"):  # recorded (their values are measurements)
            assert summary[stage][key] > 0, key
    assert summary["dpo"]["eval_before"]["rewards/accuracies"] == 0.5
    assert summary["dpo"]["eval"] == {k: v for k, v in records[-1].items() if k not in ("stage", "split", "step")}
    assert "preference accuracy" in result.stdout and "KL to reference" in result.stdout


def test_rerunning_a_finished_run_changes_nothing(finished_run, tmp_path):
    workdir, _ = finished_run
    before = (workdir_summary(workdir), workdir_records(workdir, drop=()))
    run_python(RUNLOCAL + [f"--workdir={workdir}"])
    assert (workdir_summary(workdir), workdir_records(workdir, drop=())) == before


@pytest.mark.parametrize("halt_after_steps", [4, 8])  # inside SFT; inside DPO
def test_halted_run_resumes_to_the_same_parameters_and_metrics(finished_run, tmp_path, halt_after_steps):
    reference_workdir, _ = finished_run
    workdir = str(tmp_path / "halted")
    halted = run_python(RUNLOCAL + [f"--workdir={workdir}", f"--halt_after_steps={halt_after_steps}"], check=False)
    assert halted.returncode == 3, halted.stderr[-2000:]
    assert not os.path.exists(os.path.join(workdir, "summary.json")) or "dpo" not in workdir_summary(workdir)
    run_python(RUNLOCAL + [f"--workdir={workdir}"])
    for stage in ("sft", "dpo"):
        assert (workdir_summary(workdir)[stage]["params_fingerprint"]
                == workdir_summary(reference_workdir)[stage]["params_fingerprint"])
    assert workdir_records(workdir) == workdir_records(reference_workdir)


def test_same_losses_on_one_device_and_on_an_eight_device_mesh(finished_run, tmp_path):
    reference_workdir, _ = finished_run
    for mesh in (["--config.mesh.data=-1"], ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]):
        workdir = str(tmp_path / "_".join(mesh).replace("-", "").replace(".", "_").replace("=", ""))
        run_python(RUNLOCAL + [f"--workdir={workdir}"] + mesh, env=EIGHT_DEVICES)
        sharded, single = workdir_records(workdir), workdir_records(reference_workdir)
        assert [(r["stage"], r["split"], r["step"]) for r in sharded] == [
            (r["stage"], r["split"], r["step"]) for r in single]
        for a, b in zip(sharded, single):
            # rewards/accuracies is a step function of reward differences that are ~1e-5 this early
            # in DPO, so a rounding difference between meshes can flip a pair; every continuous
            # metric must agree.
            for key in a:
                if key not in ("stage", "split", "step", "rewards/accuracies"):
                    assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), (mesh, a["stage"], a["step"], key)


@pytest.mark.parametrize("flags,env,message", [
    (["--config.dpo.beta=0"], {}, "config.dpo.beta: must be > 0"),
    (["--config.dpo.loss_type=nope"], {}, "config.dpo.loss_type: ('nope',): each must be one of"),
    (["--config.train.global_batch_size=6"], EIGHT_DEVICES,
     "config.train.global_batch_size / config.train.grad_accum_steps=6 is not divisible"),
    (["--config.mesh.data=3"], EIGHT_DEVICES, "config.mesh"),
    (["--config.dpo.betta=0.2"], {}, "betta"),
    (["--config.model.logits_chunk_size=-1"], {}, "config.model.logits_chunk_size: must be >= 0"),
])
def test_bad_config_is_refused_before_anything_runs(tmp_path, flags, env, message):
    workdir = tmp_path / "run"
    result = run_python(RUNLOCAL + [f"--workdir={workdir}"] + flags, env=env, check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (workdir / "checkpoints").exists()


def test_a_workdir_accepts_another_way_of_computing_the_same_model(finished_run):
    """remat, blockwise attention, scored-token log-probs and unfused projections change how, not
    what: a finished run rerun with them is accepted and has nothing left to do."""
    workdir, _ = finished_run
    before = workdir_summary(workdir)
    run_python(RUNLOCAL + [f"--workdir={workdir}", "--config.model.remat=True", "--config.model.attention_block_size=8",
                           "--config.model.logits_chunk_size=0", "--config.model.fused_qkv=False",
                           "--config.model.fused_gate_up=False", "--config.model.fused_parallel_inputs=False"])
    assert workdir_summary(workdir) == before


def test_a_workdir_refuses_a_different_runs_config(finished_run):
    workdir, _ = finished_run
    before = workdir_summary(workdir)
    result = run_python(RUNLOCAL + [f"--workdir={workdir}", "--config.dpo.beta=0.3"], check=False)
    assert result.returncode != 0
    assert "dpo.beta: 0.1 -> 0.3" in result.stderr
    assert workdir_summary(workdir) == before
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["dpo"]["beta"] == 0.1
