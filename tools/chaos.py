"""Chaos: kill the pipeline with SIGKILL at random moments, rerun, and compare with a clean run.

    python tools/chaos.py --kills 10 [--config configs/tiny.py] [--workdir /tmp/chaos]

Runs the whole pipeline once uninterrupted, then again under fire: each attempt is killed
after a random delay, or the moment a checkpoint write is seen in progress, until at least
--kills kills have landed and a final attempt completes. Every stage gets hit (delays are
drawn over the whole run's length). Passes when the SFTMix parameters, scores.jsonl and
summary.json equal the uninterrupted run's (parameters within 1e-6).
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
from safetensors.numpy import load_file

# A shortened tiny run from scratch: every stage does real work in about a minute on 2 CPU cores.
SHORT = ["--config.model.source=init", "--config.train.lr=3e-3",
         "--config.train.steps=60", "--config.train.save_every=10", "--config.train.eval_every=30",
         "--config.data.synthetic.num_train=320", "--config.data.synthetic.num_eval=32",
         "--config.train.batch_size=16", "--config.evaluate.max_new_tokens=8"]


def command(config, workdir, extra):
    return [sys.executable, "-m", "sftmix_jax.main", "--config", config, "--workdir", workdir, *extra]


def writing_checkpoint(workdir, since: float) -> bool:
    """A checkpoint write in progress: an Orbax temporary directory made during this attempt."""
    for root, dirs, _ in os.walk(workdir):
        for d in dirs:
            try:
                if "orbax-checkpoint-tmp" in d and os.path.getmtime(os.path.join(root, d)) >= since:
                    return True
            except FileNotFoundError:  # renamed away just now: the write finished
                pass
    return False


def stage_of(workdir) -> str:
    from sftmix_jax.config import STAGES

    done = [s for s in STAGES if os.path.exists(os.path.join(workdir, s, "done.json"))]
    return STAGES[len(done)] if len(done) < len(STAGES) else "finished"


def outputs(workdir):
    params = load_file(os.path.join(workdir, "sftmix", "hf", "model.safetensors"))
    scores = open(os.path.join(workdir, "confidence", "scores.jsonl")).read()
    summary = json.load(open(os.path.join(workdir, "summary.json")))["results"]
    return params, scores, summary


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"))
    p.add_argument("--workdir", default="/tmp/sftmix_chaos")
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--full", action="store_true", help="the config as is, not the shortened run")
    args = p.parse_args()
    rng = random.Random(args.seed)
    extra = [] if args.full else SHORT
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    clean, chaos = os.path.join(args.workdir, "clean"), os.path.join(args.workdir, "chaos")
    shutil.rmtree(args.workdir, ignore_errors=True)

    t = time.time()
    subprocess.run(command(args.config, clean, extra), env=env, check=True, capture_output=True)
    duration = time.time() - t
    print(f"uninterrupted run: {duration:.0f} s")

    from sftmix_jax.config import STAGES

    kills, attempt, log, hit = 0, 0, [], set()
    while True:
        attempt += 1
        proc = subprocess.Popen(command(args.config, chaos, extra), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # Kill after a random delay, or the moment a checkpoint write is in progress, or soon
        # after a stage not yet hit begins; until >= --kills kills and every stage was hit.
        mode = "during checkpoint write" if rng.random() < 0.5 else "random"
        delay, t0, seen = rng.uniform(10, max(12, 0.4 * duration)), time.time(), {}
        while proc.poll() is None:
            elapsed, stage = time.time() - t0, stage_of(chaos)
            seen.setdefault(stage, max(time.time(), t0 + 8))  # ~8 s of start-up before work
            fresh = stage not in hit and time.time() - seen[stage] > rng.uniform(0.5, 3)
            trigger = (mode == "random" and elapsed > delay) or fresh or (
                mode != "random" and writing_checkpoint(chaos, t0))
            if (kills < args.kills or stage not in hit) and stage != "finished" and trigger:
                why = mode if not fresh else "early in a stage"
                if mode != "random" and writing_checkpoint(chaos, t0):
                    why = "during checkpoint write"
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                hit.add(stage)
                log.append(f"kill {kills}: attempt {attempt}, {why}, after {elapsed:.1f} s, in stage {stage}")
                print(log[-1], flush=True)
                break
            time.sleep(0.02)
        err = proc.communicate()[1] if proc.returncode is None else proc.stderr.read()
        if proc.returncode not in (0, -signal.SIGKILL):
            sys.exit(f"attempt {attempt} failed with exit code {proc.returncode}:\n{err[-3000:]}")
        if proc.returncode == 0:
            if kills >= args.kills and hit >= set(STAGES):
                break
            print(f"run finished after {kills} kills, stages hit {sorted(hit)}; starting over", flush=True)
            shutil.rmtree(chaos)
            kills, log, hit = 0, [], set()

    a, b = outputs(clean), outputs(chaos)
    diff = max(float(np.abs(a[0][k] - b[0][k]).max()) for k in a[0])
    same_scores, same_summary = a[1] == b[1], a[2] == b[2]
    writes = sum("checkpoint write" in line for line in log)
    print(f"{kills} kills ({writes} during checkpoint writes) over {attempt} attempts; stages hit: {sorted(hit)}")
    print(f"SFTMix parameters max abs diff {diff:.2e}; scores.jsonl identical: {same_scores}; "
          f"summary.json identical: {same_summary}")
    if diff > 1e-6 or not same_scores or not same_summary:
        sys.exit("FAIL: the interrupted run differs from the uninterrupted one")
    print("PASS")


if __name__ == "__main__":
    main()
