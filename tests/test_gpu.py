"""GPU only (skipped elsewhere): cuDNN fused attention against a float64 reference, and the model's
'auto' attention really compiling to it. Run on a GPU host with

    JAX_PLATFORMS=cuda python -m pytest tests/test_gpu.py

(tests/conftest.py pins the CPU unless JAX_PLATFORMS is set.)
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sftmix_jax.model.llama import ModelConfig, init_model
from sftmix_jax.ops.attention import causal_attention

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (JAX_PLATFORMS=cuda)")


def numpy_attention(q, k, v, scale):
    """Causal GQA attention in float64 NumPy: the independent reference."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, L, N, H = q.shape
    g = N // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("blnh,bsnh->bnls", q, k) * scale
    s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnls,bsnh->blnh", p, v)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_cudnn_attention_is_as_accurate_as_xla_in_bf16():
    B, L, N, K, H = 2, 512, 8, 2, 64
    q, k, v = (jax.random.normal(jax.random.key(i), (B, L, n, H), jnp.bfloat16) for i, n in enumerate((N, K, K)))
    ref = numpy_attention(q, k, v, H**-0.5)
    outs = {impl: jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
        q, k, v, scale=H**-0.5, is_causal=True, implementation=impl))(q, k, v) for impl in ("cudnn", "xla")}
    err = {impl: rel(out, ref) for impl, out in outs.items()}
    print("forward rel err vs float64:", err)
    assert err["cudnn"] < 1e-2 and err["cudnn"] <= 2 * err["xla"] + 1e-3

    # gradients: float32 blocked attention (highest precision) on the same inputs is the reference
    ct = jax.random.normal(jax.random.key(9), (B, L, N, H), jnp.float32)
    loss = lambda f: lambda *a: jnp.sum(f(*a).astype(jnp.float32) * ct)  # noqa: E731
    with jax.default_matmul_precision("highest"):  # jitted: op-by-op on GPU compiles every op
        ref_g = jax.jit(jax.grad(loss(lambda q, k, v: causal_attention(q, k, v, H**-0.5)), (0, 1, 2)))(
            *(x.astype(jnp.float32) for x in (q, k, v)))
    for impl in ("cudnn", "xla"):
        g = jax.jit(jax.grad(loss(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
            q, k, v, scale=H**-0.5, is_causal=True, implementation=impl)), (0, 1, 2)))(q, k, v)
        err[impl] = max(rel(a, b) for a, b in zip(g, ref_g))
    print("gradient rel err vs float32:", err)
    assert err["cudnn"] < 2e-2 and err["cudnn"] <= 2 * err["xla"] + 1e-3


def test_auto_attention_compiles_to_cudnn_and_matches_blocked():
    cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=64, dtype="bfloat16")
    ids = jax.random.randint(jax.random.key(0), (2, 256), 0, 512)
    losses = {}
    for impl in ("auto", "blocked"):
        graphdef, params = nnx.split(init_model(dataclasses.replace(cfg, attention=impl)))
        fn = jax.jit(jax.value_and_grad(
            lambda p: -jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, p)(ids).astype(jnp.float32))[..., 0])))
        hlo = fn.lower(params).compile().as_text()
        assert ("__cudnn$fmha" in hlo) == (impl == "auto"), f"{impl}: cuDNN attention call present?"
        losses[impl] = float(fn(params)[0])
    assert abs(losses["auto"] - losses["blocked"]) < 1e-2 * abs(losses["blocked"]), losses
