"""Streaming tokenization (data.streaming=True) for sets larger than host memory: rows are read and
tokenized one chunk at a time and appended to the tokenization cache entry (data/cache.py) that every stage then reads memory-mapped. Host memory holds one chunk of
rows plus 8 bytes per example per array for the offsets.

Differences from the in-memory path: the held-out rows are chosen by a seeded hash of each row's
id (a row count is not known up front), with probability eval_fraction; `num_examples` still
takes the first rows. Sources: local JSONL, local parquet, hub sets (`datasets` streaming).
"""
from __future__ import annotations

import collections
import hashlib
import json
import os

from etils import epath

from sftmix_jax.data import sources
from sftmix_jax.data.render import _INVALID

CHUNK = 1024


def row_chunks(source: str, split: str, num_examples: int = 0, chunk: int = CHUNK):
    """Lists of at most `chunk` rows, read lazily."""
    lower = source.lower()
    if lower.endswith(".jsonl"):
        def rows():
            with epath.Path(source).open() as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except json.JSONDecodeError:
                            yield {_INVALID: n}
    elif lower.endswith(".json"):
        raise ValueError(f"{source}: a JSON list cannot be streamed; write it as JSONL (one object a line) "
                         "or set data.streaming=False")
    else:
        import datasets

        if lower.endswith(".parquet"):
            ds = datasets.load_dataset("parquet", data_files=source, split="train", streaming=True)
        else:
            name, split = (source.rsplit(":", 1) if ":" in source and not os.path.exists(source) else (source, split))
            ds = datasets.load_dataset(name, split=split, streaming=True)
        rows = lambda: iter(ds)  # noqa: E731
    buf = []
    for n, row in enumerate(rows()):
        if num_examples and n >= num_examples:
            break
        buf.append(row)
        if len(buf) == chunk:
            yield buf
            buf = []
    if buf:
        yield buf


def is_held_out(row_id: str, seed: int, fraction: float) -> bool:
    h = hashlib.blake2b(f"{seed}\x00{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


def build(cfg, tokenizer, seed: int, writers: dict) -> dict:
    """Tokenize cfg.source chunk by chunk into writers['train'] / ['held'] (cache.Writer); the stats."""
    if cfg.get("mixture") or cfg.source == "synthetic" or cfg.eval_source:
        raise ValueError("data.streaming=True reads one data.source (not a mixture, the synthetic suite or an "
                         "eval_source); set data.streaming=False")
    sources.check_template_fits(cfg, tokenizer)
    stats = {"rows": 0, "bad": {}, "bad_ids": {}, "truncated": 0, "dropped_too_long": 0}
    bad, bad_ids, seen = collections.Counter(), collections.defaultdict(list), set()
    for rows in row_chunks(cfg.source, cfg.split, cfg.num_examples):
        start = stats["rows"]
        ids = [str(r[cfg.fields.id]) if r.get(cfg.fields.id) is not None else str(start + i) for i, r in enumerate(rows)]
        dups = [i for i in ids if i in seen] + [i for i, c in collections.Counter(ids).items() if c > 1]
        if dups:
            raise ValueError(f"{cfg.source}: id {dups[0]!r} occurs more than once (ids must be unique for the "
                             "confidence stage)")
        seen.update(ids)
        examples, bad_rows, counts = sources._convert_chunk(rows, ids, cfg.format, cfg.fields, tokenizer, cfg)
        sources.tally(bad, bad_ids, stats, bad_rows, counts)
        for e, rid in zip(examples, ids):
            if e is not None:
                writers["held" if is_held_out(rid, seed, cfg.eval_fraction) else "train"].add(e)
        stats["rows"] += len(rows)
    n_bad = sum(bad.values())
    if stats["rows"] and n_bad / stats["rows"] > cfg.max_bad_fraction:
        raise ValueError(f"{cfg.source}: {n_bad} of {stats['rows']} rows are bad (> data.max_bad_fraction="
                         f"{cfg.max_bad_fraction}): reasons {dict(bad)}, first ids {dict(bad_ids)}")
    stats.update(bad=dict(bad), bad_ids=dict(bad_ids), train=writers["train"].n, held_out=writers["held"].n)
    return stats
