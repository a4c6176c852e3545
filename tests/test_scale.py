"""Scale-out: memory per device, pmap, gradient accumulation, reference strategies, multi-process,
restoring onto another mesh, and the launch scripts' dry runs."""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, host_devices, run_config, run_python

from dpo_jax import checkpointing, models, planning, sharding, steps, train
from dpo_jax.data import loader
from dpo_jax.data.task import load_task
from dpo_jax.metrics import read_jsonl

EIGHT_DEVICES = host_devices(8)
RUNLOCAL = ["-m", "dpo_jax.main", "--config=configs/quickstart.py:runlocal"]


def _script(name, *args, env=EIGHT_DEVICES):
    result = run_python(["tests/scale_scripts.py", name, *args], env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_train_state_memory_per_device_falls_as_the_mesh_grows():
    per_device = {int(k): v for k, v in _script("state_bytes_per_device").items()}
    # Parameters, both Adam moments and the live reference are all split over fsdp: each doubling
    # of the mesh about halves what one device holds (only scalars stay replicated).
    for count in (2, 4, 8):
        assert per_device[count] < per_device[count // 2] * 0.55, per_device
    assert per_device[8] < per_device[1] / 7, per_device


def test_pmap_form_gives_the_same_update_as_jit():
    result = _script("pmap_matches_jit")
    assert result["max_param_difference"] < 1e-5, result
    assert result["pmap_loss"] == pytest.approx(result["jit_loss"], abs=1e-5)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_gradient_accumulation_equals_the_large_batch_step(tiny_config, stage):
    task = load_task(tiny_config)
    graphdef, _, _ = models.abstract_model(tiny_config.model)
    params = models.init_params(tiny_config.model, seed=0, shardings=None)
    reference = models.init_params(tiny_config.model, seed=1, shardings=None)  # a different reference: non-zero rewards
    optimizer, schedule = steps.make_optimizer(tiny_config.train, tiny_config[stage])
    if stage == "dpo":
        loss_fn = functools.partial(steps.dpo_loss, graphdef=graphdef, dpo_config=tiny_config.dpo)
    else:
        loss_fn = functools.partial(steps.sft_loss, graphdef=graphdef)
    arrays = task.pairs_train if stage == "dpo" else task.sft_train
    batch = loader.train_batches(arrays, global_batch_size=8, seed=0)[0]
    results = []
    for micro_batches in (1, 4):
        state = steps.init_state(params, optimizer, seed=0, live_reference=False).replace(ref_params=reference)
        step = jax.jit(lambda s, b: steps.train_step(s, b, loss_fn=loss_fn, optimizer=optimizer, schedule=schedule,
                                                     micro_batches=micro_batches))
        state, metrics = step(state, batch)
        state, metrics = step(state, batch)  # a second step, so the update itself is compared too
        results.append((state.params, metrics))
    (params_1, metrics_1), (params_4, metrics_4) = results
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), params_1, params_4)
    for key in metrics_1:
        np.testing.assert_allclose(metrics_1[key], metrics_4[key], rtol=1e-5, atol=1e-5, err_msg=key)


def _dpo_losses(config, workdir, num_steps=3):
    """The train losses of the first DPO steps (the first is log 2 for every strategy: policy == reference)."""
    config.stages = ("dpo",)
    config.dpo.num_steps = num_steps
    config.dpo.warmup_steps = 0
    config.train.log_every_steps = 1
    train.run(config, str(workdir))
    return [r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "train"]


def test_reference_strategies_give_the_same_losses(tiny_config, tmp_path):
    """Until a reference update, every strategy scores the same reference, so the losses agree."""
    live = _dpo_losses(tiny_config.copy_and_resolve_references(), tmp_path / "live")
    assert live[1] != live[0]  # the policy has moved: the comparison is not of log 2 with itself
    for name, overrides, compared_steps in [("precomputed", {"reference": "precomputed"}, 3),
                                            ("tr_dpo", {"reference_update_every": 2}, 2)]:
        config = tiny_config.copy_and_resolve_references()
        config.dpo.update(overrides)
        losses = _dpo_losses(config, tmp_path / name)
        assert losses[:compared_steps] == pytest.approx(live[:compared_steps], abs=1e-6), name
    # LoRA: a live copy of the adapted model and "adapters off" are the same reference.
    lora = {}
    for reference in ("live", "lora"):
        config = tiny_config.copy_and_resolve_references()
        config.model.lora.rank = 4
        config.dpo.reference = reference
        lora[reference] = _dpo_losses(config, tmp_path / f"lora_{reference}")
    assert lora["lora"] == pytest.approx(lora["live"], abs=1e-6)
    assert lora["lora"][1] != lora["lora"][0]


def test_precomputed_reference_is_cached_and_recomputed_when_the_data_changes(tiny_config, tmp_path):
    tiny_config.dpo.reference = "precomputed"
    tiny_config.dpo.reference_cache_dir = str(tmp_path / "cache")
    _dpo_losses(tiny_config.copy_and_resolve_references(), tmp_path / "first", num_steps=1)
    first = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "cache").iterdir()}
    assert len(first) == 1
    # Another run on the same data and reference reuses the file...
    _dpo_losses(tiny_config.copy_and_resolve_references(), tmp_path / "second", num_steps=1)
    assert {path.name: path.stat().st_mtime_ns for path in (tmp_path / "cache").iterdir()} == first
    # ...and different data (another truncation length) gets a file of its own.
    changed = tiny_config.copy_and_resolve_references()
    changed.data.max_length = 20
    _dpo_losses(changed, tmp_path / "changed", num_steps=1)
    assert len(list((tmp_path / "cache").iterdir())) == 2


@pytest.mark.slow
def test_two_processes_with_four_devices_match_one_process_with_eight(tmp_path):
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    run_python(RUNLOCAL + [f"--workdir={single}"], env=EIGHT_DEVICES)
    result = subprocess.run(
        ["bash", "launch/local_multiprocess.sh", "2", "--", sys.executable, *RUNLOCAL, f"--workdir={multi}"],
        cwd=REPO, env={**os.environ, **host_devices(4)},
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "process 1 of 2" in result.stdout and "8 devices" in result.stdout
    records = {name: read_jsonl(os.path.join(path, "metrics.jsonl")) for name, path in (("1", single), ("2", multi))}
    assert [(r["stage"], r["split"], r["step"]) for r in records["1"]] == \
        [(r["stage"], r["split"], r["step"]) for r in records["2"]]
    for a, b in zip(records["1"], records["2"]):
        for key in ("loss", "nll", "rewards/margins", "logps/chosen", "kl"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (a["stage"], a["step"], key)
    # Gloo sums the gradients across processes in another order than one process does, so the
    # parameters agree to rounding, not bit for bit.
    plan = planning.plan_model(run_config("quickstart", "runlocal"),
                            sharding.make_mesh({"dcn": 1, "data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
    final = [checkpointing.restore_params(os.path.join(path, "checkpoints", "dpo"), plan.abstract_params)
             for path in (single, multi)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), *final)


def test_checkpoint_restores_onto_a_different_mesh(tmp_path):
    workdir = str(tmp_path / "run")
    config_flag = "--config.model.embed_dim=64"  # every sharded dimension divisible by 8
    halted = run_python(RUNLOCAL + [f"--workdir={workdir}", config_flag, "--config.mesh.data=1",
                                    "--config.mesh.fsdp=8", "--halt_after_steps=8"], env=EIGHT_DEVICES, check=False)
    assert halted.returncode == 3, halted.stderr[-3000:]
    directory = os.path.join(workdir, "checkpoints", "dpo")
    on_four = _script("restore_fingerprint", directory, env=host_devices(4))
    on_eight = _script("restore_fingerprint", directory)
    assert on_four["devices"] == 4 and any("fsdp" in spec for spec in on_four["specs"])
    assert on_four["fingerprint"] == on_eight["fingerprint"]
