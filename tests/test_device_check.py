"""The device check on CPU: all of it once through launch/device_check.sh at its tiny size (the kernels in
interpret mode, a short SFT -> DPO run, the benchmark), and a wrong kernel reported as a failure."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, _excerpt
from test_kernels import TOLERANCES as TEST_KERNELS_TOLERANCES

from dpo_jax import bench as bench_module
from dpo_jax import device_check
from dpo_jax.models import kernels

FUNCTIONS = ("segment_attention", "prefix_shared_attention")
DECODER_LAYOUTS = ("decoder_packed", "decoder_packed_prefix_shared")


def _strict_json(line):
    """The JSON object of `line`, refusing NaN and Infinity (which strict parsers such as jq refuse)."""
    def refuse(constant):
        raise ValueError(f"{constant} in the summary")
    return json.loads(line, parse_constant=refuse)


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """(summary, workdir) of `bash launch/device_check.sh --device_check_size=tiny`, run from outside the repository."""
    workdir = tmp_path_factory.mktemp("device_check")
    result = subprocess.run(
        ["bash", os.path.join(REPO, "launch", "device_check.sh"), "--device_check_size=tiny",
         f"--device_check_workdir={workdir}"],
        cwd=workdir, env={**os.environ, "DPO_JAX_PYTHON": sys.executable}, capture_output=True, text=True,
        timeout=900)
    assert result.returncode == 0, _excerpt(result.stdout + result.stderr)
    return _strict_json(result.stdout.strip().splitlines()[-1]), workdir


@pytest.mark.slow
def test_the_whole_check_passes_on_cpu(checked):
    summary, workdir = checked
    assert summary["ok"] is True and summary["failures"] == []
    assert (summary["backend"], summary["device_kind"], summary["device_count"]) == ("cpu", "cpu", 1)
    assert summary["jax_version"] == jax.__version__

    parity = summary["parity"]
    assert parity["interpret"] is True and parity["implementations"] == ["splash", "pallas_gpu"]
    expected = {f"{implementation}/{function}/{dtype}" for implementation in parity["implementations"]
                for function in FUNCTIONS for dtype in device_check.DTYPES}
    expected |= {f"{implementation}/{layout}/float32" for implementation in parity["implementations"]
                 for layout in DECODER_LAYOUTS}
    assert set(parity["checks"]) == expected
    for name, check in parity["checks"].items():
        assert check["ok"] is True, (name, check)
        assert check["error"] is not None and 0 <= check["error"] <= check["tolerance"], (name, check)

    run = summary["run"]
    hh = os.path.isfile(os.path.join(device_check.SHARED_HH, device_check.HH_FILE))
    assert run["data"] == ("hh_rlhf/harmless-base" if hh else "synthetic")
    assert (run["dtype"], run["attention_kernel"]) == ("float32", "dense")  # model.*=auto on CPU
    assert run["sft"]["steps"] == run["dpo"]["steps"] == device_check.SIZES["tiny"].run_steps
    for stage in ("sft", "dpo"):
        assert np.isfinite(run[stage]["loss"]) and run[stage]["loss"] > 0
    assert 0 <= run["dpo"]["rewards/accuracies"] <= 1 and run["dpo"]["kl"] >= 0
    assert os.path.isfile(os.path.join(workdir, "run", "summary.json"))

    bench = summary["bench"]
    assert 0 < bench["pairs_per_sec"] < bench["tokens_per_sec"] <= bench["padded_tokens_per_sec"]
    assert 0 < bench["mfu"] and bench["peak_flops_source"] == "float32 matmul probe"
    assert summary["peak_memory_bytes"] >= bench["peak_memory_bytes"] > 0


@pytest.mark.slow
def test_a_second_check_in_the_same_workdir_is_refused(checked):
    _, workdir = checked
    with pytest.raises(ValueError, match="previous check"):
        device_check.run(device_check.Options(workdir=str(workdir), size="tiny"), bench_module)


def test_the_launch_script_prints_its_usage():
    result = subprocess.run(["bash", os.path.join(REPO, "launch", "device_check.sh"), "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "--device_check_size" in result.stdout


def _without_causal_mask(query, key, value, segment_ids, block_size, interpret):
    """A kernel with a bug: attention within segments, but to later tokens too."""
    del block_size, interpret
    mask = segment_ids[:, :, None] == segment_ids[:, None, :]
    return jax.nn.dot_product_attention(query, key, value, mask=mask[:, None])


def _raising(*args):
    raise RuntimeError("Mosaic failed to compile the kernel")


def test_wrong_and_failing_kernels_are_reported(monkeypatch):
    monkeypatch.setattr(kernels, "_splash", _without_causal_mask)
    monkeypatch.setattr(kernels, "_pallas_gpu", _raising)
    checks = device_check.kernel_parity(dtypes=("float32",))
    assert set(checks) == {f"{i}/{f}/float32" for i in ("splash", "pallas_gpu") for f in FUNCTIONS}
    for function in FUNCTIONS:
        wrong, failing = checks[f"splash/{function}/float32"], checks[f"pallas_gpu/{function}/float32"]
        assert wrong["ok"] is False and wrong["error"] > 100 * wrong["tolerance"]
        assert failing["ok"] is False and "Mosaic failed" in failing["raised"]
    summary = {"parity": {"ok": False, "checks": checks}, "run": {"ok": True}, "bench": {"ok": True}}
    lines = device_check.failures(summary)
    assert len(lines) == 4
    assert any(line.startswith("parity splash/segment_attention/float32: ") and "> tolerance 1e-05" in line
               for line in lines)
    assert any(line.startswith("parity pallas_gpu/prefix_shared_attention/float32: RuntimeError") for line in lines)


@pytest.mark.parametrize("share_prompt", [False, True])
def test_parity_rows_cross_a_block_boundary(share_prompt):
    """The rows hold several sequences, one of them across slot 128 (the kernels' block), and padding."""
    segment_ids = device_check.parity_rows(share_prompt)["segment_ids"]
    assert any(row[127] == row[128] != 0 for row in segment_ids)
    assert all(len(set(row[row > 0])) >= 2 for row in segment_ids)
    assert (segment_ids == 0).any()


def test_fused_implementations_by_backend():
    assert device_check.fused_implementations("cpu") == ("splash", "pallas_gpu")
    assert device_check.fused_implementations("tpu") == ("splash",)
    assert device_check.fused_implementations("gpu") == ("pallas_gpu",)


def test_the_kernel_tests_hold_the_same_tolerances():
    assert device_check.TOLERANCES == TEST_KERNELS_TOLERANCES


def test_data_that_is_not_there_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="no harmless-base/test.jsonl.gz"):
        device_check.run(device_check.Options(data=str(tmp_path), size="tiny"), bench_module)
    with pytest.raises(ValueError, match="one of"):
        device_check.run(device_check.Options(size="huge"), bench_module)
    assert device_check.hh_manual_dir("synthetic") is None
