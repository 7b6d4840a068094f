"""Several JAX processes, one per host: how they start, agree, wait for each other and fail.

Every process runs the same program over one global mesh. Process 0 (the leader) alone writes
the workdir's shared files (config.json, done.json, scores.jsonl, HF exports, reports); a
`barrier` after each write lets the others read it. Decisions that depend on files (which
stage to skip, which cache to read) are taken by the leader and broadcast (`agree`), so every
process runs the same collectives in the same order. Orbax checkpoints are written by all.

A process that dies takes the others with it, instead of leaving them in a collective forever:
the coordination service stops a run whose member misses heartbeats for `heartbeat_timeout`
seconds (or at once when the leader, which hosts it, dies), and `fail_fast` turns a Python
exception into that same prompt exit.
"""
import json
import logging as std_logging
import os
import sys
import time
import traceback

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

# What a collective raises when a peer has gone (gloo on CPU; NCCL and gRPC elsewhere).
COLLECTIVE_ERRORS = ("Gloo", "NCCL", "Connection reset", "Socket closed", "connection closed")
ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def launch_source(env=os.environ) -> str | None:
    """Where this process's place in a multi-process run comes from; None: a single process.

    'environment': the three JAX_* variables (sftmix_jax.launch, slurm/sftmix.sbatch, any
    launcher); 'SLURM': srun's task variables; 'TPU metadata': a Cloud TPU VM of a pod slice.
    """
    if any(v in env for v in ENV_VARS):
        missing = [v for v in ENV_VARS if v not in env]
        if missing and "SLURM_PROCID" not in env:
            raise ValueError(f"a multi-process run needs all of {', '.join(ENV_VARS)}; {', '.join(missing)} "
                             "not set (JAX reads only the coordinator address from the environment)")
        return "environment" if not missing else "SLURM"
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return "SLURM"
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return "TPU metadata"
    return None


def initialize(heartbeat_timeout: int = 30, env=os.environ) -> str:
    """jax.distributed.initialize() for multi-process runs; returns a line for the log."""
    source = launch_source(env)
    if source is None:
        return "single process"
    if not jax.distributed.is_initialized():
        kw = {}
        if source == "environment":
            kw = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"], num_processes=int(env["JAX_NUM_PROCESSES"]),
                      process_id=int(env["JAX_PROCESS_ID"]))
        jax.distributed.initialize(**kw, heartbeat_timeout_seconds=heartbeat_timeout)
    return (f"process {jax.process_index()} of {jax.process_count()} (from {source}), "
            f"{jax.local_device_count()} of {jax.device_count()} devices here; a process silent for "
            f"{heartbeat_timeout} s stops the run")


def is_leader() -> bool:
    return jax.process_index() == 0


def write_atomic(path, text: str) -> None:
    """Write to a temporary name, then rename: readers (other processes too) never see half a file."""
    from etils import epath

    tmp = epath.Path(str(path) + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def agree(value):
    """The leader's value (anything JSON can hold), on every process."""
    if jax.process_count() == 1:
        return value
    data = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_leader() else np.zeros(0, np.uint8)
    n = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    buf = np.zeros(n, np.uint8)
    buf[: data.size] = data
    return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))).decode())


def all_ok(ok: bool) -> bool:
    """True on every process when `ok` holds on every process."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def fetch(x) -> np.ndarray:
    """A global array as one host NumPy array, on every process, even when sharded across hosts."""
    if jax.process_count() == 1 or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class AgreedExit(SystemExit):
    """An exit that every process takes at the same point (a refused workdir, a preemption):
    JAX's normal shutdown works, so `fail_fast` lets it through."""


class _ProcessPrefix(std_logging.Filter):
    def __init__(self, prefix):
        super().__init__()
        self.prefix = prefix

    def filter(self, record):
        if not getattr(record, "_process_prefixed", False):
            record.msg, record._process_prefixed = f"{self.prefix}{record.msg}", True
        return True


def label_logs() -> None:
    """Prefix every log line with this process's index when there are several."""
    if jax.process_count() > 1:
        prefix = _ProcessPrefix(f"[process {jax.process_index()}/{jax.process_count()}] ")
        logging.get_absl_logger().addFilter(prefix)  # ours, whichever handler prints them
        logging.get_absl_handler().addFilter(prefix)  # other libraries' through absl's handler


def fail_fast(exc: BaseException, heartbeat_timeout: int = 30) -> None:
    """On several processes, an exception leaves this one at once and without JAX's shutdown
    barrier (which would wait for processes still inside a collective): the coordination
    service then stops the others within the heartbeat timeout, naming this process."""
    if jax.process_count() == 1 or not jax.distributed.is_initialized():
        return
    if isinstance(exc, AgreedExit):
        return
    text = "".join(traceback.format_exception(exc))
    if any(s in str(exc) for s in COLLECTIVE_ERRORS):  # most likely another process died: let JAX name it
        wait = heartbeat_timeout + 10
        logging.error("process %d: a collective failed (%s); another process has probably died. Waiting up "
                      "to %d s for the coordination service to name it, then exiting.", jax.process_index(),
                      str(exc).splitlines()[0][:300], wait)
        time.sleep(wait)  # JAX's error poller normally ends this process first (SIGABRT), naming the lost one
    logging.error("process %d failed; ending it so that the other processes stop too:\n%s", jax.process_index(), text)
    sys.stdout.flush()
    sys.stderr.flush()
    std_logging.shutdown()
    os._exit(exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) and exc.code else 1)
