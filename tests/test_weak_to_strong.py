"""Weak-to-strong (SFTMIX.md, stage 1): a reference model with its own tokenizer and chat template.

The target is the tiny pipeline's byte-level Llama; the reference is a Gemma-2 with a BPE
tokenizer learnt in code (other ids for the same text). The reference trains and replays its own
tokenization of the same rows; its scores join the target's examples by id; the NTP baseline is
an NTP run of the target model.
"""
import importlib.util
import json
import os

import numpy as np
import pytest

from conftest import ROOT, tiny_config

W2S = {"train.steps": 12, "train.save_every": 4, "train.eval_every": 12, "evaluate.exact_match": False,
       "data.synthetic.num_train": 96, "data.synthetic.num_eval": 16}


@pytest.fixture(scope="module")
def weak_reference(tmp_path_factory):
    """A tiny random Gemma-2 (the paper's weak reference is Gemma) with the BPE tokenizer, in HF format."""
    spec = importlib.util.spec_from_file_location("weak_reference", os.path.join(ROOT, "tools", "weak_reference.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.write(str(tmp_path_factory.mktemp("weak") / "hf"), "gemma2", seed=1)


@pytest.fixture(scope="module")
def w2s_workdir(tmp_path_factory, weak_reference):
    from sftmix_jax import main

    d = str(tmp_path_factory.mktemp("w2s"))
    main.run_stages(tiny_config(**{**W2S, "reference.model_source": weak_reference}), d)
    return d


def test_the_ntp_baseline_is_the_target_model(w2s_workdir, weak_reference):
    summary = json.load(open(os.path.join(w2s_workdir, "summary.json")))
    assert set(summary["results"]) == {"NTP baseline", "SFTMix"}
    assert summary["models"] == {"NTP baseline": "init", "SFTMix": "init"}
    md = open(os.path.join(w2s_workdir, "summary.md")).read()
    assert md.startswith("# NTP baseline vs SFTMix")
    assert "**NTP baseline** = `init`" in md and f"weak reference `{weak_reference}`" in md
    # the baseline trains the target model (byte-level vocabulary); the reference keeps its own
    for stage, vocab in (("baseline", 264), ("sftmix", 264), ("reference", 384)):
        assert json.load(open(os.path.join(w2s_workdir, stage, "hf", "config.json")))["vocab_size"] == vocab
    rows = [json.loads(line) for line in open(os.path.join(w2s_workdir, "evaluate", "heldout_baseline.jsonl"))]
    assert sum(r["nll"] for r in rows) / sum(r["tokens"] for r in rows) == pytest.approx(
        summary["results"]["NTP baseline"]["loss"], rel=1e-12)


def _torch_perplexities(model_dir, rows):
    """exp(mean response NLL) per row under the HF model, with the chat template rendered by transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    out = []
    for r in rows:
        user = "\n\n".join(p for p in (r["instruction"], r["input"]) if p.strip())
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]
        full = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
        prompt = tok(tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
        assert full[: len(prompt)] == prompt
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([full])).logits[0], -1)
        targets = torch.tensor(full[len(prompt):])
        out.append(float(torch.exp(-logp[len(prompt) - 1: -1].gather(-1, targets[:, None]).mean())))
    return np.array(out)


def test_confidences_are_the_reference_models_own_perplexities(w2s_workdir):
    from sftmix_jax.data import synthetic

    scores = [json.loads(line) for line in open(os.path.join(w2s_workdir, "confidence", "scores.jsonl"))]
    rows = synthetic.generate(W2S["data.synthetic.num_train"], 0)
    assert [s["id"] for s in scores] == [r["id"] for r in rows]  # every target example, by id
    # The last replayed checkpoint is the final reference model, exported to reference/hf.
    ours = np.array([s["perplexity"][-1] for s in scores])
    theirs = _torch_perplexities(os.path.join(w2s_workdir, "reference", "hf"), rows[:24])
    np.testing.assert_allclose(ours[:24], theirs, rtol=2e-5)
    split = [s["split"] for s in scores]
    assert split.count("confident") == split.count("unconfident") == len(rows) // 2


def test_a_tokenizer_that_is_not_the_models_is_refused():
    from sftmix_jax.data import sources

    ex = sources.Example(id="row7", input_ids=np.array([1, 300, 2]), loss_mask=np.array([0, 1, 1], np.int8),
                         prompt_ids=np.array([1]), answer="x")
    with pytest.raises(ValueError, match=r"example 'row7' has token id 300 >= vocab_size 264"):
        sources.check_vocab([ex], 264, "the reference model")
    with pytest.raises(ValueError, match=r"1 training examples are missing .* ids \['row8'\]"):
        sources.select_ids([ex], ["row7", "row8"], "the reference model's tokenizer")
