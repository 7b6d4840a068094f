"""Per-example response NLL, one jitted forward pass (no gradients): shared by the confidence
replay, the held-out loss and multiple-choice scoring."""
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from tqdm.auto import tqdm

from sftmix_jax import losses, sharding
from sftmix_jax.data.batching import PackedBatches, eval_batches
from sftmix_jax.ops import cpu


def nll_forward(graphdef, state, batch, segments: int = 1):
    """Forward only: per-row summed response NLL and token count, replicated to every host.

    A packed batch (`segment_ids`, `positions`: data/batching.py PackedBatches) gives them per
    (row, example) [B, segments] instead.
    """
    model = nnx.merge(graphdef, state)
    if "segment_ids" not in batch:  # the head runs fused, on response tokens only
        nll_B = losses.response_nll(model.hidden(batch["input_ids"]), model.linear_head(), batch["targets"], batch["weights"])
        return sharding.constrain(nll_B, (None,)), sharding.constrain(jnp.sum(batch["weights"], -1), (None,))
    seg_BL = batch["segment_ids"]
    h_BLD = model.hidden(batch["input_ids"], positions_BL=batch["positions"], segment_ids_BL=seg_BL)
    nll_BZ = losses.response_nll(h_BLD, model.linear_head(), batch["targets"], batch["weights"],
                                 segment_ids_BL=seg_BL, segments=segments)
    in_BLZ = seg_BL[..., None] == jnp.arange(1, segments + 1)
    count_BZ = jnp.sum(jnp.where(in_BLZ, batch["weights"][..., None], 0.0), axis=1)
    return sharding.constrain(nll_BZ, (None, None)), sharding.constrain(count_BZ, (None, None))


@functools.cache
def _jitted_nll_forward():  # built on first use: the compile options depend on the backend
    return jax.jit(nll_forward, static_argnames=("graphdef", "segments"), compiler_options=cpu.compiler_options("forward"))


def _example_nll(graphdef, state, batch, segments=1):
    return _jitted_nll_forward()(graphdef, state, batch, segments)


def example_nll(model, examples, batch_size, buckets, pad_id=0, mesh=None, desc=None, pack=True):
    """Per-example (summed response NLL [n], response token count [n]), in examples' order.

    pack: several examples per row (PackedBatches; attention stays within each); else one per row,
    batches sorted by length (few pad tokens). On a mesh, rows are split over its batch axes.
    """
    graphdef, state = nnx.split(model)
    nll, count = np.zeros(len(examples)), np.zeros(len(examples))
    keys = ("input_ids", "targets", "weights")
    if pack:
        batches = PackedBatches(examples, batch_size, buckets, pad_id=pad_id)
        keys, segments, total = keys + ("segment_ids", "positions"), batches.segments, len(batches)
    else:
        batches = eval_batches(examples, batch_size, buckets, pad_id=pad_id)
        segments, total = 1, -(-len(examples) // batch_size)
    for batch in tqdm(batches, total=total, desc=desc, disable=desc is None or jax.process_index() != 0, leave=False):
        index = batch["index"]  # [B], or [B, segments] packed; -1: no example
        batch = {k: batch[k] for k in keys}
        if mesh is not None:
            with jax.set_mesh(mesh):
                s, c = _example_nll(graphdef, state, sharding.global_batch(sharding.host_rows(batch), mesh), segments)
        else:
            s, c = _example_nll(graphdef, state, batch, segments)
        found = index >= 0
        nll[index[found]], count[index[found]] = np.asarray(s)[found], np.asarray(c)[found]
    return nll, count


def heldout_loss(model, examples, batch_size, buckets, pad_id=0, mesh=None, out: str | None = None,
                 pack=True) -> dict:
    """Token-mean response NLL over the held-out set, and its perplexity.

    out: a JSONL file for each example's summed response NLL and token count (paired tests).
    pack: `example_nll`'s (config.scoring.pack).
    """
    nll, count = example_nll(model, examples, batch_size, buckets, pad_id, mesh, pack=pack)
    if out:
        epath.Path(out).write_text("".join(json.dumps({"id": e.id, "nll": float(n), "tokens": int(c)}) + "\n"
                                           for e, n, c in zip(examples, nll, count)))
    loss = float(nll.sum() / max(count.sum(), 1))
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": float(count.sum())}
