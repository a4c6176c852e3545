"""The launch scripts of launch/: dry runs that run nothing, arguments that arrive exactly as given, the TPU
pod's wait for a queued resource, SLURM's requeue on exit 3 or 4, and the Dockerfile (read, not built).

The scripts run from a copy of launch/ in a small git repository under tmp_path, with fake `gcloud`,
`kubectl`, `srun`, `sbatch` and `scontrol` first on PATH; the fakes record every call to a file. No network.
"""

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
SCRIPTS = ("gke_jobset.sh", "slurm_gpu.sbatch", "tpu_pod.sh", "local_multiprocess.sh", "wait_queued_resource.sh")
FAKES = ("gcloud", "kubectl", "srun", "sbatch", "scontrol")

# Arguments that a shell or a YAML writer would mangle if it quoted them wrong (no control characters:
# these also go through shlex, which does not read bash's $'...').
AWKWARD = ['--config.stages=("sft","dpo")', 'say "hi"', "it's", "two  words", "$HOME", "$(date)", "`date`",
           "back\\slash\\", "a;b&&c|d>e", "*", "~", "#not a comment", "", "é 日本 😀", "--dry-run"]
CONTROL = ["line\nbreak", "tab\there", "trailing newline\n"]

FAKE = r'''#!{python}
"""A fake {name}: records its arguments as a JSON line in $FAKE_LOG and behaves as the test asks."""
import json, os, shutil, sys

name, args = os.path.basename(sys.argv[0]), sys.argv[1:]
out = os.environ["FAKE_DIR"]
with open(os.environ["FAKE_LOG"], "a", encoding="utf-8") as log:
    log.write(json.dumps([name, *args]) + "\n")
if name == "gcloud" and "describe" in args and any(a.startswith("--format=") for a in args):
    states = os.environ.get("FAKE_QR_STATES", "ACTIVE").split(",")
    counter = os.path.join(out, "describe-count")
    n = int(open(counter).read()) if os.path.exists(counter) else 0
    open(counter, "w").write(str(n + 1))
    print(states[min(n, len(states) - 1)])
elif name == "gcloud" and "describe" in args:
    if os.environ.get("FAKE_EXISTS") != "1":
        sys.exit("ERROR: (gcloud) NOT_FOUND")
    print("state: READY")
elif name == "gcloud" and "scp" in args:
    for arg in args:
        if os.path.isfile(arg):
            shutil.copy(arg, os.path.join(out, "shipped-%d.tar.gz" % len(os.listdir(out))))
elif name == "kubectl" and args[-2:] == ["-f", "-"]:
    open(os.path.join(out, "kubectl-stdin"), "w", encoding="utf-8").write(sys.stdin.read())
elif name == "srun":
    sys.exit(int(os.environ.get("FAKE_SRUN_EXIT", "0")))
'''

# Stands in for a worker's ~/dpo_jax/.venv/bin/python: records its arguments, runs nothing.
FAKE_PYTHON = r'''#!{python}
import json, os, sys
with open(os.path.join(os.environ["HOME"], "python-calls"), "a", encoding="utf-8") as log:
    log.write(json.dumps(sys.argv[1:]) + "\n")
'''


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com",
                    "-c", "commit.gpgsign=false", *args], check=True, capture_output=True, timeout=60)


class Sandbox:
    """A git repository holding a copy of launch/, fake cluster tools on PATH, and a private TMPDIR."""

    def __init__(self, root):
        self.root = root
        self.repo = root / "repo"
        shutil.copytree(LAUNCH, self.repo / "launch")
        (self.repo / "dpo_jax").mkdir()
        (self.repo / "dpo_jax" / "__init__.py").write_text("")
        (self.repo / "configs").mkdir()
        (self.repo / "configs" / "quickstart.py").write_text("# a config\n")
        (self.repo / "setup.py").write_text("# committed\n")
        _git(self.repo, "init", "-q")
        _git(self.repo, "add", ".")
        _git(self.repo, "commit", "-q", "-m", "sandbox")
        (self.repo / "setup.py").write_text("# uncommitted\n")  # git archive ships HEAD, not this
        (self.repo / "untracked.txt").write_text("not shipped\n")
        self.bin = root / "bin"
        self.fake_dir = root / "fake"
        self.tmp = root / "tmp"
        for directory in (self.bin, self.fake_dir, self.tmp):
            directory.mkdir()
        for name in FAKES:
            path = self.bin / name
            path.write_text(FAKE.replace("{python}", sys.executable).replace("{name}", name))
            path.chmod(0o755)
        self.log = root / "calls.jsonl"
        self.env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "FAKE_"))}
        self.env.update(PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(self.log),
                        FAKE_DIR=str(self.fake_dir), TMPDIR=str(self.tmp))
        self.env.pop("DPO_JAX_PYTHON", None)
        self.env.pop("PROJECT", None)
        self.env.pop("TPU_RUNTIME_VERSION", None)

    def run(self, script, *args, env=None, stdin=None):
        return subprocess.run(["bash", str(self.repo / "launch" / script), *args], cwd=self.repo,
                              env={**self.env, **(env or {})}, input=stdin, capture_output=True, text=True,
                              timeout=60)

    def bash(self, script_text, env=None):
        """Runs `script_text` (e.g. a dry run's output) with bash, as if pasted into a shell."""
        return subprocess.run(["bash", "-c", script_text], cwd=self.repo, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=60)

    def calls(self):
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text(encoding="utf-8").splitlines()]

    def files(self):
        """Every path under the repository and TMPDIR with its size and modification time."""
        return {str(path): (path.stat().st_size, path.stat().st_mtime_ns)
                for top in (self.repo, self.tmp) for path in sorted(top.rglob("*"))}

    def shipped(self):
        return sorted(self.fake_dir.glob("shipped-*.tar.gz"))


@pytest.fixture
def sandbox(tmp_path):
    return Sandbox(tmp_path)


def _ok(result):
    assert result.returncode == 0, (result.returncode, result.stdout[-3000:], result.stderr[-3000:])
    return result


def _commands(dry_run_output):
    """The argument vectors a dry run's lines name: one command per line, `A >/dev/null 2>&1 || B` two."""
    commands = []
    for line in dry_run_output.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        words, current = shlex.split(line), []
        for word in words + ["||"]:
            if word == "||":
                commands.append(current)
                current = []
            elif word not in (">/dev/null", "2>&1"):
                current.append(word)
    return commands


def _expected_fake_calls(commands):
    """The calls the fakes record when the commands run: gcloud's own, and one `describe` per wait step."""
    calls = []
    for command in commands:
        if command[0] in FAKES:
            calls.append(command)
        elif command[0] == "bash" and command[1].endswith("/wait_queued_resource.sh"):
            options = dict(word.split("=", 1) for word in command[2:])
            calls.append(["gcloud", "compute", "tpus", "queued-resources", "describe", options["--name"],
                          f"--zone={options['--zone']}", "--format=value(state.state)"])
    return calls


def _tpu_args(*extra, slices=1):
    options = ["--name=pod", "--zone=us-central2-b", "--type=v4-16", f"--slices={slices}", *extra]
    return [*options, "--", "--config=configs/quickstart.py", "--workdir=gs://bucket/run"]


def _ssh_commands(calls, marker):
    return [call for call in calls if call[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
            and any(arg.startswith("--command=") and marker in arg for arg in call)]


def _remote_command(call):
    return next(arg for arg in call if arg.startswith("--command="))[len("--command="):]


# ---------------------------------------------------------------------------------------------- all scripts

@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_parses_and_prints_its_usage(script):
    assert subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, timeout=60).returncode == 0
    result = _ok(subprocess.run(["bash", str(LAUNCH / script), "--help"], capture_output=True, text=True,
                                timeout=60))
    assert ("--timeout=" if script == "wait_queued_resource.sh" else "--dry-run") in result.stdout


DRY_RUNS = {
    "gke": ("gke_jobset.sh", ["--image=img", "--tpu=tpu-v5-lite-podslice", "--topology=4x4", "--dry-run", "--",
                              "--config=c"]),
    "tpu": ("tpu_pod.sh", ["--name=n", "--zone=z", "--type=v5litepod-16", "--dry-run", "--", "--config=c"]),
    "tpu-slices": ("tpu_pod.sh", ["--name=n", "--zone=z", "--type=v5p-128", "--slices=2", "--poll-interval=1",
                                  "--dry-run", "--", "--config=c"]),
    "slurm": ("slurm_gpu.sbatch", ["--dry-run", "--", "--config=c", "--workdir=w"]),
    "local": ("local_multiprocess.sh", ["2", "--port", "1234", "--dry-run", "--", "python", "-m", "x"]),
    "local-first": ("local_multiprocess.sh", ["--dry-run", "--port=1234", "2", "--", "python", "-m", "x"]),
}


@pytest.mark.parametrize("case", sorted(DRY_RUNS))
def test_dry_run_given_last_prints_and_runs_nothing(sandbox, case):
    script, args = DRY_RUNS[case]
    before = sandbox.files()
    result = _ok(sandbox.run(script, *args, env={"SLURM_JOB_ID": "77"}))
    assert result.stdout.strip()
    assert sandbox.calls() == []  # no gcloud, kubectl, srun, sbatch or scontrol
    assert not (sandbox.repo / ".venv").exists()
    assert sandbox.files() == before  # nothing created or touched (no archive, no venv)


def test_slurm_options_go_before_the_separator(sandbox):
    # The old way (dpo_jax's flags first, --dry-run later) is refused before anything runs.
    result = sandbox.run("slurm_gpu.sbatch", "--config=c", "--dry-run")
    assert result.returncode == 2 and "after --" in result.stderr
    assert sandbox.calls() == [] and not (sandbox.repo / ".venv").exists()
    # After --, --dry-run is dpo_jax's: the dry run shows it passed on.
    result = _ok(sandbox.run("slurm_gpu.sbatch", "--dry-run", "--", "--config=c", "--dry-run"))
    assert "dpo_jax.main --config=c --dry-run" in result.stdout


# ---------------------------------------------------------------------------------------------------- GKE

def _container(manifest):
    return manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("args", [AWKWARD + CONTROL, ["--config=c", "--workdir=gs://b/r"], []])
def test_gke_manifest_holds_every_argument_exactly(sandbox, args):
    yaml = pytest.importorskip("yaml")
    extra = ["\u2028", "\x85", "\x7f", "\ufeff"]  # characters YAML reads as line breaks or refuses raw
    args = args + extra if args else args
    result = _ok(sandbox.run("gke_jobset.sh", "--image=gcr.io/p/dpo-jax:tpu", "--tpu=tpu-v5-lite-podslice",
                             "--topology=4x4", "--hosts=4", "--slices=2", "--chips-per-host=4", "--name=hh-run",
                             "--dry-run", "--", *args))
    manifest = yaml.safe_load(result.stdout)
    assert json.loads(result.stdout) == manifest  # JSON, which is YAML
    container = _container(manifest)
    assert container["args"] == args
    assert container["image"] == "gcr.io/p/dpo-jax:tpu"
    assert container["command"] == ["dpo-jax"]
    assert container["resources"]["limits"]["google.com/tpu"] == 4
    replicated = manifest["spec"]["replicatedJobs"][0]
    assert replicated["replicas"] == 2
    assert replicated["template"]["spec"]["parallelism"] == replicated["template"]["spec"]["completions"] == 4
    assert replicated["template"]["spec"]["template"]["spec"]["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice", "cloud.google.com/gke-tpu-topology": "4x4"}
    assert manifest["kind"] == "JobSet" and manifest["metadata"]["name"] == "hh-run"
    assert sandbox.calls() == []


def test_gke_applies_the_same_manifest_with_kubectl(sandbox):
    args = ["--config=c", "--dry-run", "it's \"x\""]  # --dry-run after -- is dpo_jax's, not the script's
    result = _ok(sandbox.run("gke_jobset.sh", "--image=img", "--tpu=t", "--topology=2x2", "--", *args))
    assert sandbox.calls() == [["kubectl", "apply", "-f", "-"]]
    applied = json.loads((sandbox.fake_dir / "kubectl-stdin").read_text(encoding="utf-8"))
    assert _container(applied)["args"] == args
    dry = sandbox.run("gke_jobset.sh", "--image=img", "--tpu=t", "--topology=2x2", "--dry-run", "--", *args)
    assert json.loads(dry.stdout) == applied, result.stderr


@pytest.mark.parametrize("option", ["--hosts=0", "--slices=two", "--name=Not_A_Name"])
def test_gke_refuses_invalid_options_before_kubectl(sandbox, option):
    result = sandbox.run("gke_jobset.sh", "--image=img", "--tpu=t", "--topology=2x2", option, "--", "--config=c")
    assert result.returncode != 0 and option.split("=")[0] in result.stderr
    assert sandbox.calls() == []


# ------------------------------------------------------------------------------------------------ TPU pod

@pytest.mark.parametrize("slices", [1, 2])
def test_tpu_pod_dry_run_pasted_into_bash_makes_exactly_the_printed_calls(sandbox, slices):
    args = _tpu_args("--poll-interval=0", "--wait-timeout=5", "--dry-run", slices=slices)
    args[-1:] = ["--workdir=gs://bucket/run", *AWKWARD]
    dry = _ok(sandbox.run("tpu_pod.sh", *args))
    assert sandbox.calls() == []
    commands = _commands(dry.stdout)
    assert all(command[0] in ("gcloud", "git", "rm", "bash") for command in commands), commands
    _ok(sandbox.bash(dry.stdout))  # describe fails (no TPU yet): create runs; the wait finds ACTIVE
    assert sandbox.calls() == _expected_fake_calls(commands)
    # The archive is HEAD of the sandbox repository: committed files only, the committed setup.py, removed after.
    shipped = sandbox.shipped()
    assert len(shipped) == slices
    with tarfile.open(shipped[0]) as archive:
        names = set(archive.getnames())
        assert {"setup.py", "launch/tpu_pod.sh", "configs/quickstart.py"} <= names
        assert "untracked.txt" not in names
        assert archive.extractfile("setup.py").read() == b"# committed\n"
    assert list(sandbox.tmp.iterdir()) == []
    # The run starts on every node with dpo_jax.main's arguments, once each.
    starts = _ssh_commands(sandbox.calls(), "dpo_jax.main")
    assert [call[5] for call in starts] == (["pod"] if slices == 1 else ["pod-0", "pod-1"])


def test_tpu_pod_queued_resource_is_active_before_anything_is_copied_or_started(sandbox):
    commands = _commands(_ok(sandbox.run("tpu_pod.sh", *_tpu_args("--dry-run", slices=2))).stdout)
    kinds = [(command[4] if command[3] == "tpu-vm" else command[3]) if command[0] == "gcloud" else
             {"bash": "wait", "git": "archive"}.get(command[0], command[0]) for command in commands]
    assert kinds[:3] == ["queued-resources", "queued-resources", "wait"]  # describe || create, then wait
    assert kinds.index("wait") < kinds.index("archive") < kinds.index("scp") < kinds.index("ssh")


def test_tpu_pod_waits_for_active_then_copies_and_starts(sandbox):
    result = _ok(sandbox.run("tpu_pod.sh", *_tpu_args("--poll-interval=0", "--wait-timeout=5", slices=2),
                             env={"FAKE_QR_STATES": "ACCEPTED,PROVISIONING,ACTIVE"}))
    calls = sandbox.calls()
    waits = [i for i, call in enumerate(calls) if "--format=value(state.state)" in call]
    copies = [i for i, call in enumerate(calls) if "scp" in call or "ssh" in call]
    assert len(waits) == 3 and copies and max(waits) < min(copies)
    assert calls[1][:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]  # describe failed first
    assert "--node-count=2" in calls[1]
    assert "PROVISIONING" in result.stderr and "ACTIVE" in result.stderr
    assert len(sandbox.shipped()) == 2 and list(sandbox.tmp.iterdir()) == []


@pytest.mark.parametrize("state", ["FAILED", "SUSPENDED"])
def test_tpu_pod_stops_with_an_error_when_the_queued_resource_cannot_become_active(sandbox, state):
    result = sandbox.run("tpu_pod.sh", *_tpu_args("--poll-interval=0", "--wait-timeout=5", slices=2),
                         env={"FAKE_QR_STATES": f"PROVISIONING,{state}"})
    assert result.returncode != 0
    assert f"is {state}" in result.stderr and "queued-resources delete pod" in result.stderr
    assert not any("scp" in call or "ssh" in call for call in sandbox.calls())
    assert sandbox.shipped() == [] and list(sandbox.tmp.iterdir()) == []


def test_tpu_pod_wait_times_out(sandbox):
    result = sandbox.run("tpu_pod.sh", *_tpu_args("--wait-timeout=0", "--poll-interval=0", slices=2),
                         env={"FAKE_QR_STATES": "WAITING_FOR_RESOURCES"})
    assert result.returncode != 0 and "timeout" in result.stderr
    assert not any("scp" in call or "ssh" in call for call in sandbox.calls())


def _worker(sandbox, home, shipped):
    """Plays one worker: the copied archive lands in ~, then the install and start commands run there."""
    calls = sandbox.calls()
    shutil.copy(shipped, home / "dpo_jax.tar.gz")
    [install] = _ssh_commands(calls, "pip install")
    [start] = _ssh_commands(calls, "dpo_jax.main")
    env = {**sandbox.env, "HOME": str(home)}
    _ok(subprocess.run(["sh", "-c", _remote_command(install)], cwd=home, env=env, capture_output=True, text=True,
                       timeout=60))
    _ok(subprocess.run(["sh", "-c", _remote_command(start)], cwd=home, env=env, capture_output=True, text=True,
                       timeout=60))
    record, deadline = home / "python-calls", time.monotonic() + 20
    while time.monotonic() < deadline and record.read_text().count("dpo_jax.main") < 1:
        time.sleep(0.05)  # the start command runs the process in the background
    return [json.loads(line) for line in record.read_text().splitlines()]


def test_tpu_pod_rerun_reuses_the_tpu_and_replaces_the_code_without_nesting(sandbox, tmp_path):
    home = tmp_path / "worker-home"
    venv_python = home / "dpo_jax" / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(FAKE_PYTHON.replace("{python}", sys.executable))
    venv_python.chmod(0o755)
    (home / "python-calls").write_text("")
    args = _tpu_args()
    args[-1:] = [*AWKWARD, *CONTROL]
    for attempt in range(2):
        sandbox.log.unlink(missing_ok=True)
        for shipped in sandbox.shipped():
            shipped.unlink()
        result = _ok(sandbox.run("tpu_pod.sh", *args, env={"FAKE_EXISTS": "1"}))
        assert "reusing the TPU pod" in result.stderr
        assert not any("create" in call for call in sandbox.calls())
        (home / "python-calls").write_text("")
        python_calls = _worker(sandbox, home, sandbox.shipped()[0])
        # The install reuses the venv (no `-m venv`), and dpo_jax.main gets every argument exactly.
        assert python_calls[0] == ["-m", "pip", "install", "-q", "-e", "./src[tpu]"]
        assert python_calls[1] == ["-m", "dpo_jax.main", *args[args.index("--") + 1:]]
        assert (home / "dpo_jax" / "src" / "setup.py").read_text() == "# committed\n"
        assert sorted(p.name for p in (home / "dpo_jax").iterdir()) == [".venv", "run.log", "src"]
        assert not (home / "dpo_jax" / "src" / "src").exists() and not (home / "dpo_jax.tar.gz").exists()
        assert (home / "dpo_jax" / "run.log").read_text().count("=== ") == attempt + 1  # appended, not replaced
        assert not (home / "dpo_jax" / "src" / "stale.py").exists()
        (home / "dpo_jax" / "src" / "stale.py").write_text("")  # the rerun replaces the old copy entirely


def test_tpu_pod_creates_a_missing_tpu_and_needs_its_options(sandbox):
    _ok(sandbox.run("tpu_pod.sh", *_tpu_args("--project=my-proj")))
    create = sandbox.calls()[1]
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod", "--zone=us-central2-b",
                      "--project=my-proj", "--accelerator-type=v4-16", "--version=v2-alpha-tpuv5-lite"]
    assert all("--project=my-proj" in call for call in sandbox.calls())
    missing = sandbox.run("tpu_pod.sh", "--name=pod", "--dry-run", "--", "--config=c")
    assert missing.returncode == 2 and "required" in missing.stderr
    unknown = sandbox.run("tpu_pod.sh", "--name=pod", "--zone=z", "--type=t", "--config=c")
    assert unknown.returncode == 2 and "after --" in unknown.stderr


# -------------------------------------------------------------------------------------------------- SLURM

@pytest.mark.parametrize("exit_code,requeued", [(4, True), (3, True), (0, False), (1, False), (137, False)])
def test_slurm_requeues_on_preemption_and_halt_only(sandbox, exit_code, requeued):
    args = ["--config=configs/quickstart.py", "--workdir=/shared/run", *AWKWARD, *CONTROL]
    result = sandbox.run("slurm_gpu.sbatch", "--", *args,
                         env={"SLURM_JOB_ID": "4242", "FAKE_SRUN_EXIT": str(exit_code),
                              "DPO_JAX_PYTHON": sys.executable})
    assert result.returncode == exit_code, result.stderr
    srun = ["srun", "--kill-on-bad-exit=0", sys.executable, "-m", "dpo_jax.main", *args]
    assert sandbox.calls() == [srun] + ([["scontrol", "requeue", "4242"]] if requeued else [])
    assert not (sandbox.repo / ".venv").exists()  # DPO_JAX_PYTHON: no venv, no pip
    if requeued:
        assert "resumes" in result.stderr and "sbatch launch/slurm_gpu.sbatch -- --config=" in result.stderr


def test_slurm_directives_requeue_and_signal_the_job_steps():
    lines = (LAUNCH / "slurm_gpu.sbatch").read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    directives = [line.split(None, 1)[1] for line in lines if line.startswith("#SBATCH")]
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH"))  # sbatch reads these
    assert "--requeue" in directives and "--open-mode=append" in directives
    assert "--signal=TERM@300" in directives  # not B:TERM, which would signal only the batch shell


# ------------------------------------------------------------------------------------------ local processes

def test_local_multiprocess_dry_run_is_position_independent_and_runnable(sandbox):
    expected = [f"JAX_COORDINATOR_ADDRESS=localhost:1234 JAX_NUM_PROCESSES=3 JAX_PROCESS_ID={i} python -m x 'a b'"
                for i in range(3)]
    for options in (["3", "--dry-run", "--port", "1234"], ["--dry-run", "3", "--port=1234"],
                    ["--port", "1234", "3", "--dry-run"]):
        result = _ok(sandbox.run("local_multiprocess.sh", *options, "--", "python", "-m", "x", "a b"))
        assert result.stdout.splitlines() == expected
    show = "import os, sys; print(os.environ['JAX_PROCESS_ID'], os.environ['JAX_NUM_PROCESSES'], sys.argv[1:])"
    dry = _ok(sandbox.run("local_multiprocess.sh", "2", "--dry-run", "--", sys.executable, "-c", show, *AWKWARD))
    pasted = _ok(sandbox.bash(dry.stdout))
    assert pasted.stdout.splitlines() == [f"{i} 2 {AWKWARD}" for i in range(2)]
    real = _ok(sandbox.run("local_multiprocess.sh", "2", "--", sys.executable, "-c", show, "a b"))
    assert sorted(real.stdout.splitlines()) == ["[0] 0 2 ['a b']", "[1] 1 2 ['a b']"]
    assert sandbox.run("local_multiprocess.sh", "--dry-run", "--", "python").returncode == 2


# ------------------------------------------------------------------------------------------------ Dockerfile

DOCKER_INSTRUCTIONS = {"FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "ENTRYPOINT", "CMD", "LABEL",
                       "USER", "EXPOSE", "VOLUME", "SHELL", "STOPSIGNAL", "HEALTHCHECK", "ONBUILD"}


def _dockerfile():
    """(instruction, arguments) pairs: comments dropped, backslash-continued lines joined."""
    instructions, pending = [], ""
    for line in (LAUNCH / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, rest = pending.strip().partition(" ")
        instructions.append((keyword, rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def _setup_py():
    tree = ast.parse((REPO / "setup.py").read_text())
    values = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
              if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
              and node.targets[0].id in ("EXTRAS_REQUIRE",)}
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "attr", "")
                == "setup")
    keywords = {k.arg: k.value for k in call.keywords}
    return values["EXTRAS_REQUIRE"], ast.literal_eval(keywords["entry_points"])


def test_dockerfile_instructions_stages_and_entrypoint():
    instructions = _dockerfile()
    assert all(keyword in DOCKER_INSTRUCTIONS for keyword, _ in instructions), instructions
    args = dict(rest.split("=", 1) for keyword, rest in instructions if keyword == "ARG" and "=" in rest)
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(froms) == 2 and froms[0].endswith(" AS build")
    assert all(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], f.split()[0]) == "python:3.11-slim" for f in froms)
    build = instructions[:[i for i, (k, _) in enumerate(instructions) if k == "FROM"][1]]
    assert any(k == "RUN" and "pip wheel" in rest and "--no-deps" in rest for k, rest in build)
    _, entry_points = _setup_py()
    scripts = [spec.split("=")[0].strip() for spec in entry_points["console_scripts"]]
    [entrypoint] = [json.loads(rest) for keyword, rest in instructions if keyword == "ENTRYPOINT"]
    assert entrypoint == ["dpo-jax"] and "dpo-jax" in scripts


def test_dockerfile_accelerator_extras_exist_in_setup_py():
    extras, _ = _setup_py()
    instructions = _dockerfile()
    [default] = [rest.split("=", 1)[1] for keyword, rest in instructions if keyword == "ARG"
                 and rest.startswith("ACCELERATOR=")]
    [install] = [rest for keyword, rest in instructions if keyword == "RUN" and "pip install" in rest]
    allowed = re.search(r'case "\$ACCELERATOR" in ([\w|]+)\)', install).group(1).split("|")
    assert set(allowed) == {"tpu", "cuda"} and set(allowed) <= set(extras) and default in allowed
    assert '[$ACCELERATOR]"' in install and "/wheels/dpo_jax-" in install


def test_dockerfile_copies_paths_that_exist_in_the_repository():
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True,
                             timeout=60).stdout.splitlines()
    ignored = [line for line in (LAUNCH / "Dockerfile.dockerignore").read_text().splitlines()
               if line and not line.startswith("#")]
    stages = {rest.split()[-1] for keyword, rest in _dockerfile() if keyword == "FROM" and " AS " in rest}
    sources = []
    for keyword, rest in _dockerfile():
        if keyword in ("COPY", "ADD"):
            words = rest.split()
            if words[0].startswith("--from="):
                assert words[0].split("=", 1)[1] in stages
                continue
            sources += words[:-1]
    assert {"setup.py", "README.md", "dpo_jax", "configs"} <= set(sources)  # setup.py reads README.md
    for source in sources:
        assert (REPO / source).exists(), source
        assert any(path == source or path.startswith(source + "/") for path in tracked), source
        assert source not in ignored


# ---------------------------------------------------------------------------------------------- the page

def test_the_launch_page_shows_each_script_with_a_dry_run():
    page = (REPO / "docs" / "launch.md").read_text()
    for fragment in ("bash launch/tpu_pod.sh", "docker build -f launch/Dockerfile", "docker push",
                     "bash launch/gke_jobset.sh", "sbatch", "launch/slurm_gpu.sbatch", "--dry-run",
                     "--workdir=gs://", "exit code 3", "exit code 4"):
        assert fragment in page, fragment
