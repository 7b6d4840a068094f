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
from sftmix_jax.data.batching import eval_batches
from sftmix_jax.ops import cpu


def nll_forward(graphdef, state, batch):
    """Forward only: per-row summed response NLL and token count, replicated to every host."""
    model = nnx.merge(graphdef, state)
    # the head runs fused, on response tokens only
    nll_B = losses.response_nll(model.hidden(batch["input_ids"]), model.linear_head(), batch["targets"], batch["weights"])
    return sharding.constrain(nll_B, (None,)), sharding.constrain(jnp.sum(batch["weights"], -1), (None,))


@functools.cache
def _jitted_nll_forward():  # built on first use: the compile options depend on the backend
    return jax.jit(nll_forward, static_argnames=("graphdef",), compiler_options=cpu.compiler_options("forward"))


def _example_nll(graphdef, state, batch):
    return _jitted_nll_forward()(graphdef, state, batch)


def example_nll(model, examples, batch_size, buckets, pad_id=0, mesh=None, desc=None):
    """Per-example (summed response NLL [n], response token count [n]), in examples' order.

    Batches are sorted by length (few pad tokens) and, on a mesh, split over its batch axes.
    """
    graphdef, state = nnx.split(model)
    nll, count = np.zeros(len(examples)), np.zeros(len(examples))
    total = -(-len(examples) // batch_size)
    for batch in tqdm(eval_batches(examples, batch_size, buckets, pad_id=pad_id), total=total, desc=desc,
                      disable=desc is None or jax.process_index() != 0, leave=False):
        index, rows = batch["index"], batch["index"] >= 0
        batch = {k: batch[k] for k in ("input_ids", "targets", "weights")}
        if mesh is not None:
            with jax.set_mesh(mesh):
                s, c = _example_nll(graphdef, state, sharding.global_batch(sharding.host_rows(batch), mesh))
        else:
            s, c = _example_nll(graphdef, state, batch)
        nll[index[rows]], count[index[rows]] = np.asarray(s)[rows], np.asarray(c)[rows]
    return nll, count


def heldout_loss(model, examples, batch_size, buckets, pad_id=0, mesh=None, out: str | None = None) -> dict:
    """Token-mean response NLL over the held-out set, and its perplexity.

    out: a JSONL file for each example's summed response NLL and token count (paired tests).
    """
    nll, count = example_nll(model, examples, batch_size, buckets, pad_id, mesh)
    if out:
        epath.Path(out).write_text("".join(json.dumps({"id": e.id, "nll": float(n), "tokens": int(c)}) + "\n"
                                           for e, n, c in zip(examples, nll, count)))
    loss = float(nll.sum() / max(count.sum(), 1))
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": float(count.sum())}
