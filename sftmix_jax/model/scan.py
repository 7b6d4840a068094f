"""model.scan_layers: the decoder blocks' parameters stacked on a leading "layers" axis and run
under one lax.scan (compile time flat in depth), and the per-layer view HF export needs."""
import jax
import jax.numpy as jnp
from flax import nnx

from sftmix_jax.sharding import LAYERS, layer_stacked


def stack_blocks(blocks):
    """One Block whose parameters are the blocks' stacked on a leading axis named "layers"."""
    graphdef, _ = nnx.split(blocks[0])
    states = [nnx.split(b)[1] for b in blocks]

    def stack(*vs):
        names = vs[0].get_metadata().get("out_sharding") or (None,) * vs[0].ndim
        return vs[0].replace(jnp.stack([v.get_value() for v in vs]), out_sharding=(LAYERS,) + tuple(names))

    return nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def scan_blocks(stacked, policies, remat, x_BLD, cos_BLH, sin_BLH, masks, cache, index):
    """The stacked blocks under one lax.scan: one block is traced and compiled, whatever the depth.

    Layers whose masks differ (Gemma-2's sliding and global ones) pick theirs from a stack of the
    distinct masks by a scanned index. cache: {"k", "v"} stacked per layer, or None.
    """
    distinct = list({id(m): m for m in masks}.values())
    if len(distinct) > 1 and any(m is None for m in distinct):  # one traced body: one attention path
        raise ValueError("model.scan_layers=True cannot mix masked layers with unmasked (fast-kernel) ones "
                         "(sliding-window and full layers without an attention soft-cap); set model.scan_layers=False")
    which_N = jnp.asarray([[id(d) for d in distinct].index(id(m)) for m in masks], jnp.int32)
    masks_UBLS = None if len(distinct) == 1 else jnp.stack(distinct)  # one mask (or Segments): used as is
    graphdef, params = nnx.split(stacked)

    def body(x_BLD, xs):
        layer_params, i, layer_cache = xs
        mask_BLS = distinct[0] if masks_UBLS is None else masks_UBLS[i]
        return nnx.merge(graphdef, layer_params)(x_BLD, cos_BLH, sin_BLH, mask_BLS, layer_cache, index)

    if remat != "none" and cache is None:
        body = jax.checkpoint(body, policy=policies[remat], prevent_cse=False)
    return jax.lax.scan(body, x_BLD, (params, which_N, cache))


def per_layer(state, num_layers: int):
    """(per-layer path, Variable, value getter) of each variable in the unrolled model's order: a
    scan_layers stack is taken apart layer by layer, where its first entry stood."""
    flat = list(nnx.to_flat_state(state))
    stacked = [(k, v) for k, v in flat if layer_stacked(v)]
    for key, var in flat:
        if not layer_stacked(var):
            yield key, var, var.get_value
        elif key == stacked[0][0]:
            for i in range(num_layers):
                for k, v in stacked:
                    yield k[:1] + (i,) + k[1:], v, lambda v=v, i=i: v.get_value()[i]
