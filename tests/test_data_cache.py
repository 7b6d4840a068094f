"""The tokenization cache (data/cache.py): a second run reads the examples instead of tokenizing."""
import json
import logging
import os

import numpy as np
import pytest

from sftmix_jax.data import cache, sources, synthetic


@pytest.fixture
def data_cfg(tmp_path):
    rows = [{"id": f"r{i}", "instruction": f"Echo {i}", "input": "" if i % 3 else "x y", "output": f"{i} " * (i % 7 + 1)}
            for i in range(60)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = sources.default_config()
    cfg.update(dict(source=str(path), eval_fraction=0.2, cache_dir=str(tmp_path / "cache"), max_length=32))
    return cfg


def same(a, b):
    assert [e.id for e in a] == [e.id for e in b] and [e.answer for e in a] == [e.answer for e in b]
    for x, y in zip(a, b):
        for f in ("input_ids", "loss_mask", "prompt_ids"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f))
        assert x.task == y.task


def test_a_second_load_reads_the_cache(data_cfg, monkeypatch, caplog):
    tok = synthetic.make_tokenizer()
    caplog.set_level(logging.INFO)
    fresh = sources.load_examples(data_cfg, tok, seed=3)
    first = cache.load_examples(data_cfg, tok, seed=3)
    assert "cached in" in caplog.text and len(os.listdir(data_cfg.cache_dir)) == 1
    assert "read from the tokenization cache" not in caplog.text  # the builder keeps what it built
    monkeypatch.setattr(sources, "load_examples", lambda *a: pytest.fail("tokenized again"))
    second = cache.load_examples(data_cfg, tok, seed=3)
    assert "read from the tokenization cache" in caplog.text
    for a, b, c in zip(fresh[:2], first[:2], second[:2]):
        same(a, b)
        same(a, c)
    assert fresh[2] == first[2] == second[2]  # the stats: bad rows, truncations


def test_the_key_follows_what_the_examples_depend_on(data_cfg):
    tok = synthetic.make_tokenizer()
    k = cache.key(data_cfg, tok, 0)
    assert cache.key(data_cfg, tok, 0) == k
    assert cache.key(data_cfg, tok, 1) != k  # the held-out split
    for change in (dict(max_length=48), dict(template="alpaca"), dict(overflow="drop")):
        c = data_cfg.copy_and_resolve_references()
        c.update(change)
        assert cache.key(c, tok, 0) != k, change
    c = data_cfg.copy_and_resolve_references()
    c.update(dict(buckets=(16,), cache_dir="/elsewhere"))  # batching only: the same examples
    assert cache.key(c, tok, 0) == k
    other = synthetic.make_tokenizer()
    other.chat_template = other.chat_template.replace("<|end|>", "<|end|>\n")
    assert cache.key(data_cfg, other, 0) != k
    assert cache.key(data_cfg, synthetic.bpe_tokenizer(), 0) != k
    with open(data_cfg.source, "a") as f:  # the data file changed
        f.write(json.dumps({"id": "new", "instruction": "a", "output": "b"}) + "\n")
    assert cache.key(data_cfg, tok, 0) != k


def test_streaming_tokenizes_chunk_by_chunk_into_the_cache(tmp_path, caplog):
    """data.streaming: the same examples as the in-memory path (held out by a hash of the id instead)."""
    from sftmix_jax.data import stream

    tok = synthetic.make_tokenizer()
    rows = [{"id": f"r{i}", "instruction": f"Echo {i}" * (i % 4 + 1), "output": "" if i % 50 == 7 else f"{i}",
             "task": "echo"} for i in range(2500)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    cfg = sources.default_config()
    cfg.update(dict(source=str(path), eval_fraction=0.1, max_length=24, max_bad_fraction=0.1, cache_dir=str(tmp_path / "c")))
    mem_train, mem_held, mem_stats = sources.load_examples(cfg, tok, seed=0)
    cfg.streaming = True
    caplog.set_level(logging.INFO)
    train, held, stats = cache.load_examples(cfg, tok, seed=0)
    assert abs(len(held) / (len(train) + len(held)) - 0.1) < 0.02
    assert all(stream.is_held_out(e.id, 0, 0.1) for e in held) and not any(stream.is_held_out(e.id, 0, 0.1) for e in train)
    by_id = {e.id: e for e in mem_train + mem_held}
    assert sorted(by_id) == sorted(e.id for e in train + held)
    same([by_id[e.id] for e in train + held], train + held)
    for k in ("rows", "bad", "truncated", "dropped_too_long"):
        assert stats[k] == mem_stats[k], k
    assert stats["bad"] == {"empty_response": 50, "invalid_json": 1}
    assert "read from the tokenization cache" not in caplog.text
    assert len(cache.load_examples(cfg, tok, seed=0)[0]) == len(train) and "read from the tokenization cache" in caplog.text
    cfg.source = str(tmp_path / "rows.json")  # a JSON list has to be read whole
    (tmp_path / "rows.json").write_text(json.dumps(rows[:10]))
    with pytest.raises(ValueError, match="a JSON list cannot be streamed"):
        cache.load_examples(cfg, tok, seed=0)
