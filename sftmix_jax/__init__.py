"""SFTMix instruction tuning in JAX/Flax NNX."""
