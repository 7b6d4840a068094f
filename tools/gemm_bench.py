"""GEMM throughput on a bench shape's own matmuls: XLA:CPU (as the train step compiles them) vs PyTorch.

    python tools/gemm_bench.py --shape small
    python tools/gemm_bench.py --shape heads32 --rounds 7 --json gemm.json

The NTP step's dense matmuls (each layer's q, k, v, o, gate, up and down projections, and the
head) on the bench's batch of T = B x L tokens, each in its three forms: forward y = x W, input
gradient dx = dy W^T, weight gradient dW = x^T dy (x^T materialised first, as `cpu.cpu_einsum`
does). Ours: each jitted alone with the train step's compiler options (`cpu.compiler_options
("train")`: YNNPACK's matmuls on CPU); eigen: XLA's Eigen matmuls (the "forward_body" options);
torch: `torch.matmul` with PyTorch's own threads (MKL in the x86 wheels), the forms its autograd
runs. Rounds alternate so machine drift hits all three alike; medians. The total weights each GEMM
by how often one step runs it (the head counted on all T tokens, as transformers runs it; ours
runs it on the response tokens only). Attention's batched matmuls are `tools/bench.py --kinds attention`. Not a test.
"""
import argparse
import json
import time

import numpy as np

from bench import DEFAULT_BATCH, SHAPES
from sftmix_jax.ops import cpu

FORMS = {  # name: jnp.einsum spec on the operands (a, b)
    "fwd": "mk,kn->mn",  # x [m, k] @ W [k, n]
    "dx": "mn,kn->mk",  # dy [m, n] @ W^T
    "dW": "km,mn->kn",  # x^T [k, m] (a materialised copy) @ dy
}


def gemms(shape: dict, tokens: int) -> list:
    """(name, m, k, n, count per step) of the step's dense matmuls."""
    D, F, V, layers = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_layers"]
    NH, KH = shape["num_heads"] * shape["head_dim"], shape["num_kv_heads"] * shape["head_dim"]
    layer = [("q", D, NH), ("k", D, KH), ("v", D, KH), ("o", NH, D), ("gate", D, F), ("up", D, F), ("down", F, D)]
    return [(name, tokens, k, n, layers) for name, k, n in layer] + [("head", tokens, D, V, 1)]


def operands(form: str, m: int, k: int, n: int, rng):
    dims = dict(m=m, k=k, n=n)
    a_spec, b_spec = FORMS[form].split("->")[0].split(",")
    return tuple(rng.standard_normal([dims[c] for c in s], dtype=np.float32) for s in (a_spec, b_spec))


def timers(form: str, a, b, options: dict):
    """{library: callable running one GEMM to completion}."""
    import jax
    import jax.numpy as jnp
    import torch

    spec = FORMS[form]
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    out = {name: (lambda f=jax.jit(lambda x, y: jnp.einsum(spec, x, y), compiler_options=opts): jax.block_until_ready(f(ja, jb)))
           for name, opts in options.items()}
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    x_mk = torch.from_numpy(np.ascontiguousarray(a.T))  # dW: autograd's x.T @ dy takes x [m, k] as a transposed view
    out["torch"] = {"fwd": lambda: ta @ tb, "dx": lambda: ta @ tb.T, "dW": lambda: x_mk.T @ tb}[form]
    return out


def median_ms(fn, n: int) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1000 * float(np.median(ts))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--seq", type=int, default=0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=5, help="timed calls per GEMM per round")
    p.add_argument("--json", default="")
    args = p.parse_args()
    cpu.prefer_accurate_matmuls()  # before JAX starts: the process default is Eigen, as in sftmix_jax.main
    import jax

    B, L = args.batch or DEFAULT_BATCH[args.shape][0], args.seq or DEFAULT_BATCH[args.shape][1]
    if jax.default_backend() != "cpu":
        raise SystemExit("gemm_bench compares XLA:CPU's GEMMs with PyTorch's on the CPU: run it with JAX_PLATFORMS=cpu")
    options = {"ours": cpu.compiler_options("train") or {}}
    if eigen := cpu.compiler_options("forward_body"):  # Eigen's matmuls (None: XLA_FLAGS chose the library)
        options["eigen"] = eigen
    rng = np.random.default_rng(0)
    cases = []
    for name, m, k, n, count in gemms(SHAPES[args.shape], B * L):
        for form in FORMS:
            fns = timers(form, *operands(form, m, k, n, rng), options)
            for fn in fns.values():  # compile + warm up
                fn(), fn()
            cases.append(dict(gemm=name, form=form, mkn=[m, k, n], count=count, fns=fns, ms={lib: [] for lib in fns}))
    for _ in range(args.rounds):
        for case in cases:
            for lib, fn in case["fns"].items():
                case["ms"][lib].append(median_ms(fn, args.calls))
    libs = list(cases[0]["fns"])
    print(f"{args.shape}: T = {B}x{L} tokens, {jax.devices()[0].device_kind}; GFLOP/s (ms), medians of {args.rounds} rounds")
    print(f"  {'gemm':6s} {'form':4s} {'m x k x n':>18s} {'x':>2s}  " + "  ".join(f"{lib:>16s}" for lib in libs) + "  ours/torch time")
    total = {lib: 0.0 for lib in libs}
    for case in cases:
        del case["fns"]
        case["ms"] = {lib: float(np.median(v)) for lib, v in case["ms"].items()}
        flop = 2 * np.prod(case["mkn"])
        cols = "  ".join(f"{flop / case['ms'][lib] / 1e6:7.1f} ({case['ms'][lib]:6.2f})" for lib in libs)
        print(f"  {case['gemm']:6s} {case['form']:4s} {' x '.join(map(str, case['mkn'])):>18s} {case['count']:2d}  {cols}  "
              f"{case['ms']['ours'] / case['ms']['torch']:.2f}x")
        for lib in libs:
            total[lib] += case["count"] * case["ms"][lib]
    print("  one step's GEMMs: " + ", ".join(f"{lib} {t:.1f} ms" for lib, t in total.items())
          + f"; ours/torch time {total['ours'] / total['torch']:.3f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "batch": [B, L], "cases": cases, "total_ms": total}, f, indent=1)


if __name__ == "__main__":
    main()
