"""Benchmark: the SFTMix train step against the NTP train step on the same batch.

    python -m sftmix_jax.bench --shape tiny
    python -m sftmix_jax.bench --shape smollm2 --batch 4 --seq 256 [--model DIR]

Both steps are jitted, warmed up, then timed alternately (rounds of `--steps` each) so that
machine drift hits both alike; reported: median step time, tokens/s and the ratio, all from
one run. Not a test: run it by hand, on the machine whose numbers you want.
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sftmix_jax import hf, train
from sftmix_jax.model import ModelConfig, init_model

SHAPES = {
    # configs/tiny.py's model
    "tiny": dict(vocab_size=264, hidden_size=96, intermediate_size=256, num_layers=3, num_heads=4,
                 num_kv_heads=2, head_dim=24, tie_embeddings=True),
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                  num_kv_heads=4, head_dim=64, tie_embeddings=False),
    # SmolLM2-135M: 30 layers, d 576, 9 heads / 3 KV heads, vocab 49152, tied
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                    num_kv_heads=3, head_dim=64, tie_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5),
}
DEFAULT_BATCH = {"tiny": (32, 32), "small": (8, 256), "smollm2": (4, 256)}
OPT = ml_collections.ConfigDict(dict(lr=1e-4, min_lr_ratio=0.1, warmup_ratio=0.1, weight_decay=0.1,
                                     grad_clip=1.0, b1=0.9, b2=0.95, eps=1e-8))


def synthetic_batch(B, L, vocab, seed=0):
    """Prompt then response in every row (responses 25-60% of the row), right padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (B, L)).astype(np.int32)
    weights, mask = np.zeros((B, L), np.float32), np.zeros((B, L), np.int32)
    for b in range(B):
        length = int(rng.integers(L * 3 // 4, L + 1))
        prompt = int(rng.integers(length // 4, length // 2))
        mask[b, :length] = 1
        weights[b, prompt - 1 : length - 1] = 1  # position t predicts token t+1
    targets = np.concatenate([ids[:, 1:], np.zeros((B, 1), np.int32)], 1)
    return {"input_ids": ids, "targets": targets, "weights": weights, "attention_mask": mask}


def time_steps(step, state, batch, n):
    params, opt_state = state
    times = []
    for i in range(n):
        t = time.perf_counter()
        params, opt_state, metrics = step(params, opt_state, batch, jax.random.key(i))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    return (params, opt_state), times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--model", default="", help="an HF directory to load instead of a random init of --shape")
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--seq", type=int, default=0)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--ce-chunk", type=int, default=0)
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args()
    B, L = args.batch or DEFAULT_BATCH[args.shape][0], args.seq or DEFAULT_BATCH[args.shape][1]
    if args.model:
        model = hf.load_pretrained(args.model, dtype=args.dtype)
    else:
        model = init_model(ModelConfig(**SHAPES[args.shape], dtype=args.dtype))
    graphdef, params = nnx.split(model)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(B, L, model.cfg.vocab_size).items()}
    chunk = args.ce_chunk or None
    tx, _ = train.make_optimizer(OPT, 1000)
    steps = {
        "ntp": train.make_train_step(graphdef, tx, train.ntp_loss_fn(chunk)),
        "sftmix": train.make_train_step(graphdef, tx, train.sftmix_loss_fn(0.2, 0.5, False, True, chunk)),
    }
    states = {k: (jax.tree.map(jnp.array, params), tx.init(params)) for k in steps}
    for k in steps:  # compile + warm up
        states[k], _ = time_steps(steps[k], states[k], batch, 2)
    times = {k: [] for k in steps}
    for _ in range(args.rounds):
        for k in steps:
            states[k], t = time_steps(steps[k], states[k], batch, args.steps)
            times[k] += t
    tokens = int(batch["attention_mask"].sum())
    res = {"device": str(jax.devices()[0].device_kind), "shape": args.shape, "params": int(n_params),
           "batch": [B, L], "real_tokens": tokens, "dtype": args.dtype}
    for k, t in times.items():
        res[k] = {"step_ms": 1000 * float(np.median(t)), "tokens_per_s": tokens / float(np.median(t))}
    res["sftmix_over_ntp"] = res["sftmix"]["step_ms"] / res["ntp"]["step_ms"]
    print(f"{args.shape}: {n_params / 1e6:.1f}M params, batch {B}x{L}, {res['device']}, {args.dtype}")
    for k in steps:
        print(f"  {k:7s} step {res[k]['step_ms']:9.1f} ms   {res[k]['tokens_per_s']:10.0f} tokens/s")
    print(f"  SFTMix step / NTP step = {res['sftmix_over_ntp']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
