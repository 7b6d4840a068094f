"""Compile time and step time of the NTP train step, layers unrolled vs scanned (model.scan_layers).

    MALLOC_ARENA_MAX=1 python tools/compile_time.py --shapes smollm2,llama1b --step-shapes smollm2

The step is the pipeline's (trainer.make_train_step with AdamW and losses.ntp_loss_fn), lowered
and compiled ahead of time from abstract inputs (ShapeDtypeStructs: no weights are allocated, so
a 1B model compiles in little memory). For --step-shapes the compiled step then runs on a random
init: median of --steps steps after one warm-up. Prints a markdown table. Not a test.
"""
import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench import DEFAULT_BATCH, OPT, SHAPES, synthetic_batch
from sftmix_jax import losses, trainer
from sftmix_jax.model.llama import ModelConfig, abstract_model, init_model
from sftmix_jax.ops import cpu


def compiled_step(cfg: ModelConfig, B: int, L: int):
    """(compiled step, graphdef, tx, lower seconds, compile seconds) from abstract inputs."""
    graphdef, params = nnx.split(abstract_model(cfg))
    tx, _ = trainer.make_optimizer(OPT, 1000)
    step = trainer.make_train_step(graphdef, tx, losses.ntp_loss_fn())
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in synthetic_batch(B, L, cfg.vocab_size).items()}
    rng = jax.eval_shape(lambda: jax.random.key(0))
    t0 = time.perf_counter()
    lowered = step.jitted.lower(params, jax.eval_shape(tx.init, params), batch, rng, nnx.State({}))
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, graphdef, tx, t1 - t0, time.perf_counter() - t1


def step_seconds(compiled, cfg: ModelConfig, tx, B: int, L: int, steps: int) -> float:
    params = nnx.state(init_model(cfg))
    state = [params, tx.init(params)]
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(B, L, cfg.vocab_size).items()}
    times = []
    for _ in range(steps + 2):  # the first two are the warm-up (the allocator's pages fault in)
        t0 = time.perf_counter()
        state[0], state[1], m = compiled(state[0], state[1], batch, jax.random.key(0), nnx.State({}))
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    print("  step times", " ".join(f"{t:.3f}" for t in times), flush=True)
    return float(np.median(times[2:]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="smollm2,llama1b", help=f"of {','.join(SHAPES)}")
    p.add_argument("--step-shapes", default="smollm2", help="shapes whose step is also timed (weights allocated)")
    p.add_argument("--batch", default="", help="B x L per shape, e.g. smollm2=4x256,llama1b=1x128 (default: bench's)")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    cpu.prefer_accurate_matmuls()  # before JAX starts its backend: as sftmix_jax.main computes
    sizes = {k: DEFAULT_BATCH[k] for k in SHAPES}
    sizes.update({k: tuple(map(int, v.split("x"))) for k, v in (kv.split("=") for kv in args.batch.split(",") if kv)})
    rows = []
    for shape in args.shapes.split(","):
        B, L = sizes[shape]
        for scan in (False, True):
            cfg = dataclasses.replace(ModelConfig(**SHAPES[shape]), scan_layers=scan)
            compiled, _, tx, lower_s, compile_s = compiled_step(cfg, B, L)
            step_s = (step_seconds(compiled, cfg, tx, B, L, args.steps)
                      if shape in args.step_shapes.split(",") else None)
            rows.append((shape, f"{B}x{L}", "scanned" if scan else "unrolled", lower_s, compile_s, step_s))
            print(rows[-1], flush=True)
            del compiled
    print(f"\nNTP train step (AdamW), float32, {jax.devices()[0].device_kind}, {jax.device_count()} device(s)\n")
    print("| shape | batch | layers | lower s | compile s | lower+compile s | step s (median) |")
    print("|---|---|---|---|---|---|---|")
    for shape, batch, kind, lower_s, compile_s, step_s in rows:
        step = "not measured" if step_s is None else f"{step_s:.3f}"
        print(f"| {shape} | {batch} | {kind} | {lower_s:.1f} | {compile_s:.1f} | {lower_s + compile_s:.1f} | {step} |")


if __name__ == "__main__":
    main()
