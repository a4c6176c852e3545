"""The path layer on local disks and on object storage (a GCS emulator on localhost): a run whose workdir is
in a bucket trains, survives SIGKILL, resumes to the same parameters as an uninterrupted local run, and
exports a checkpoint that transformers loads."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import REPO, workdir_records, workdir_summary
from gcs_emulator import BUCKET

from dpo_jax import storage


def _python(code_or_args, env, *, timeout=600, check=True):
    """Runs Python in a fresh process pointed at the emulator (gcsfs reads its settings at import)."""
    args = ["-c", textwrap.dedent(code_or_args)] if isinstance(code_or_args, str) else code_or_args
    result = subprocess.run([sys.executable, *args], cwd=REPO, env={**os.environ, **env}, capture_output=True,
                            text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_local_writes_leave_no_temporary_file_and_urls_keep_their_scheme(tmp_path):
    path = str(tmp_path / "a" / "b.json")
    storage.write_json(path, {"x": [1, 2]})
    assert storage.read_json(path) == {"x": [1, 2]} and os.listdir(tmp_path / "a") == ["b.json"]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        storage.read_json(str(tmp_path / "bad.json"))
    assert storage.absolute("gs://bucket/run") == "gs://bucket/run"
    assert storage.absolute("run") == os.path.join(os.getcwd(), "run")
    assert storage.join("gs://bucket/run", "checkpoints", "sft") == "gs://bucket/run/checkpoints/sft"
    assert storage.local_copy(str(tmp_path)) == str(tmp_path)


def _fail_half_way(f):
    f.write(b"half")
    raise OSError(errno.EIO, os.strerror(errno.EIO))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full, whose writes fail as a full disk's")
def test_a_failed_write_keeps_the_file_removes_its_temporary_file_and_names_the_path(tmp_path):
    path = str(tmp_path / "summary.json")
    storage.write_json(path, {"sft": {"steps": 6}})
    before = (tmp_path / "summary.json").read_bytes()
    # The temporary file is /dev/full, so the write runs out of space as on a full disk.
    os.symlink("/dev/full", path + ".tmp")
    with pytest.raises(OSError) as raised:
        storage.write_json(path, {"sft": {"steps": 6}, "dpo": {"steps": 6}})
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, path)
    assert raised.value.strerror == os.strerror(errno.ENOSPC)  # "No space left on device"
    assert (tmp_path / "summary.json").read_bytes() == before and os.listdir(tmp_path) == ["summary.json"]
    # Whatever fails: a write that raises leaves no temporary file and the old file as it was.
    with pytest.raises(TypeError):
        storage.write_json(path, {"not json": object()})
    with pytest.raises(OSError, match="Input/output error") as raised:
        storage.write_bytes(path, _fail_half_way)
    assert raised.value.filename == path
    assert (tmp_path / "summary.json").read_bytes() == before and os.listdir(tmp_path) == ["summary.json"]
    with pytest.raises(OSError) as raised:  # a directory that cannot be made: the error names the file
        storage.write_text(str(tmp_path / "summary.json" / "x.txt"), "x")
    assert raised.value.filename == str(tmp_path / "summary.json" / "x.txt")


def test_the_path_layer_on_a_bucket(emulator, tmp_path):
    local = tmp_path / "model"
    local.mkdir()
    (local / "tokenizer.json").write_text('{"t": 1}')
    (local / "weights.bin").write_bytes(b"\0" * 1000)
    result = _python(f"""
        import json, os
        from dpo_jax import metrics, storage
        root = "gs://{BUCKET}/unit"
        storage.write_json(root + "/a/config.json", {{"lr": 0.1}})
        assert storage.read_json(root + "/a/config.json") == {{"lr": 0.1}}
        assert storage.isfile(root + "/a/config.json") and storage.isdir(root + "/a")
        assert not storage.exists(root + "/z")
        assert storage.listdir(root) == ["a"], storage.listdir(root)
        storage.move(root + "/a/config.json", root + "/b/config.json")
        assert not storage.exists(root + "/a/config.json") and storage.exists(root + "/b/config.json")
        storage.upload_tree({str(local)!r}, root + "/model")
        assert storage.file_digest(root + "/model/weights.bin") == storage.file_digest({str(local / "weights.bin")!r})
        copy = storage.local_copy(root + "/model", names=("tokenizer.json", "missing.json"))
        assert sorted(os.listdir(copy)) == ["tokenizer.json"], os.listdir(copy)
        # metrics.jsonl on object storage: records become durable at a flush, a resume drops the later ones.
        writer = metrics.MetricWriter(root + "/run")
        writer.write("sft", "train", 1, {{"loss": 2.0}})
        assert not storage.exists(root + "/run/metrics.jsonl")
        writer.flush()
        writer.write("sft", "train", 2, {{"loss": 1.0}})
        writer.close()
        assert [r["step"] for r in metrics.read_jsonl(root + "/run/metrics.jsonl")] == [1, 2]
        writer = metrics.MetricWriter(root + "/run")
        writer.drop_after("sft", 1)
        writer.close()
        assert [r["step"] for r in metrics.read_jsonl(root + "/run/metrics.jsonl")] == [1]
        assert any(name.startswith("events.out.tfevents") for name in storage.listdir(root + "/run/tensorboard/sft"))
        print("ok")
        """, emulator.env)
    assert result.stdout.strip().endswith("ok")


def _main(workdir, env, *extra, **kwargs):
    return [sys.executable, "-m", "dpo_jax.main", f"--config={REPO}/configs/quickstart.py:runlocal",
            f"--workdir={workdir}", "--config.dpo.num_steps=24", *extra], {**os.environ, **env}


@pytest.mark.slow
def test_a_run_in_a_bucket_survives_sigkill_and_matches_a_local_run(emulator, tmp_path):
    local_dir = str(tmp_path / "local")
    command, env = _main(local_dir, {})
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)

    workdir = f"gs://{BUCKET}/runs/quickstart"
    command, env = _main(workdir, emulator.env)
    run = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    # SIGKILL once DPO has a committed checkpoint in the bucket (Orbax marks it so on object stores),
    # in the middle of the stage.
    while not any(name.endswith("/commit_success.txt") and name.count("/") == 5
                  for name in emulator.objects("runs/quickstart/checkpoints/dpo/")):
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before its first DPO checkpoint"
        time.sleep(0.2)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not any(name.endswith("summary.json") and "dpo" in name for name in emulator.objects("runs/"))
    resumed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "dpo: resumed from step" in resumed.stderr

    fetched = str(tmp_path / "fetched")
    _python(f"from dpo_jax import storage; storage.upload_tree(storage.local_copy({workdir!r}), {fetched!r})",
            emulator.env)
    bucket_summary, local_summary = workdir_summary(fetched), workdir_summary(local_dir)
    for stage in ("sft", "dpo"):
        assert bucket_summary[stage]["params_fingerprint"] == local_summary[stage]["params_fingerprint"], stage
    assert workdir_records(fetched) == workdir_records(local_dir)
    assert any(name.startswith("runs/quickstart/tensorboard/dpo/events") for name in emulator.objects("runs/"))

    # Export from the bucket to the bucket, then load the export with transformers.
    exported = f"gs://{BUCKET}/exports/quickstart"
    _python(["-m", "dpo_jax.export", f"--workdir={workdir}", f"--out={exported}"], emulator.env)
    result = _python(f"""
        import json, numpy as np, torch, transformers
        from dpo_jax import models, storage
        local = storage.local_copy({exported!r})
        model = transformers.AutoModelForCausalLM.from_pretrained(local).eval()
        ids = np.arange(1, 9, dtype=np.int32)[None]
        with torch.no_grad():
            theirs = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
        ours = np.asarray(models.load_hf({exported!r})(ids))
        print(json.dumps(float(np.abs(theirs - ours).max())))
        """, emulator.env)
    assert json.loads(result.stdout.strip().splitlines()[-1]) < 1e-4
    np.testing.assert_equal(bucket_summary["dpo"]["steps"], 24)
