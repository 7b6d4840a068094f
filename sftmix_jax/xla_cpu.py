"""XLA:CPU compile options for the jitted train step and the forward (replay / eval) pass.

By default XLA:CPU hands only the matmuls to YNNPACK. Letting YNNPACK take the elementwise ops
around them as well (SiLU, RoPE, norms, residual adds) avoids most of the transposed copies XLA's
own loop fusions make for the weight gradients: the NTP step runs ~15% faster on this project's
2-core CPU (python -m sftmix_jax.bench), for more XLA scratch memory (small bench shape: NTP
515 vs 419 MiB, SFTMix 643 vs 452 MiB). Used on the CPU backend only, where this jaxlib knows
the option, and not when XLA_FLAGS already sets it (set it there to opt out).
"""
import functools
import os

import jax
import jax.numpy as jnp

YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
OPTIONS = {YNN_FLAG: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE"}


@functools.cache
def compiler_options() -> dict | None:
    """`compiler_options` for jax.jit: OPTIONS on CPU, else None (call after backend setup)."""
    if jax.default_backend() != "cpu" or YNN_FLAG in os.environ.get("XLA_FLAGS", ""):
        return None
    try:  # older jaxlib: no such option
        jax.jit(lambda x: x * 2, compiler_options=OPTIONS).lower(jnp.ones(2)).compile()
    except Exception:  # noqa: BLE001 - any rejection means: compile with XLA's defaults
        return None
    return OPTIONS
