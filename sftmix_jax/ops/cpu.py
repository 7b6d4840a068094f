"""XLA:CPU settings, each applied explicitly (by `sftmix_jax.main` and the CLIs, not on import).

XLA:CPU (jaxlib 0.10) hands matmuls to YNNPACK, whose float32 GEMMs round 3-5x more than Eigen's
or PyTorch's (relative error vs float64 on SmolLM2's shapes: 0.9-1.6e-6 against 3.3e-7 for
Eigen and 3.7-5.1e-7 for torch). So `prefer_accurate_matmuls`, called by the command-line
entry points before JAX starts its backend, turns YNNPACK off for that process: SmolLM2-135M's
float32 logits are then about as far from exact float64 ones as transformers' own (README). A
program that imports sftmix_jax as a library gets XLA's defaults unless it calls it too.

The hot jitted steps get YNNPACK back through `compiler_options(kind)`, where rounding at 1e-6
does not matter and speed does:
- "train": YNNPACK for the matmuls only (XLA's own default). Letting YNNPACK also fuse the
  elementwise ops (SiLU, RoPE, norms, residual adds) made the NTP step ~15% faster on an earlier
  machine, but on this AMD EPYC 2-core one it was no faster (small bench shape, one process,
  alternating: NTP 728 vs 722 ms, SFTMix 760 vs 792 ms; SmolLM2 shape NTP 6.43 vs 6.72 s) and
  costs scratch memory (small: NTP 515 vs 395 MiB, SFTMix 579 vs 458 MiB).
- "forward" (the scoring head: confidence replay, held-out loss): matmuls and elementwise ops
  both in YNNPACK; a forward pass keeps little memory anyway. SmolLM2's head (V 49152) took
  0.69-0.75x Eigen's time.
- "forward_body" (the scoring body of a model `forward_body_kind` calls wide, jitted apart from
  its head): XLA's own elementwise code and Eigen's matmuls. On a 2-core Intel Xeon they ran
  SmolLM2-135M's (d 576) scoring 0.89x the time of YNNPACK's, but the bench's d 96 and d 256
  shapes' 1.08-1.11x (README, CPU figures): narrower bodies stay with "forward".
- Both: `xla_cpu_enable_fast_min_max`. XLA:CPU's NaN-propagating max does not vectorise: a row
  max over [256, 8192] took 1.47 ms against 0.49 ms with the flag and 0.39 ms for a row sum
  (2-core Intel Xeon). Softmax and log-sum-exp take such maxima, and a NaN still reaches their
  result through the exp and the sum (small NTP step 0.976x the time, one A/B run).

Neither applies when XLA_FLAGS already sets --xla_cpu_experimental_ynn_fusion_type: set it
there to choose for yourself. Neither applies off the CPU backend.
"""
import functools
import importlib.metadata
import importlib.util
import os

import jax  # importing JAX starts no backend: XLA_FLAGS may still change until one starts
import jax.numpy as jnp

YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
OPTIONS = {  # per kind of jitted step (see the module docstring)
    "train": {YNN_FLAG: "LIBRARY_FUSION_TYPE_DOT", "xla_cpu_enable_fast_min_max": True},
    "forward": {YNN_FLAG: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE", "xla_cpu_enable_fast_min_max": True},
    "forward_body": {YNN_FLAG: "", "xla_cpu_enable_fast_min_max": True},
}
# jaxlib versions known to have the flag: XLA aborts on an unknown flag in XLA_FLAGS
KNOWN_JAXLIB = ((0, 10), (0, 11))
# prefer_accurate_matmuls records the flag it adds here. Child processes inherit both variables,
# so a child (a launcher's or compare's run) can tell the package's flag from the user's.
ADDED_VAR = "SFTMIX_JAX_ADDED_XLA_FLAG"
_OURS = f"--{YNN_FLAG}="


def _inherited() -> bool:
    return os.environ.get(ADDED_VAR) == _OURS and _OURS in os.environ.get("XLA_FLAGS", "").split()


def _user_choice() -> bool:
    """XLA_FLAGS sets the YNNPACK flag, and not (only) as prefer_accurate_matmuls added it."""
    inherited = _inherited()
    return any(YNN_FLAG in f for f in os.environ.get("XLA_FLAGS", "").split() if not (inherited and f == _OURS))


ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin")


def prefer_accurate_matmuls() -> bool:
    """Before JAX starts its backends: XLA:CPU's matmuls in Eigen (returns whether it set this).

    A no-op once a backend is running, if XLA_FLAGS already decides, on TPU and GPU hosts (libtpu
    and the CUDA plugin read XLA_FLAGS with their own flag lists; the CPU is not where they
    compute) and on jaxlib versions not known to have the flag.
    """
    try:
        version = tuple(int(x) for x in importlib.metadata.version("jaxlib").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    if _user_choice() or version not in KNOWN_JAXLIB or any(importlib.util.find_spec(m) for m in ACCELERATOR_PLUGINS):
        return False
    if not _inherited():
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _OURS).strip()
        os.environ[ADDED_VAR] = _OURS
    return True


@functools.cache
def compiler_options(kind: str) -> dict | None:
    """`compiler_options` for a hot jitted step (an OPTIONS kind): OPTIONS[kind] on CPU, else None.

    Call after backend setup.
    """
    options = OPTIONS[kind]
    if _user_choice() or jax.default_backend() != "cpu":
        return None
    try:  # older jaxlib: no such option
        jax.jit(lambda x: x * 2, compiler_options=options).lower(jnp.ones(2)).compile()
    except Exception:  # noqa: BLE001 - any rejection means: compile with XLA's defaults
        return None
    return options


EIGEN_BODY_FROM = 512  # hidden size: measured at 96, 256 (YNNPACK faster) and 576 (Eigen faster) only


def forward_body_kind(hidden_size: int) -> str:
    """The OPTIONS kind for a scoring body of this width: "forward_body" from EIGEN_BODY_FROM up."""
    return "forward_body" if hidden_size >= EIGEN_BODY_FROM else "forward"


def keep_freed_memory() -> bool:
    """glibc on the CPU backend: keep freed memory in the process (returns whether it was set).

    glibc unmaps every freed block over 32 MiB (each step's XLA scratch) and trims the heap top,
    so each train step page-faults its scratch in again (system time; README, CPU figures). With
    mmap off for allocations and the trim threshold at 2 GiB, the scratch stays mapped. The price:
    resident memory does not shrink after a peak. A no-op when any MALLOC_ variable is set (the user's choice), off the
    CPU backend and off glibc. Called by `sftmix_jax.main`, not on import.
    """
    import ctypes

    if any(k.startswith("MALLOC_") for k in os.environ) or jax.default_backend() != "cpu":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameter numbers
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc
        return False


def einsum(eq, x, w):
    """Dense's einsum: `cpu_einsum` on the CPU backend (its weight gradient runs faster there); GPU
    and TPU matmuls take transposed operands natively."""
    return (cpu_einsum if jax.default_backend() == "cpu" else jnp.einsum)(eq, x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def cpu_einsum(eq, x, w):
    """einsum(eq, x, w) whose weight gradient contracts an explicit transposed copy of x.

    eq: "{batch}{in},{in}{out}->{batch}{out}" (Dense's form). Autodiff's dW = einsum(x, dy)
    contracts x's leading (token) axes, a dot XLA:CPU leaves to Eigen's slower GEMM; with x^T
    materialised first (an optimization barrier keeps XLA from folding the transpose back into
    the dot) YNNPACK takes it, transpose included still faster (README, CPU figures). Dense uses
    it on the CPU backend only: GPU and TPU matmuls take transposed operands natively.
    """
    return jnp.einsum(eq, x, w)


def _cpu_einsum_fwd(eq, x, w):
    return jnp.einsum(eq, x, w), (x, w)


def _cpu_einsum_bwd(eq, res, dy):
    x, w = res
    x_spec, w_spec, y_spec = *eq.split("->")[0].split(","), eq.split("->")[1]
    batch = [c for c in x_spec if c not in w_spec]
    xt_spec = "".join([c for c in x_spec if c in w_spec] + batch)  # [in.., batch..]
    xt = jax.lax.optimization_barrier(jnp.transpose(x, [x_spec.index(c) for c in xt_spec]))
    # A frozen kernel's dW (LoRA) is unused, and dead-code elimination drops it with the transpose.
    return jnp.einsum(f"{y_spec},{w_spec}->{x_spec}", dy, w), jnp.einsum(f"{xt_spec},{y_spec}->{w_spec}", xt, dy)


cpu_einsum.defvjp(_cpu_einsum_fwd, _cpu_einsum_bwd)
