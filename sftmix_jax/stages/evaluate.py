"""Stage evaluate: the NTP (reference or, weak-to-strong, baseline) and SFTMix models on the same held-out set: response loss /
perplexity (scoring.py), greedy exact match per task family, multiple-choice accuracy
(multiple_choice.py), a set not trained on; then the report (report.py).
"""
import collections
import json
import os

import ml_collections
from absl import logging
from etils import epath

from sftmix_jax import hf, multihost, scoring
from sftmix_jax.data import sources
from sftmix_jax.model.decode import generate
from sftmix_jax.stages import multiple_choice, report


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
# Stage `evaluate`: NTP vs SFTMix on the same held-out set
# ----------------------------------------------------------------------------------------
def run(run) -> dict:
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
        other_set = sources.load_other(c.data, other.source, other.num_examples, run.tokenizer)
    results = {}
    cfg = json.loads(c.to_json_best_effort())
    recorded = epath.Path(run.workdir, "config.json")  # model.source as configured, before 'pretrain' resolves
    as_configured = json.loads(recorded.read_text()) if recorded.exists() else cfg
    for stage, label in report.runs(cfg):  # weak-to-strong: the NTP baseline of the target model
        path = os.path.join(run.stage_dir(stage), "hf")
        if not multihost.agree(epath.Path(path, "config.json").exists()):
            logging.warning("evaluate: no %s model at %s, skipped", stage, path)
            continue
        model = hf.load_model(ml_collections.ConfigDict(dict(source=path, dtype=c.model.dtype, param_dtype=c.model.param_dtype,
                                                             remat="none", attention=c.model.get("attention", "auto"),
                                                             scan_layers=c.model.get("scan_layers", False))),
                              mesh=run.mesh)
        per_example = os.path.join(run.stage_dir("evaluate"), f"heldout_{stage}.jsonl")
        m = scoring.heldout_loss(model, held_out, c.evaluate.batch_size, c.data.buckets, run.pad_id, run.mesh,
                         out=per_example if multihost.is_leader() else None, pack=c.scoring.pack)
        if other_set:
            out = os.path.join(run.stage_dir("evaluate"), f"other_{stage}.jsonl")
            m["other"] = {**scoring.heldout_loss(model, other_set, c.evaluate.batch_size, c.data.buckets, run.pad_id, run.mesh,
                                         out=out if multihost.is_leader() else None, pack=c.scoring.pack),
                          "source": other.source}
        if c.evaluate.exact_match:
            m["exact_match"] = exact_match(model, run.tokenizer, held_out, c.evaluate.max_new_tokens,
                                           c.evaluate.batch_size)
        if questions:
            out = os.path.join(run.stage_dir("evaluate"), f"multiple_choice_{stage}.jsonl")
            m["multiple_choice"] = multiple_choice.evaluate(model, run.tokenizer, questions, mc, c.data.buckets, run.pad_id,
                                                            run.mesh, out=out if multihost.is_leader() else None,
                                                            pack=c.scoring.pack)
        results[label] = m
        logging.info("evaluate %s: %s", label, m)
    summary = {"heldout_examples": len(held_out), "results": results, "models": report.models(as_configured), "config": cfg}
    if multihost.is_leader():
        report.write(run.workdir, summary)
    return {"results": results}
