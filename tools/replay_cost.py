"""Confidence replay cost against training, on real data: one replay pass over the training set (the
replay makes one per reference checkpoint), packed and one example per row, / one NTP epoch.

    python tools/replay_cost.py --config configs/smollm2_meadow.py:data=../shared/data/medical_meadow_small.json
    (--config.KEY=VALUE overrides as for sftmix_jax.main; --rows N, --train_steps N, --rounds N)

The epoch: the NTP train step's median time at each batch length among epoch 0's batches (a few steps
each, after warm-up), summed over the epoch's batches. A replay pass: `scoring.example_nll` over the
training set (or its first --rows examples, scaled up by the token ratio), timed after an untimed
pass that compiles every shape. Rounds alternate a replay pass (each way) with the timed steps; the
ratios come from the medians over rounds. Also one layer's attention alone at the packed shape: a dense
segment mask (the XLA path), the blocked kernel under the segment mask (packed rows on CPU) and the
blocked causal kernel (one example per row), each compiled as the replay's body. One process,
CPU, keeping freed memory as `sftmix_jax.main` does (`cpu.keep_freed_memory`; any MALLOC_ variable
opts out). Not a test.
"""
import collections
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from sftmix_jax import hf, losses, scoring, trainer
from sftmix_jax.data import sources
from sftmix_jax.data.batching import PackedBatches, TrainBatches, eval_batches
from sftmix_jax.model.llama import layer_masks
from sftmix_jax.ops import attention, cpu

_CONFIG = config_flags.DEFINE_config_file("config", "configs/smollm2_meadow.py", "Experiment config (configs/NAME.py[:ARG]).")
_ROWS = flags.DEFINE_integer("rows", 0, "Replay the first N training examples only (0: all), scaled up by tokens.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 2, "Timed train steps per batch length, per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Rounds, each timing a replay pass (unpacked, packed) and the train steps.")

def median_seconds(fn, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def epoch_timer(model, examples, c):
    """(steps(n) -> {length: median seconds of n NTP steps}, {length: batches}) over epoch 0's batch
    lengths, the step compiled and warmed up at each."""
    batches = TrainBatches(examples, c.train.batch_size, c.seed, c.data.buckets)
    lengths_I = [batches.batch(i)["input_ids"].shape[1] for i in range(batches.steps_per_epoch)]
    graphdef, params = nnx.split(model)
    tx = trainer.make_optimizer(c.train, batches.steps_per_epoch)[0]
    step = trainer.make_train_step(graphdef, tx, losses.ntp_loss_fn())
    state = [jax.tree.map(jnp.array, params), None]  # a copy: the step donates its state
    state[1] = tx.init(state[0])
    runs = {}
    for L in sorted(set(lengths_I)):
        batch = {k: jnp.asarray(v) for k, v in batches.batch(lengths_I.index(L)).items() if k != "index"}

        def run(batch=batch):
            state[0], state[1], metrics = step(state[0], state[1], batch, jax.random.key(0))
            jax.block_until_ready(metrics)
        run()  # compile + warm up
        runs[L] = run
    return (lambda n: {L: median_seconds(run, n) for L, run in runs.items()}), dict(collections.Counter(lengths_I))


def replay_timer(model, examples, batch_size, buckets, pack: bool):
    """(pass() -> seconds of one pass, padded tokens, batches), after an untimed pass compiled every shape."""
    batches = list(PackedBatches(examples, batch_size, buckets) if pack else eval_batches(examples, batch_size, buckets))
    scoring.example_nll(model, examples, batch_size, buckets, pack=pack)  # compile + warm up

    def one_pass():
        start = time.perf_counter()
        scoring.example_nll(model, examples, batch_size, buckets, pack=pack)
        return time.perf_counter() - start
    return one_pass, sum(b["input_ids"].size for b in batches), len(batches)


def attention_ms(cfg, batch: dict, reps: int = 5) -> dict:
    """One layer's attention on a packed batch's shape: a dense segment mask (XLA), the blocked kernel
    under `attention.Segments` (packed rows on CPU) and the blocked causal kernel (unpacked rows)."""
    B, L = batch["input_ids"].shape
    q, k, v = (jax.random.normal(jax.random.key(i), (B, L, n, cfg.head_dim)) for i, n in
               enumerate((cfg.num_heads, cfg.num_kv_heads, cfg.num_kv_heads)))
    ids_BL, scale = jnp.asarray(batch["segment_ids"]), cfg.head_dim ** -0.5
    dense_BLS = layer_masks(dataclasses.replace(cfg, attention="xla"), B, L, None, segment_ids_BL=ids_BL)[0]
    fns = {"dense mask": lambda q, k, v, m, ids: attention.masked(q, k, v, m, scale),
           "blocked segments": lambda q, k, v, m, ids: attention.masked(q, k, v, attention.Segments(ids), scale),
           "blocked causal": lambda q, k, v, m, ids: attention.causal_attention(q, k, v, scale)}
    out, args = {}, (q, k, v, dense_BLS, ids_BL)  # arguments, not constants: XLA would fold them
    for name, fn in fns.items():
        fn = jax.jit(fn, compiler_options=cpu.compiler_options(cpu.forward_body_kind(cfg.hidden_size)))  # as the replay
        jax.block_until_ready(fn(*args))
        out[name] = 1000 * median_seconds(lambda fn=fn: jax.block_until_ready(fn(*args)), reps)
    return out


def main(argv):
    del argv
    cpu.prefer_accurate_matmuls()  # before JAX starts its backend, as sftmix_jax.main
    cpu.keep_freed_memory()  # as sftmix_jax.main: no page faults for each step's scratch
    c, rows, train_steps = _CONFIG.value, _ROWS.value, _TRAIN_STEPS.value
    tokenizer = hf.load_tokenizer(c.model.source)
    train_ex = sources.load_examples(c.data, tokenizer, c.seed)[0]
    model = hf.load_pretrained(c.model.source)
    subset = train_ex[:rows] if rows else train_ex
    tokens = lambda ex: sum(len(e.input_ids) for e in ex)  # noqa: E731
    scale = tokens(train_ex) / tokens(subset)  # a subset's pass, scaled up to the whole set
    print(f"{len(train_ex)} training examples ({tokens(train_ex)} tokens); replay over {len(subset)} of them "
          f"(x{scale:.3f} by tokens), confidence.batch_size={c.confidence.batch_size}, buckets={tuple(c.data.buckets)}")
    first = next(iter(PackedBatches(subset, c.confidence.batch_size, c.data.buckets)))
    ms = attention_ms(model.cfg, first)
    print(f"one layer's attention at {first['input_ids'].shape}, ms (x{model.cfg.num_layers} layers per batch): "
          + ", ".join(f"{k} {v:.1f} ({model.cfg.num_layers * v / 1000:.2f} s)" for k, v in ms.items()))
    passes, names = {}, {False: "unpacked", True: "packed  "}
    for pack in (False, True):
        passes[pack], padded, n = replay_timer(model, subset, c.confidence.batch_size, c.data.buckets, pack)
        print(f"replay {names[pack]}: {n} batches, {padded} padded tokens")
    steps, counts = epoch_timer(model, train_ex, c)
    print(f"NTP epoch: {sum(counts.values())} batches of {c.train.batch_size} {counts}, extrapolated from the "
          f"step's median over {train_steps} timed steps per batch length")
    rounds = []  # alternating, so that the machine's drift between rounds moves both sides
    for r in range(_ROUNDS.value):
        sec = {pack: passes[pack]() * scale for pack in (False, True)}
        per_length = steps(train_steps)
        epoch = sum(per_length[L] * n for L, n in counts.items())
        rounds.append((sec[False], sec[True], epoch))
        print(f"round {r + 1}: replay pass unpacked {sec[False]:.1f} s, packed {sec[True]:.1f} s; epoch {epoch:.1f} s "
              f"(step medians { {L: round(t, 2) for L, t in per_length.items()} } s) -> replay / epoch "
              f"unpacked {sec[False] / epoch:.3f}, packed {sec[True] / epoch:.3f}")
    unpacked, packed, epoch = np.median(np.array(rounds), axis=0)
    C = c.reference.checkpoints
    print(f"medians over {len(rounds)} rounds: replay pass unpacked {unpacked:.1f} s, packed {packed:.1f} s, epoch {epoch:.1f} s")
    for pack, sec in ((False, unpacked), (True, packed)):
        print(f"{names[pack]}: replay / epoch = {sec / epoch:.3f} per pass, {C * sec / epoch:.3f} for the {C} "
              f"checkpoints (target <= 0.2)")
    print(f"packed / unpacked replay time: {packed / unpacked:.3f}")


if __name__ == "__main__":
    app.run(main)
