"""SFTMix instruction tuning in JAX/Flax NNX. Importing it changes no process setting."""
