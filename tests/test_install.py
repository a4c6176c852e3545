"""The package stands alone: a wheel installed into a fresh virtualenv runs from outside the repository.

The fresh virtualenv gets the wheel (no editable install, no repository on its path) and borrows
the dependencies of the test environment through a path file, so the test downloads nothing. The
test environment's own editable install of dpo_jax is a path file there too, which a borrowed path
does not process: the only dpo_jax the fresh environment can import is the wheel's.
"""

import glob
import json
import os
import site
import subprocess
import sys
import venv

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of a fresh venv with the wheel installed, a scratch directory outside the repository)."""
    root = tmp_path_factory.mktemp("install")
    wheels = root / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(wheels), REPO], check=True, capture_output=True, text=True)
    (wheel,) = glob.glob(str(wheels / "dpo_jax-*.whl"))
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=False)
    python = str(env_dir / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(purelib, "test_environment.pth"), "w", encoding="utf-8") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--quiet",
                    wheel], check=True, capture_output=True, text=True)
    scratch = root / "elsewhere"
    scratch.mkdir()
    return python, str(scratch)


def _run(command, cwd, **kwargs):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, **kwargs)


def test_the_installed_package_is_the_wheel_not_the_checkout(installed):
    python, scratch = installed
    result = _run([python, "-c", "import dpo_jax, dpo_jax.train, dpo_jax.bench, dpo_jax.steps, dpo_jax.ppo; "
                   "print(dpo_jax.__file__)"], scratch)
    assert result.returncode == 0, result.stderr[-3000:]
    location = result.stdout.strip()
    assert not location.startswith(REPO) and "site-packages" in location, location


def test_console_script_help_lists_the_flags(installed):
    python, scratch = installed
    result = _run([os.path.join(os.path.dirname(python), "dpo-jax"), "--help"], scratch)
    assert result.returncode == 0, result.stderr[-3000:]
    for flag in ("--config", "--workdir", "--halt_after_steps", "--coordinator_address"):
        assert flag in result.stdout, result.stdout[-3000:]


def test_quickstart_runlocal_by_path_then_export(installed):
    python, scratch = installed
    workdir, out = os.path.join(scratch, "run"), os.path.join(scratch, "hf")
    config = os.path.join(REPO, "configs", "quickstart.py") + ":runlocal"
    result = _run([os.path.join(os.path.dirname(python), "dpo-jax"), f"--config={config}", f"--workdir={workdir}",
                   "--config.sft.num_steps=2", "--config.dpo.num_steps=2"], scratch)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["sft"]["steps"] == 2 and summary["dpo"]["steps"] == 2
    result = _run([python, "-m", "dpo_jax.export", f"--workdir={workdir}", f"--out={out}"], scratch)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["model_type"] == "gpt2"
    assert glob.glob(os.path.join(out, "*.safetensors"))
