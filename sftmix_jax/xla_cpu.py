"""XLA:CPU matmul settings: accurate by default, fast in the jitted train step and forward pass.

XLA:CPU (jaxlib 0.10) hands matmuls to YNNPACK, whose float32 GEMMs round 3-5x more than Eigen's
or PyTorch's (relative error vs float64 on SmolLM2's shapes: 0.9-1.6e-6 against 3.3e-7 for
Eigen and 3.7-5.1e-7 for torch). So `prefer_accurate_matmuls`, called when sftmix_jax is
imported, turns YNNPACK off process-wide: SmolLM2-135M's logits then agree with transformers to
8.1e-5 instead of 1.2e-4 (and with float64 to 5.3e-5, tighter than transformers' 6.8e-5).

The train step and the replay / eval forward pass are compiled with `compiler_options()`
instead, which lets YNNPACK take the matmuls and the elementwise ops around them (SiLU, RoPE,
norms, residual adds). That removes most of the transposed copies XLA's own loop fusions make
for the weight gradients, and the NTP step runs ~15% faster on this project's 2-core CPU
(python -m sftmix_jax.bench). Rounding at 1e-6 does not matter there. The cost is more XLA
scratch memory: on the small bench shape, 515 vs 419 MiB for NTP and 643 vs 452 MiB for SFTMix.

Neither applies when XLA_FLAGS already sets --xla_cpu_experimental_ynn_fusion_type: set it
there to choose for yourself. Neither applies off the CPU backend.
"""
import functools
import importlib.metadata
import importlib.util
import os

YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
OPTIONS = {YNN_FLAG: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE"}
# jaxlib versions known to have the flag: XLA aborts on an unknown flag in XLA_FLAGS
KNOWN_JAXLIB = ((0, 10), (0, 11))
_user_choice = YNN_FLAG in os.environ.get("XLA_FLAGS", "")


def prefer_accurate_matmuls() -> bool:
    """Before JAX starts its backends: XLA:CPU's matmuls in Eigen (returns whether it set this).

    A no-op once a backend is running, if XLA_FLAGS already decides, on TPU hosts (libtpu reads
    XLA_FLAGS with its own flag list) and on jaxlib versions not known to have the flag.
    """
    try:
        version = tuple(int(x) for x in importlib.metadata.version("jaxlib").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    if _user_choice or version not in KNOWN_JAXLIB or importlib.util.find_spec("libtpu") is not None:
        return False
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --{YNN_FLAG}=").strip()
    return True


@functools.cache
def compiler_options() -> dict | None:
    """`compiler_options` for the hot jitted steps: OPTIONS on CPU, else None (call after backend setup)."""
    import jax
    import jax.numpy as jnp

    if _user_choice or jax.default_backend() != "cpu":
        return None
    try:  # older jaxlib: no such option
        jax.jit(lambda x: x * 2, compiler_options=OPTIONS).lower(jnp.ones(2)).compile()
    except Exception:  # noqa: BLE001 - any rejection means: compile with XLA's defaults
        return None
    return OPTIONS
