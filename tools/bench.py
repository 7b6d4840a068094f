"""Benchmark: SFTMix vs NTP train steps, replay, and the same steps in PyTorch + transformers.

    python tools/bench.py --shape tiny
    python tools/bench.py --shape smollm2 --batch 4 --seq 256 --torch --memory
    python tools/bench.py --shape small --torch --memory
    python tools/bench.py --shape llama1b --dtype bfloat16 --batch 4 --seq 2048   # one GPU

In one run: the jitted NTP and SFTMix steps (AdamW) on the same batch, the forward-only replay
step, and with --torch the same two steps with transformers' LlamaForCausalLM and torch.optim
.AdamW on the same shape, batch and machine. Every step is warmed up, then all are timed in
alternating rounds (`--rounds` x `--steps`) so machine drift hits them alike; medians are
reported with ratios. --memory measures each step kind's peak host memory in a fresh
subprocess that runs only that step (peak RSS: runtime, model, optimizer state and the step;
freed heap pages left over from compilation are given back first, in every framework alike), and
for our JAX steps also XLA's compiled memory plan (arguments + unaliased outputs + scratch), which,
unlike peak RSS, does not vary with the allocator from run to run. MFU counts 6*N*tokens (+ attention)
against --peak-tflops: by default, on CPU, the best of five 2048^3 float32 matmuls measured in the
same run; on accelerators, the chip's dense bfloat16 spec (PEAK_TFLOPS), with the rate of an
8192^3 matmul in --dtype measured in the run printed beside it. On GPU, --torch runs PyTorch on
the GPU too (autocast to bfloat16 when --dtype is), and --memory reports each step's peak device
memory. Not a test.
"""
import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from sftmix_jax import hf, losses
from sftmix_jax.ops import cpu
from sftmix_jax.ops.fused_head import LinearHead
from sftmix_jax.ops.attention import ATTENTION, attention_impl, causal
from sftmix_jax.model.llama import REMAT, ModelConfig, init_model
from sftmix_jax import scoring, trainer

SHAPES = {
    # configs/tiny.py's model
    "tiny": dict(vocab_size=264, hidden_size=96, intermediate_size=256, num_layers=3, num_heads=4,
                 num_kv_heads=2, head_dim=24, tie_embeddings=True),
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                  num_kv_heads=4, head_dim=64, tie_embeddings=False),
    # issue 22's untuned shape: 8 heads of 32 / 4 KV heads, untied
    "heads32": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8,
                    num_kv_heads=4, head_dim=32, tie_embeddings=False),
    # SmolLM2-135M: 30 layers, d 576, 9 heads / 3 KV heads, vocab 49152, tied
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                    num_kv_heads=3, head_dim=64, tie_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5),
    # Llama-3.2-1B (1.24B): 16 layers, d 2048, 32 heads / 8 KV heads, vocab 128256, tied
    "llama1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                    num_kv_heads=8, head_dim=64, tie_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5),
}
# Dense bfloat16 TFLOP/s per chip, by device_kind prefix (vendor specs)
PEAK_TFLOPS = {"NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100": 312.0, "TPU v4": 275.0,
               "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0}
DEFAULT_BATCH = {"tiny": (32, 32), "small": (8, 256), "heads32": (8, 256), "smollm2": (4, 256), "llama1b": (4, 2048)}
OPT = ml_collections.ConfigDict(dict(lr=1e-4, min_lr_ratio=0.1, warmup_ratio=0.1, weight_decay=0.1,
                                     grad_clip=1.0, b1=0.9, b2=0.95, eps=1e-8))


def synthetic_batch(B, L, vocab, seed=0, prompts=True):
    """Rows of 3/4 L to L real tokens, right padding; prompt then response in every row (the
    response 50-75% of the row's real tokens), or with prompts=False response only."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (B, L)).astype(np.int32)
    weights, mask = np.zeros((B, L), np.float32), np.zeros((B, L), np.int32)
    for b in range(B):
        length = int(rng.integers(L * 3 // 4, L + 1))
        prompt = int(rng.integers(length // 4, length // 2))
        prompt = prompt if prompts else 1  # drawn either way: the same row lengths
        mask[b, :length] = 1
        weights[b, prompt - 1 : length - 1] = 1  # position t predicts token t+1
    targets = np.concatenate([ids[:, 1:], np.zeros((B, 1), np.int32)], 1)
    return {"input_ids": ids, "targets": targets, "weights": weights, "attention_mask": mask}


def torch_steps(cfg: ModelConfig, batch, lr=1e-4, device="cpu", bf16=False):
    """NTP and SFTMix train steps with transformers' PyTorch Llama and torch AdamW.

    device "cuda": fused AdamW; bf16: the forward under torch.autocast (float32 master weights).
    """
    import torch
    import transformers

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, tie_word_embeddings=cfg.tie_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, max_position_embeddings=4096, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hf_cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95),
                            fused=device == "cuda")
    t = {k: torch.from_numpy(np.array(v)).to(device) for k, v in batch.items()}
    ids, targets, weights = t["input_ids"].long(), t["targets"].long(), t["weights"]

    def ce(logits, y, w):
        nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, -2), y.flatten(), reduction="none")
        return (nll * w.flatten()).sum() / w.sum().clamp(min=1)

    def ntp():
        h = model.model(input_ids=ids).last_hidden_state
        return ce(model.lm_head(h), targets, weights)

    def sftmix():
        h = model.model(input_ids=ids).last_hidden_state
        loss = ce(model.lm_head(h), targets, weights)
        order = torch.argsort((weights <= 0).int(), dim=1, stable=True)  # response positions first
        h_al = torch.gather(h, 1, order[..., None].expand(-1, -1, h.shape[-1]))
        y_al = torch.gather(targets, 1, order)
        count = (weights > 0).sum(1)
        m = torch.minimum(count[0::2], count[1::2])
        valid = (torch.arange(h.shape[1], device=device)[None] < m[:, None]).float()
        lam = float(np.random.default_rng(0).beta(0.5, 0.5))
        z = lam * h_al[0::2] + (1 - lam) * h_al[1::2]
        logits = model.lm_head(z)
        mix = lam * ce(logits, y_al[0::2], valid) + (1 - lam) * ce(logits, y_al[1::2], valid)
        return loss + 0.2 * mix

    def make(fn):
        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                loss = fn()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            return float(loss.detach())
        return step
    return {"torch_ntp": make(ntp), "torch_sftmix": make(sftmix)}


def flops_per_token(cfg: ModelConfig, L: int) -> float:
    """6 * (non-embedding params + LM head) + attention (6 * layers * L * N * H, causal half)."""
    D, F, N, K, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_layer = D * N * H * 2 + D * K * H * 2 + 3 * D * F
    n = cfg.num_layers * per_layer + D * cfg.vocab_size
    return 6 * n + 6 * cfg.num_layers * L * N * H


def trim_heap() -> None:
    """glibc: give freed heap pages (compilation, warm-up) back, so peaks count live memory only."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def matmul_tflops(n: int, dtype) -> float:
    """Best of five jitted n^3 matmuls on random data, in TFLOP/s."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def device_peak_tflops(dtype: str) -> tuple[float, float]:
    """(peak for MFU, measured matmul rate). CPU: both the measured 2048^3 float32 matmul;
    accelerators: PEAK_TFLOPS (the dense bfloat16 spec) and an 8192^3 matmul in `dtype`."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        measured = matmul_tflops(2048, jnp.float32)
        return measured, measured
    measured = matmul_tflops(8192, jnp.dtype(dtype))
    for prefix, peak in PEAK_TFLOPS.items():
        if dev.device_kind.startswith(prefix):
            return peak, measured
    raise SystemExit(f"no peak known for {dev.device_kind!r}: pass --peak-tflops")


def reset_peak_rss() -> None:
    """Linux: restart the peak-RSS counter (VmHWM) at the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def measure_peak(step, torch_kind: bool) -> dict:
    """Peak memory over two more steps of a warmed-up step (the memory subprocess).

    CPU: peak RSS (runtime, weights, state, compiled step), freed heap given back first; GPU:
    the framework's peak device allocation over the whole process (it runs this one step kind).
    """
    cpu = jax.default_backend() == "cpu"
    if cpu:
        trim_heap()
        reset_peak_rss()
        before = peak_rss_mb()  # runtime, weights, state, compiled step
    for _ in range(2):
        step()
    if cpu:
        return {"peak_mb": peak_rss_mb(), "resident_mb": before}
    if torch_kind:
        import torch

        return {"peak_mb": torch.cuda.max_memory_allocated() / 2**20}
    return {"peak_mb": jax.devices()[0].memory_stats()["peak_bytes_in_use"] / 2**20}


def compiled_mb(lowered) -> float:
    """XLA's memory plan for a step, in MB: arguments + outputs not aliased to them + scratch."""
    m = lowered.compile().memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes) / 2**20


def head_loss_step(head: LinearHead, batch, fused: bool, chunk):
    """Head + NTP loss alone, forward and backward (d h, d W) on random hidden states: fused
    (ops/fused_head.py) or the head differentiated through (all logits, optax's cross-entropy)."""
    B, L = batch["targets"].shape
    D = head.w.shape[1] if head.vd else head.w.shape[0]
    h_BLD = jax.random.normal(jax.random.key(1), (B, L, D), head.dtype)
    t_BL, w_BL = batch["targets"], batch["weights"]

    def loss(h_BLD, w):
        plain = lambda x: jnp.einsum("...D,VD->...V" if head.vd else "...D,DV->...V", x, w.astype(head.dtype))  # noqa: E731
        if fused:
            return losses.ntp_loss(h_BLD, dataclasses.replace(head, w=w, call=plain), t_BL, w_BL, chunk)[0]
        ce_BL = optax.softmax_cross_entropy_with_integer_labels(plain(h_BLD).astype(jnp.float32), t_BL)
        return jnp.sum(ce_BL * w_BL) / jnp.maximum(jnp.sum(w_BL), 1.0)

    grad = jax.jit(jax.grad(loss, (0, 1)), compiler_options=cpu.compiler_options("train"))
    return lambda: jax.block_until_ready(grad(h_BLD, head.w))


def attention_steps(cfg: ModelConfig, B: int, L: int, torch_too: bool):
    """One layer's causal attention, forward and backward (dq, dk, dv), on random inputs: ours
    (`attention.causal`, the train step's compiler options) and, with torch_too, PyTorch's
    scaled_dot_product_attention (what transformers' "sdpa" attention calls)."""
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q, k, v, do = (np.random.default_rng(i).normal(size=(B, L, n, H)).astype(np.float32) for i, n in enumerate((N, K, K, N)))
    loss = lambda q, k, v: jnp.sum(causal(q, k, v, H**-0.5, cfg.attention, cfg.dtype) * do)  # noqa: E731
    grad = jax.jit(jax.grad(loss, (0, 1, 2)), compiler_options=cpu.compiler_options("train"))
    steps = {"attention": lambda: jax.block_until_ready(grad(q, k, v))}
    if torch_too:
        import torch

        tq, tk, tv, tdo = (torch.from_numpy(x.transpose(0, 2, 1, 3).copy()) for x in (q, k, v, do))
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731  fresh leaves: no .grad to add to
            *(x.detach().requires_grad_() for x in (tq, tk, tv)), is_causal=True, enable_gqa=N != K)
        steps["torch_attention"] = lambda: sdpa().backward(tdo)
    return steps


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--model", default="", help="an HF directory to load instead of a random init of --shape")
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--seq", type=int, default=0)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="float32", help="compute dtype; weights and optimizer state stay float32")
    p.add_argument("--remat", default="none", choices=REMAT)
    p.add_argument("--attention", default="auto", choices=ATTENTION)
    p.add_argument("--scan-layers", action="store_true", help="the layers stacked and scanned (model.scan_layers)")
    p.add_argument("--ce-chunk", type=int, default=0)
    p.add_argument("--no-prompts", action="store_true",
                   help="every real token is a response token (our head then skips only the padding)")
    p.add_argument("--kinds", default="ntp,sftmix,replay",
                   help="which of our steps to time; also head, head_fused: head + NTP loss alone, differentiated / fused; "
                        "attention: one layer's attention forward + backward (with --torch, PyTorch's SDPA too)")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--torch", action="store_true", help="also time PyTorch (+ transformers) on the same shape: its ntp, sftmix, attention")
    p.add_argument("--memory", action="store_true", help="peak memory of each step kind, in subprocesses")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (0: measured / known)")
    p.add_argument("--only", default="", help=argparse.SUPPRESS)  # one step kind: the memory subprocess
    args = p.parse_args()
    cpu.prefer_accurate_matmuls()  # before JAX starts its backend: as sftmix_jax.main computes
    B, L = args.batch or DEFAULT_BATCH[args.shape][0], args.seq or DEFAULT_BATCH[args.shape][1]
    kinds = args.kinds.split(",")
    if unknown := set(kinds) - {"ntp", "sftmix", "replay", "head", "head_fused", "attention"}:
        raise SystemExit(f"--kinds: unknown {sorted(unknown)} (use ntp, sftmix, replay, head, head_fused, attention)")
    kinds += [f"torch_{k}" for k in kinds if args.torch and k in ("ntp", "sftmix", "attention")]
    kinds = [args.only] if args.only else kinds
    runtime = dict(dtype=args.dtype, remat=args.remat, attention=args.attention, scan_layers=args.scan_layers)
    cfg = (hf.model_config(ml_collections.ConfigDict(dict(source=args.model, param_dtype="float32", **runtime)))
           if args.model else ModelConfig(**SHAPES[args.shape], **runtime))
    np_batch = synthetic_batch(B, L, cfg.vocab_size, prompts=not args.no_prompts)
    steps, n_params, xla_mb = {}, 0, {}
    if any(not k.startswith("torch") for k in kinds):  # a torch-only subprocess holds no JAX model
        model = hf.load_pretrained(args.model, **runtime) if args.model else init_model(cfg)
        graphdef, params = nnx.split(model)
        n_params = sum(x.size for x in jax.tree.leaves(params))
        batch = {k: jnp.asarray(v) for k, v in np_batch.items()}
        chunk = args.ce_chunk or None
        tx, _ = trainer.make_optimizer(OPT, 1000)
        jax_fns = {
            "ntp": trainer.make_train_step(graphdef, tx, losses.ntp_loss_fn(chunk)),
            "sftmix": trainer.make_train_step(graphdef, tx, losses.sftmix_loss_fn(0.2, 0.5, False, True, chunk)),
        }
        for k in kinds:
            if k in jax_fns:  # its own copy: the step donates (consumes) its state
                state = [jax.tree.map(jnp.array, params), tx.init(params)]

                def run(fn=jax_fns[k], state=state):
                    state[0], state[1], m = fn(state[0], state[1], batch, jax.random.key(0))
                    jax.block_until_ready(m)
                steps[k] = run
                if args.memory:  # XLA's own plan: deterministic, unlike peak RSS
                    xla_mb[k] = compiled_mb(jax_fns[k].jitted.lower(*state, batch, jax.random.key(0), nnx.State({})))
            elif k == "replay":
                eval_batch = {k2: batch[k2] for k2 in ("input_ids", "targets", "weights")}
                steps[k] = lambda: jax.block_until_ready(scoring.score_batch(graphdef, params, eval_batch, cfg.hidden_size))
            elif k in ("head", "head_fused"):
                steps[k] = head_loss_step(model.linear_head(), batch, k == "head_fused", chunk)
            elif k == "attention":
                steps.update(attention_steps(cfg, B, L, "torch_attention" in kinds))
        if "replay" not in kinds:  # hold one copy of the weights per train step kind, as torch does
            del model, params
    if any(k in ("torch_ntp", "torch_sftmix") for k in kinds):
        gpu = jax.default_backend() == "gpu"
        steps.update({k: v for k, v in torch_steps(cfg, np_batch, device="cuda" if gpu else "cpu",
                                                   bf16=args.dtype == "bfloat16").items() if k in kinds})
    for k in kinds:  # compile + warm up
        for _ in range(2):
            steps[k]()
    if args.only:  # memory subprocess
        print(json.dumps(measure_peak(steps[args.only], args.only.startswith("torch"))))
        return
    times = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for k in kinds:
            for _ in range(args.steps):
                t = time.perf_counter()
                steps[k]()
                times[k].append(time.perf_counter() - t)
    peak, measured = (args.peak_tflops, 0.0) if args.peak_tflops else device_peak_tflops(args.dtype)
    tokens = int(np_batch["attention_mask"].sum())
    padded = B * L
    fpt = flops_per_token(cfg, L)
    res = {"device": str(jax.devices()[0].device_kind), "shape": args.shape, "params": int(n_params),
           "batch": [B, L], "real_tokens": tokens, **runtime, "peak_tflops": peak, "matmul_tflops": measured}
    for k in kinds:
        sec = float(np.median(times[k]))
        train_flops = {"replay": fpt * padded / 3,  # forward only: 1/3
                       "head": 6 * cfg.hidden_size * cfg.vocab_size * padded,
                       "attention": 6 * L * cfg.num_heads * cfg.head_dim * padded}.get(
                           k.removesuffix("_fused").removeprefix("torch_"), fpt * padded)
        res[k] = {"step_ms": 1000 * sec, "tokens_per_s": tokens / sec,
                  "mfu": train_flops / sec / (peak * 1e12), "spread_ms": 1000 * float(np.ptp(times[k]))}
    if args.memory:
        import subprocess
        import sys

        for k in [k for k in kinds if "attention" not in k]:  # attention alone: time only
            cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--only", k]
            cmd = [c for c in cmd if c not in ("--memory", "--torch")]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            res[k]["peak_mb"] = json.loads(out)["peak_mb"]
            if k in xla_mb:
                res[k]["xla_mb"] = xla_mb[k]
    print(f"{args.shape}: {n_params / 1e6:.1f}M params, batch {B}x{L} ({tokens} real tokens), {res['device']}, "
          f"{args.dtype}, remat {args.remat}, attention {attention_impl(args.attention, args.dtype, L, cfg.head_dim)}, "
          f"peak {peak:.3g} TFLOP/s (measured matmul {measured:.3g})")
    for k in kinds:
        mem = f"   peak {'RSS' if jax.default_backend() == 'cpu' else 'mem'} {res[k]['peak_mb']:7.0f} MB" \
            if "peak_mb" in res[k] else ""
        mem += f"   XLA {res[k]['xla_mb']:6.0f} MB" if "xla_mb" in res[k] else ""
        print(f"  {k:13s} {res[k]['step_ms']:9.1f} ms  {res[k]['tokens_per_s']:9.0f} tokens/s  "
              f"MFU {100 * res[k]['mfu']:5.1f}%{mem}")
    pairs = {"sftmix/ntp step time": ("sftmix", "ntp", "step_ms"),
             "ntp tokens/s ours/torch": ("ntp", "torch_ntp", "tokens_per_s"),
             "head+loss time fused/differentiated": ("head_fused", "head", "step_ms"),
             "attention time ours/torch": ("attention", "torch_attention", "step_ms"),
             "sftmix tokens/s ours/torch": ("sftmix", "torch_sftmix", "tokens_per_s"),
             "sftmix/ntp peak memory": ("sftmix", "ntp", "peak_mb"),
             "sftmix/ntp XLA memory": ("sftmix", "ntp", "xla_mb"),
             "ntp peak memory ours/torch": ("ntp", "torch_ntp", "peak_mb")}
    ratios = {name: res[a][key] / max(res[b][key], 1e-9) for name, (a, b, key) in pairs.items()
              if a in res and b in res and key in res[a] and key in res[b]}
    res["ratios"] = ratios
    for name, value in ratios.items():
        print(f"  {name:30s} {value:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
