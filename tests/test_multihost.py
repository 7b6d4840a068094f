"""Real multi-process runs: `python -m sftmix_jax.launch` starts several `sftmix_jax.main`
processes on 127.0.0.1 (collectives over gloo), checked against one process with as many
devices; a SIGTERM and a SIGKILL mid-run, then the resumed run against an uninterrupted one."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import ROOT
from sftmix_jax import multihost

# 60 steps a stage: long enough for every stage to do real work, short enough that float32
# reduction order (one process vs two) stays far below the tolerance (README: divergence).
SHORT = ["--config.model.source=init", "--config.train.lr=3e-3", "--config.train.steps=60", "--config.train.save_every=10", "--config.train.eval_every=30",
         "--config.data.synthetic.num_train=320", "--config.data.synthetic.num_eval=32",
         "--config.train.batch_size=16", "--config.evaluate.max_new_tokens=8"]
# fsdp spans the two processes: weights and optimizer state are sharded across hosts.
MESH = ["--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
QUESTIONS = [dict(id="q0", question="Add: 2+2", choices=["3", "4", "5"], answer=1),
             dict(id="q1", question="Upper-case: ab", choices=["AB", "ab", "Ab"], answer=0),
             dict(id="q2", question="Reverse: abc", choices=["abc", "bca", "cba"], answer=2)]
HEARTBEAT = 10  # seconds; the default (30) is for real clusters
ENV = dict(os.environ, XLA_FLAGS="")  # the launcher sets each process's device count


def main_args(workdir, questions):
    return ["--config", os.path.join(ROOT, "configs", "tiny.py"), "--workdir", workdir, *SHORT, *MESH,
            f"--config.evaluate.multiple_choice.source={questions}", f"--heartbeat_timeout={HEARTBEAT}"]


def launch(workdir, questions, log, *extra):
    """The launcher in the background, its output (every process's, prefixed) going to `log`."""
    cmd = [sys.executable, "-m", "sftmix_jax.launch", "--processes", "2", "--devices-per-process", "2", "--",
           *main_args(workdir, questions), *extra]
    return subprocess.Popen(cmd, env=ENV, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT)


def wait_for(path, proc, timeout=300):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, f"the run ended before {path} appeared"
        assert time.time() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    path = tmp_path_factory.mktemp("mc") / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return str(path)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, questions):
    """The whole pipeline as 2 processes x 2 devices; returns (workdir, output)."""
    d = str(tmp_path_factory.mktemp("two_processes"))
    proc = launch(d, questions, d + ".log")
    assert proc.wait(timeout=600) == 0, open(d + ".log").read()[-4000:]
    return d, open(d + ".log").read()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, questions):
    """The same pipeline as 1 process x 4 devices, the same mesh shape."""
    d = str(tmp_path_factory.mktemp("one_process"))
    out = subprocess.run([sys.executable, "-m", "sftmix_jax.main", *main_args(d, questions)], cwd=ROOT,
                         env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4"),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return d


def numbers(tree, prefix=""):
    """Every number of a nested dict, by dotted key."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in numbers(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): float(tree)}


def summary(workdir):
    return numbers(json.load(open(os.path.join(workdir, "summary.json")))["results"])


def weights(workdir, stage):
    return load_file(os.path.join(workdir, stage, "hf", "model.safetensors"))


def test_two_processes_equal_one(two_processes, one_process):
    workdir, out = two_processes
    a, b = summary(workdir), summary(one_process)
    assert a.keys() == b.keys()
    for key in ("multiple_choice.acc", "exact_match.all", "loss"):  # evaluation ran every kind of scoring
        assert f"SFTMix.{key}" in a
    assert max(abs(a[k] - b[k]) for k in a) <= 1e-3, {k: (a[k], b[k]) for k in a}
    rows = [[json.loads(line) for line in open(os.path.join(d, "confidence", "scores.jsonl"))]
            for d in (workdir, one_process)]  # the replay: every example's perplexity per checkpoint
    assert [r["id"] for r in rows[0]] == [r["id"] for r in rows[1]]
    np.testing.assert_allclose([r["perplexity"] for r in rows[0]], [r["perplexity"] for r in rows[1]], rtol=1e-3)
    for stage in ("reference", "sftmix"):  # HF exports of weights sharded across the processes
        wa, wb = weights(workdir, stage), weights(one_process, stage)
        assert max(float(np.abs(wa[k] - wb[k]).max()) for k in wa) <= 1e-3
    # Each process says where its place came from and labels its lines; process 0 alone reports.
    assert "process 1 of 2 (from environment), 2 of 4 devices here" in out
    assert re.search(r"\[p1\] .*\[process 1/2\] stage sftmix: running", out)
    rows = open(os.path.join(workdir, "evaluate", "multiple_choice_sftmix.jsonl")).read().splitlines()
    assert len(rows) == len(QUESTIONS)


def test_sigterm_then_sigkill_then_resume(tmp_path, two_processes, questions):
    """SIGTERM: every process saves at one step and exits with the resume message. SIGKILL of
    process 1: process 0 stops on its own within the heartbeat bound, naming it. The rerun
    finishes with the uninterrupted run's parameters (the reference stage: the one hit)."""
    workdir, log = str(tmp_path / "run"), str(tmp_path / "run.log")
    ckpts = os.path.join(workdir, "reference", "checkpoints")
    reference = "--config.stages=reference"

    proc = launch(workdir, questions, log, reference)
    wait_for(os.path.join(ckpts, "10", "params"), proc)
    proc.send_signal(signal.SIGTERM)  # the launcher passes it to every process
    assert proc.wait(timeout=120) != 0
    out = open(log).read()
    stops = re.findall(r"\[p(\d)\] reference: stopped by a signal after step (\d+).*Rerun the same command", out)
    assert sorted(p for p, _ in stops) == ["0", "1"] and len({s for _, s in stops}) == 1, out[-3000:]
    assert os.path.exists(os.path.join(ckpts, stops[0][1], "params"))

    proc = launch(workdir, questions, log, reference)
    wait_for(os.path.join(ckpts, "40", "params"), proc)
    victim = int(re.search(r"pids p0=\d+ p1=(\d+)", open(log).read()).group(1))
    os.kill(victim, signal.SIGKILL)
    killed = time.time()
    assert proc.wait(timeout=120) != 0
    assert time.time() - killed < 6 * HEARTBEAT  # not the launcher's --grace (120 s): JAX stopped process 0
    out = open(log).read()
    # Process 0 ends one of two ways, both naming process 1: JAX's heartbeat monitor aborts it, or
    # (when the loss falls inside a checkpoint save) orbax's barrier raises and fail_fast exits.
    assert re.search(r"launch: exit codes: p0 (signal SIGABRT|status 1), p1 signal SIGKILL", out), out[-3000:]
    assert re.search(r"\[p0\] .*(tasks are unhealthy \(stopped sending heartbeats\)|Task 1 heartbeat timeout)", out)

    proc = launch(workdir, questions, log, reference)
    assert proc.wait(timeout=600) == 0, open(log).read()[-4000:]
    assert re.search(r"\[process 0/2\] reference: resuming from step 40", open(log).read())
    a, b = weights(workdir, "reference"), weights(two_processes[0], "reference")
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6
    done = [json.load(open(os.path.join(d, "reference", "done.json"))) for d in (workdir, two_processes[0])]
    assert done[0] == done[1]  # the same held-out metrics at the end


def test_helpers_across_processes_and_an_exception_in_one(tmp_path):
    """agree / all_ok / fetch / barrier over 2 real processes; then process 1 raises while process 0
    waits in a barrier: both exit non-zero within the heartbeat bound, process 0 naming process 1."""
    cmd = [sys.executable, "-m", "sftmix_jax.launch", "-n", "2", "-d", "2", "--module", "multihost_worker", "--", "5"]
    t = time.time()
    out = subprocess.run(cmd, env=dict(ENV, PYTHONPATH=os.path.dirname(__file__)), capture_output=True, text=True,
                         cwd=ROOT, timeout=180).stdout
    assert time.time() - t < 60, out[-3000:]
    assert "[p0] process 0: checks passed" in out and "[p1] process 1: checks passed" in out, out[-3000:]
    assert re.search(r"\[p1\] .*\[process 1/2\] process 1 failed; ending it", out)
    assert "RuntimeError: injected failure in process 1" in out
    assert re.search(r"launch: exit codes: p0 (signal SIGABRT|status 1), p1 status 1", out), out[-3000:]
    assert re.search(r"\[p0\] .*(tasks are unhealthy \(stopped sending heartbeats\):\s*\[p0\] 1\b"
                     r"|Task 1 heartbeat timeout)", out), out[-3000:]


# ----------------------------------------------------------------------------------------
# Where a process's place comes from
# ----------------------------------------------------------------------------------------
def test_launch_source():
    assert multihost.launch_source({}) is None
    assert multihost.launch_source(dict(JAX_COORDINATOR_ADDRESS="h:1", JAX_NUM_PROCESSES="2",
                                        JAX_PROCESS_ID="1")) == "environment"
    assert multihost.launch_source(dict(SLURM_NTASKS="4", SLURM_PROCID="2")) == "SLURM"
    assert multihost.launch_source(dict(SLURM_NTASKS="1", SLURM_PROCID="0")) is None
    assert multihost.launch_source(dict(TPU_WORKER_HOSTNAMES="w0,w1")) == "TPU metadata"
    assert multihost.launch_source(dict(TPU_WORKER_HOSTNAMES="w0")) is None
    # The address alone (JAX reads only that one from the environment): name what is missing.
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES, JAX_PROCESS_ID not set"):
        multihost.launch_source(dict(JAX_COORDINATOR_ADDRESS="h:1"))


def test_launcher_environment():
    from sftmix_jax import launch

    env = launch.process_env(1, 4, 2, 1234)
    assert (env["JAX_COORDINATOR_ADDRESS"], env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("127.0.0.1:1234", "4", "1")
    assert env["XLA_FLAGS"].endswith("--xla_force_host_platform_device_count=2")
    assert env["XLA_FLAGS"].count("device_count") == 1  # conftest's 8 replaced, not added to
    assert env["JAX_PLATFORMS"] == "cpu"
