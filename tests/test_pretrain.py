"""The pre-trained tiny base (pretrain.py) and a real 2-seed compare over it on a cut-down config."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
from conftest import ROOT, tiny_config

from sftmix_jax.stages import pretrain
from sftmix_jax.data import synthetic

# configs/tiny.py cut down: a few steps of everything, the base pre-trained in the test's cache.
CUT = dict(pretrain=dict(docs=256, heldout_docs=32, steps=12, batch_size=16),
           data=dict(num_train=64, num_eval=16), train=dict(steps=8, batch_size=16))


def cut_flags(cache):
    p, d, t = CUT["pretrain"], CUT["data"], CUT["train"]
    return [f"--config.pretrain.{k}={v}" for k, v in p.items()] + [f"--config.pretrain.cache={cache}"] + [
        f"--config.data.synthetic.{k}={v}" for k, v in d.items()] + [f"--config.train.{k}={v}" for k, v in t.items()] + [
        "--config.train.eval_every=4", "--config.train.save_every=4", "--config.reference.checkpoints=2",
        "--config.evaluate.exact_match=False", "--config.confidence.batch_size=32", "--config.evaluate.batch_size=16",
        "--config.data.buckets=(64,)"]  # one bucket, no generation: few compilations per run


def test_corpus_is_broad_and_never_the_suite():
    rows = synthetic.generate(600, 0)
    exclude = {(r["instruction"], r["input"]) for r in rows}
    docs = synthetic.corpus(3000, 62, seed=5, exclude=exclude, chat_fraction=0.5)
    assert docs == synthetic.corpus(3000, 62, seed=5, exclude=exclude, chat_fraction=0.5)
    assert all(len("".join(p + a for p, a in doc).encode()) <= 62 for doc in docs)
    lines = [line for doc in docs for line in doc]
    assert len(lines) > 1.5 * len(docs)
    chat = [(p, a) for p, a in lines if p.startswith("<|user|>")]
    plain = [(p, a) for p, a in lines if not p.startswith("<|user|>")]
    parsed = [(*p[:-len(" -> ")].split(": ", 1), a[:-1]) for p, a in plain]
    parsed += [(*p[len("<|user|>"):-len("<|end|><|assistant|>")].split("\n\n"), a[:-len("<|end|>\n")]) for p, a in chat]
    assert not {(i, x) for i, x, _ in parsed} & exclude
    families = {i.split(" '")[0] for i, _, _ in parsed}
    assert families == {"copy", "upper case", "reverse", "sort digits", "count", "add", "lower case", "length",
                        "subtract", "max digit"}
    # chat turns only for families outside the instruction suite, about half of them
    suite = {"copy", "upper case", "reverse", "sort digits", "add"}
    assert chat and not any(p[len("<|user|>"):].split("\n")[0] in suite or "count" in p for p, _ in chat)
    outside = [i for i, _, _ in parsed if i in ("lower case", "length", "subtract", "max digit")]
    assert 0.4 < len(chat) / len(outside) < 0.6
    for instruction, inp, out in parsed:  # the answers are computed
        if instruction == "subtract":
            a, b = inp.split("-")
            assert int(a) - int(b) == int(out)
        if instruction == "reverse":
            assert inp[::-1] == out


def test_documents_train_on_the_answers_only():
    c = tiny_config(**{"pretrain.docs": 20, "pretrain.heldout_docs": 4})
    tok = synthetic.make_tokenizer()
    train, held = pretrain.documents(c, tok)
    assert len(train) == 20 and len(held) == 4
    for e in train + held:
        assert e.input_ids[0] == tok.bos_token_id and len(e.input_ids) <= c.data.max_length
        text = tok.decode(e.input_ids[e.loss_mask == 1])
        assert "->" not in text and "<|user|>" not in text and text.endswith("\n")


def test_cache_key_names_what_the_weights_depend_on():
    c = tiny_config()
    key = pretrain.cache_key(c)
    c.seed, c.pretrain.cache, c.train.lr = 7, "/elsewhere", 1.0  # the fine-tuning seed and recipe: same base
    assert pretrain.cache_key(c) == key
    c.data.synthetic.num_train = 10  # a smaller suite: its prompts are excluded already
    assert pretrain.cache_key(c) == key
    for change in ({"pretrain.steps": 3}, {"model.init.hidden_size": 64}, {"data.synthetic.seed": 1},
                   {"data.synthetic.num_train": pretrain.EXCLUDED}):
        assert pretrain.cache_key(tiny_config(**change)) != key, change


def test_two_seed_compare_on_the_pretrained_base(tmp_path):
    """The whole command: the base pre-trained once and cached, 2 seeds x (NTP, SFTMix), compare.md/json/png;
    a rerun runs nothing and gives the same numbers. (The random-split arm, which links each seed's
    stages 1-2, is left out for time: test_compare.py runs it over fake runs.)"""
    cache, out = str(tmp_path / "cache"), str(tmp_path / "cmp")
    cmd = [sys.executable, "-m", "sftmix_jax.compare", "--config", "configs/tiny.py", "--workdir", out,
           "--seeds", "0-1", "--no-random-split", "--", *cut_flags(cache)]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    (base,) = glob.glob(os.path.join(cache, "*", "done.json"))  # one base for every seed and arm
    assert json.load(open(base))["steps"] == CUT["pretrain"]["steps"]
    logs = {s: open(os.path.join(out, f"seed{s}", "base.log")).read() for s in (0, 1)}
    assert "pre-training one in" in logs[0] and "pretrain: cached base" in logs[1]
    assert "pre-training one" not in logs[1]
    ref = json.load(open(os.path.join(out, "seed1", "base", "config.json")))
    assert ref["model"]["source"] == "pretrain" and ref["seed"] == 1

    result = json.load(open(os.path.join(out, "compare.json")))
    loss = result["metrics"]["held-out loss"]
    assert set(loss["arms"]) == {"NTP", "SFTMix"}
    assert all(len(a["per_seed"]) == 2 and np.isfinite(a["mean"]) for a in loss["arms"].values()), loss["arms"]
    assert set(loss["vs_NTP"]) == {"SFTMix"} and set(result["bootstrap_heldout_loss"]["SFTMix"]) == {"0", "1"}
    md = open(os.path.join(out, "compare.md")).read()
    assert "| SFTMix |" in md and os.path.getsize(os.path.join(out, "compare.png")) > 0

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("already complete") == 2, again.stdout[-2000:]
    assert json.load(open(os.path.join(out, "compare.json")))["metrics"] == result["metrics"]
