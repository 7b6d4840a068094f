"""tpu/ scripts (and slurm/, tools/): valid bash, shellcheck-clean where shellcheck exists, dry runs."""
import os
import shutil
import subprocess

import pytest

from conftest import ROOT

SCRIPTS = ["create", "setup", "launch", "logs", "teardown"]
ARGS = {"launch": ["configs/paper.py:llama31_8b_alpaca", "gs://BUCKET/run"]}


@pytest.mark.parametrize("name", SCRIPTS)
def test_dry_run_prints_complete_gcloud_commands(name):
    path = os.path.join(ROOT, "tpu", f"{name}.sh")
    subprocess.run(["bash", "-n", path], check=True)
    env = {**os.environ, "PROJECT": "my-project"}
    out = subprocess.run(["bash", path, "--dry-run", *ARGS.get(name, [])], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    commands = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("+ gcloud")]
    assert commands, out.stdout + out.stderr
    for line in commands:
        assert "--project=my-project" in line and "--zone=" in line, line


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_is_clean():
    paths = [os.path.join(ROOT, "tpu", f"{n}.sh") for n in SCRIPTS + ["common"]]
    paths += [os.path.join(ROOT, "slurm", "sftmix.sbatch"), os.path.join(ROOT, "tools", "gpu_check.sh")]
    out = subprocess.run(["shellcheck", *paths], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
