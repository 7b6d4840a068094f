"""LoRA (Hu et al. 2021): low-rank adapters on the Dense layers, the only weights trained.

W x  ->  W x + (alpha / r) * B (A x), with A [in..., r] ~ U(+-1/sqrt(fan_in)) and B [r, out...] = 0,
so a freshly adapted model computes exactly what the base model does. Adapters are `LoRAParam`
variables: the train step differentiates and checkpoints those only when any exist, and
`hf.save_pretrained` writes merged kernels (W + scale * A B), a plain HF checkpoint.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx


TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


class LoRAParam(nnx.Param):
    """A low-rank adapter weight."""


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        rank=0,  # 0 = off: full fine-tuning; > 0 trains rank-r adapters only (both stages)
        alpha=16.0,  # scale alpha / rank
        targets="q,k,v,o,gate,up,down"))


def apply(model, cfg, seed: int, mesh=None):
    """config.lora -> the model with adapters when cfg.rank > 0, else the model unchanged."""
    return add(model, cfg.rank, cfg.alpha, cfg.targets, seed, mesh) if cfg and cfg.rank > 0 else model


def parse_targets(spec) -> tuple:
    names = tuple(t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip())
    bad = [t for t in names if t not in TARGETS]
    if bad or not names:
        raise ValueError(f"config.lora.targets={spec!r}: unknown module(s) {bad}; choose from {','.join(TARGETS)}")
    return names


def _is_dense(module) -> bool:  # llama.Dense (duck-typed: the model imports this module)
    return hasattr(module, "lora_a") and hasattr(module, "num_in")


def delta(dense, x):
    """scale * B (A x) for an adapted Dense: x [batch.., in..] -> [batch.., r] -> [batch.., out..]."""
    x_spec, k_spec = dense.eq.split("->")[0].split(",")
    batch, k_in, k_out = x_spec[:-dense.num_in], k_spec[:dense.num_in], k_spec[dense.num_in:]
    r_ = jnp.einsum(f"{x_spec},{k_in}R->{batch}R", x, dense.lora_a[...].astype(dense.dtype))
    return dense.lora_scale * jnp.einsum(f"{batch}R,R{k_out}->{batch}{k_out}", r_, dense.lora_b[...].astype(dense.dtype))


def add(model, rank: int, alpha: float, targets, seed: int = 0, mesh=None):
    """Attach adapters to the Dense layers whose attribute name is in `targets`; returns model."""
    from sftmix_jax import sharding

    targets = parse_targets(targets)
    key = jax.random.key(seed)
    for path, module in nnx.iter_modules(model):
        if not (_is_dense(module) and path and path[-1] in targets):
            continue
        kernel = module.kernel
        names = kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim
        lead = int(sharding.layer_stacked(kernel))  # scan_layers: one adapter per layer, stacked the same way
        n_in = lead + module.num_in
        fan_in = int(np.prod(kernel.shape[lead:n_in]))
        key, sub = jax.random.split(key)
        a = jax.random.uniform(sub, kernel.shape[:n_in] + (rank,), kernel.dtype, -1.0, 1.0) / np.sqrt(fan_in)
        b = jnp.zeros(kernel.shape[:lead] + (rank,) + kernel.shape[n_in:], kernel.dtype)
        a_names, b_names = tuple(names[:n_in]) + (None,), tuple(names[:lead]) + (None,) + tuple(names[n_in:])
        if mesh is not None:
            a = jax.device_put(a, sharding.named_sharding(mesh, a_names))
            b = jax.device_put(b, sharding.named_sharding(mesh, b_names))
        module.lora_a = LoRAParam(a, out_sharding=a_names, eager_sharding=False)
        module.lora_b = LoRAParam(b, out_sharding=b_names, eager_sharding=False)
        module.lora_scale = alpha / rank
    if not has_lora(model):
        raise ValueError(f"config.lora.targets={targets}: no such Dense layer in the model")
    return model


def has_lora(model) -> bool:
    return any(_is_dense(m) and m.lora_a is not None for _, m in nnx.iter_modules(model))


def trainable(model):
    """The filter of trained variables: the adapters when the model has any, else every Param."""
    return LoRAParam if has_lora(model) else nnx.Param


def merged_kernel(kernel, a, b, scale, stacked=False):
    """W + scale * A B on the host, in the kernel's dtype (one tensor at a time when exporting).
    stacked: kernel, A and B hold every layer's on a leading axis (scan_layers)."""
    if stacked:
        return np.stack([merged_kernel(*layer, scale) for layer in zip(kernel, a, b)])
    w = np.asarray(kernel, np.float32) + scale * np.tensordot(np.asarray(a, np.float32), np.asarray(b, np.float32), 1)
    return w.astype(np.asarray(kernel).dtype)


def merge(model):
    """Fold every adapter into its kernel in place and drop it: a plain model, same logits."""
    from sftmix_jax import sharding

    for _, module in nnx.iter_modules(model):
        if _is_dense(module) and module.lora_a is not None:
            w = module.kernel[...]
            merged = merged_kernel(w, module.lora_a[...], module.lora_b[...], module.lora_scale,
                                   sharding.layer_stacked(module.kernel))
            module.kernel[...] = jax.device_put(merged, w.sharding)
            module.lora_a = module.lora_b = nnx.data(None)
    return model


def count(model) -> dict:
    """Parameter counts: {'trainable': n, 'total': n}."""
    size = lambda f: sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, f)))  # noqa: E731
    return {"trainable": size(trainable(model)), "total": size(nnx.Param)}
