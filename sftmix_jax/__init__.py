"""SFTMix instruction tuning in JAX/Flax NNX."""
from sftmix_jax import xla_cpu as _xla_cpu

# Before JAX starts its CPU backend: float32 matmuls as accurate as PyTorch's (see xla_cpu.py).
_xla_cpu.prefer_accurate_matmuls()
