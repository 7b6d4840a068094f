"""Several JAX processes on this machine, as on several hosts: multi-host semantics on one box.

    python -m sftmix_jax.launch --processes 2 --devices-per-process 2 -- --config configs/tiny.py --workdir DIR

Starts N copies of `python -m sftmix_jax.main ARGS` on the CPU backend, each with D simulated
devices and the variables a cluster launcher would set (JAX_COORDINATOR_ADDRESS on 127.0.0.1,
JAX_NUM_PROCESSES, JAX_PROCESS_ID), so the run is one global mesh of N x D devices and every
collective crosses processes (over gloo). Each output line is prefixed with its process index.

Ctrl-C or SIGTERM here sends SIGTERM to every process: they save one checkpoint at a common step
and exit; rerun the same command to resume. When a process fails, the others stop on their own
within main's --heartbeat_timeout; past --grace seconds the launcher kills what is left. The exit
status is the first failing process's (0 when all succeed).
"""
import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(index: int, processes: int, devices: int, port: int) -> dict:
    """The environment of process `index`: CPU backend, D devices, the three JAX_* variables."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).strip()
    env.update(XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip(), JAX_PLATFORMS="cpu",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
               JAX_PROCESS_ID=str(index), PYTHONUNBUFFERED="1")
    return env


def _pump(index: int, stream, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"[p{index}] {line}")
        out.flush()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sftmix_jax.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", "-n", type=int, default=2, help="JAX processes (simulated hosts)")
    p.add_argument("--devices-per-process", "-d", type=int, default=1, help="CPU devices in each process")
    p.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (0: a free one)")
    p.add_argument("--module", default="sftmix_jax.main", help="the program each process runs (python -m)")
    p.add_argument("--grace", type=float, default=120.0,
                   help="seconds the others may take to stop after one fails, before they are killed")
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then the program's arguments")
    return p


def _wait(procs, grace: float):
    """Until every process has ended; after the first failure the others get `grace` seconds to
    stop on their own, then are killed. Returns the index of the first to fail, or None."""
    first_failure, failed_at = None, None
    while [q.poll() for q in procs].count(None):
        for i, q in enumerate(procs):
            if q.returncode not in (None, 0) and first_failure is None:
                first_failure, failed_at = i, time.time()
                print(f"launch: process {i} exited with {_describe(q.returncode)}; waiting up to {grace:.0f} s "
                      "for the others to stop", flush=True)
        if failed_at is not None and time.time() - failed_at > grace:
            for i, q in enumerate(procs):
                if q.poll() is None:
                    print(f"launch: process {i} still running {grace:.0f} s after process {first_failure} "
                          "failed: killing it", flush=True)
                    q.kill()
        time.sleep(0.1)
    return first_failure


def main(argv=None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    if a.processes < 1 or a.devices_per_process < 1:
        p.error("--processes and --devices-per-process must be >= 1")
    port = a.port or free_port()
    procs, pumps = [], []
    for i in range(a.processes):
        # Own session: a Ctrl-C reaches the launcher only, which turns it into one SIGTERM each.
        proc = subprocess.Popen([sys.executable, "-u", "-m", a.module, *args], text=True, start_new_session=True,
                                env=process_env(i, a.processes, a.devices_per_process, port),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(proc)
        pumps.append(threading.Thread(target=_pump, args=(i, proc.stdout, sys.stdout), daemon=True))
        pumps[-1].start()
    print(f"launch: {a.processes} processes x {a.devices_per_process} devices, coordinator 127.0.0.1:{port}, "
          f"pids {' '.join(f'p{i}={q.pid}' for i, q in enumerate(procs))}", flush=True)
    signals = []

    def forward(signum, frame):
        signals.append(signum)
        how = signal.SIGTERM if len(signals) == 1 else signal.SIGKILL
        print(f"launch: signal {signum}: sending {how.name} to every process"
              + (" (they save a checkpoint and stop; again to kill)" if how == signal.SIGTERM else ""), flush=True)
        for q in procs:
            if q.poll() is None:
                q.send_signal(how)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        first_failure = _wait(procs, a.grace)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    for t in pumps:
        t.join(timeout=5)
    codes = [q.returncode for q in procs]
    if first_failure is None:
        first_failure = next((i for i, c in enumerate(codes) if c), None)
    print(f"launch: exit codes: {', '.join(f'p{i} {_describe(c)}' for i, c in enumerate(codes))}", flush=True)
    if first_failure is None:
        return 0
    code = codes[first_failure]
    return code if code > 0 else 128 - code  # killed by signal N: 128 + N, as a shell reports it


def _describe(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"status {code}"


if __name__ == "__main__":
    sys.exit(main())
