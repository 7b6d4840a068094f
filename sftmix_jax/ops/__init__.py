"""Kernels: attention, the fused head + loss, XLA:CPU settings. Imports nothing above it."""
