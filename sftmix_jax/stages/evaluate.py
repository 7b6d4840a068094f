"""Held-out metrics: response loss / perplexity, greedy exact match per task family; the stage
that compares the runs (multiple-choice accuracy: multiple_choice.py; the report: report.py).

`example_nll` (a jitted forward pass, no gradients) is shared with the confidence replay: it
returns each example's summed response NLL and token count.
"""
import collections
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from tqdm.auto import tqdm

from sftmix_jax import losses, sharding
from sftmix_jax.ops import cpu
from sftmix_jax.data.batching import eval_batches
from sftmix_jax.model.decode import generate


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


def exact_match(model, tokenizer, examples, max_new_tokens, batch_size=32) -> dict:
    """Greedy answers vs references (stripped), overall and per task family."""
    eos = tokenizer.eos_token_id
    outputs = generate(model, [e.prompt_ids.tolist() for e in examples], max_new_tokens, eos_id=eos,
                       pad_id=tokenizer.pad_token_id or 0, batch_size=batch_size)
    hits, seen = collections.Counter(), collections.Counter()
    for example, out in zip(examples, outputs):
        hit = tokenizer.decode(out, skip_special_tokens=True).strip() == example.answer.strip()
        for key in ["all"] + ([example.task] if example.task else []):
            seen[key] += 1
            hits[key] += hit
    return {k: hits[k] / seen[k] for k in sorted(seen)}


# ----------------------------------------------------------------------------------------
# Stage `evaluate`: NTP reference vs SFTMix on the same held-out set
# ----------------------------------------------------------------------------------------
def run(run) -> dict:
    from sftmix_jax import hf, multihost
    from sftmix_jax.stages import multiple_choice, report

    c = run.config
    held_out = run.data[1]
    if not held_out:
        raise ValueError("the evaluate stage needs held-out data: set config.data.eval_fraction > 0 or eval_source")
    mc = c.evaluate.get("multiple_choice")  # absent from configs older than it
    questions = None
    if mc and mc.source:  # read and checked before any model loads
        multiple_choice.check_batch_size(mc, run.mesh)
        questions = multiple_choice.load_questions(mc)
    other = c.evaluate.get("other") or {}  # absent from configs older than it
    other_set = None
    if other.get("source"):  # a set not trained on: how much of what the base knew survives
        from sftmix_jax.data import sources

        other_set = sources.load_other(c.data, other.source, other.num_examples, run.tokenizer)
    results = {}
    for stage, label in (("reference", "NTP reference"), ("sftmix", "SFTMix")):
        path = os.path.join(run.stage_dir(stage), "hf")
        if not multihost.agree(epath.Path(path, "config.json").exists()):
            logging.warning("evaluate: no %s model at %s, skipped", stage, path)
            continue
        model = hf.load_model(ml_collections.ConfigDict(dict(source=path, dtype=c.model.dtype, param_dtype=c.model.param_dtype,
                                                             remat="none", attention=c.model.get("attention", "auto"))),
                              mesh=run.mesh)
        per_example = os.path.join(run.stage_dir("evaluate"), f"heldout_{stage}.jsonl")
        m = heldout_loss(model, held_out, c.evaluate.batch_size, c.data.buckets, run.pad_id, run.mesh,
                         out=per_example if multihost.is_leader() else None)
        if other_set:
            out = os.path.join(run.stage_dir("evaluate"), f"other_{stage}.jsonl")
            m["other"] = {**heldout_loss(model, other_set, c.evaluate.batch_size, c.data.buckets, run.pad_id, run.mesh,
                                         out=out if multihost.is_leader() else None), "source": other.source}
        if c.evaluate.exact_match:
            m["exact_match"] = exact_match(model, run.tokenizer, held_out, c.evaluate.max_new_tokens,
                                           c.evaluate.batch_size)
        if questions:
            out = os.path.join(run.stage_dir("evaluate"), f"multiple_choice_{stage}.jsonl")
            m["multiple_choice"] = multiple_choice.evaluate(model, run.tokenizer, questions, mc, c.data.buckets, run.pad_id,
                                                            run.mesh, out=out if multihost.is_leader() else None)
        results[label] = m
        logging.info("evaluate %s: %s", label, m)
    summary = {"heldout_examples": len(held_out), "results": results, "config": json.loads(c.to_json_best_effort())}
    if multihost.is_leader():
        report.write(run.workdir, summary)
    return {"results": results}
