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


def hidden_forward(graphdef, state, batch):
    """The body, forward only: final hidden states h_BLD (packed rows: with their segments)."""
    return nnx.merge(graphdef, state).hidden(batch["input_ids"], positions_BL=batch.get("positions"),
                                             segment_ids_BL=batch.get("segment_ids"))


def head_nll(graphdef, state, h_BLD, batch, segments: int = 1):
    """The head on h_BLD: per-row summed response NLL and token count, replicated to every host.

    A packed batch (`segment_ids`: data/batching.py PackedBatches) gives them per (row, example)
    [B, segments] instead.
    """
    head = nnx.merge(graphdef, state).linear_head()
    if "segment_ids" not in batch:  # the head runs fused, on response tokens only
        nll_B = losses.response_nll(h_BLD, head, batch["targets"], batch["weights"])
        return sharding.constrain(nll_B, (None,)), sharding.constrain(jnp.sum(batch["weights"], -1), (None,))
    seg_BL = batch["segment_ids"]
    nll_BZ = losses.response_nll(h_BLD, head, batch["targets"], batch["weights"], segment_ids_BL=seg_BL,
                                 segments=segments)
    in_BLZ = seg_BL[..., None] == jnp.arange(1, segments + 1)
    count_BZ = jnp.sum(jnp.where(in_BLZ, batch["weights"][..., None], 0.0), axis=1)
    return sharding.constrain(nll_BZ, (None, None)), sharding.constrain(count_BZ, (None, None))


def nll_forward(graphdef, state, batch, segments: int = 1):
    """`head_nll` of `hidden_forward`, as one function (`score_batch` may jit the two apart)."""
    return head_nll(graphdef, state, hidden_forward(graphdef, state, batch), batch, segments)


@functools.cache
def _jitted(body_kind: str) -> tuple:  # built on first use: the compile options depend on the backend
    """(nll_forward,) jitted, or, for a body compiled otherwise than the head ("forward"), the body and
    the head jitted apart, so that XLA:CPU runs each one's matmuls in the library faster for it
    (ops/cpu.py `forward_body_kind`). One jit where it can: a second dispatch costs a small model."""
    head = cpu.compiler_options("forward")
    if body_kind == "forward":
        return (jax.jit(nll_forward, static_argnames=("graphdef", "segments"), compiler_options=head),)
    return (jax.jit(hidden_forward, static_argnames="graphdef", compiler_options=cpu.compiler_options(body_kind)),
            jax.jit(head_nll, static_argnames=("graphdef", "segments"), compiler_options=head))


def score_batch(graphdef, state, batch, hidden_size: int, segments: int = 1):
    """`nll_forward` as scoring runs it, for a model of this hidden size (`_jitted`)."""
    fns = _jitted(cpu.forward_body_kind(hidden_size))
    if len(fns) == 1:
        return fns[0](graphdef, state, batch, segments)
    body, head = fns
    return head(graphdef, state, body(graphdef, state, batch), batch, segments)


def example_nll(model, examples, batch_size, buckets, pad_id=0, mesh=None, desc=None, pack=True):
    """Per-example (summed response NLL [n], response token count [n]), in examples' order.

    pack: several examples per row (PackedBatches; attention stays within each); else one per row,
    batches sorted by length (few pad tokens). On a mesh, rows are split over its batch axes.
    """
    graphdef, state = nnx.split(model)
    width = model.cfg.hidden_size
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
                s, c = score_batch(graphdef, state, sharding.global_batch(sharding.host_rows(batch), mesh), width, segments)
        else:
            s, c = score_batch(graphdef, state, batch, width, segments)
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
