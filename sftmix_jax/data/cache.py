"""Tokenized examples cached on disk, shared by every stage, run and process.

The key covers everything the examples depend on: the data config (sources and their sizes and
modification times, format, fields, template, max_length, overflow, held-out split), the seed,
the tokenizer (its vocabulary and merges, chat template, special tokens) and a format version.
Process 0 builds a missing entry while the others wait, then every process reads it; a process
that cannot see the entry (a cache dir that is not shared) builds its own. The synthetic suite
is generated in seconds and not cached. `data.cache_dir=''` turns the cache off.
"""
from __future__ import annotations

import array
import hashlib
import json
import os
import shutil
import time

import numpy as np
from absl import logging

from sftmix_jax import multihost
from sftmix_jax.data import sources, stream

VERSION = 4  # bump when Example or the tokenization changes what a key should give


def _source_stamp(source: str) -> str:
    """A local file's size and mtime (edited data gets a new key); hub ids by name."""
    if source and os.path.exists(source):
        st = os.stat(source)
        return f"{os.path.abspath(source)}:{st.st_size}:{st.st_mtime_ns}"
    return source


def tokenizer_stamp(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [type(tokenizer).__name__, backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items())),
             str(getattr(tokenizer, "chat_template", None)), str(tokenizer.special_tokens_map)]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def key(cfg, tokenizer, seed: int) -> str:
    c = cfg.to_dict()
    for k in ("cache_dir", "buckets", "synthetic", "num_proc"):
        c.pop(k, None)
    stamps = [_source_stamp(s) for s in [cfg.source, cfg.get("eval_source", "")] +
              [m["source"] for m in cfg.get("mixture") or ()]]
    blob = json.dumps([VERSION, c, stamps, seed, tokenizer_stamp(tokenizer)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


# The entry's layout, per split (train, held): one raw file per array, memory-mapped when read
# (strings as UTF-8 bytes: a fixed-width str array would pad every row to the longest), and the
# end of each example in it (offsets, .npy).
ARRAYS = {"tokens": np.int32, "mask": np.int8, "prompt": np.int32, "ids": np.uint8, "answers": np.uint8,
          "tasks": np.uint8}
OFFSETS = {"tokens": "offsets", "prompt": "prompt_offsets", "ids": "ids_offsets", "answers": "answers_offsets",
           "tasks": "tasks_offsets"}  # the mask shares the tokens' offsets


class Writer:
    """One split of an entry, appended example by example (host memory: 8 bytes per example per array)."""

    def __init__(self, directory: str, prefix: str):
        self.dir, self.prefix, self.n = directory, prefix, 0
        self.files = {k: open(os.path.join(directory, f"{prefix}_{k}.bin"), "wb") for k in ARRAYS}
        self.ends = {k: array.array("q", [0]) for k in OFFSETS}

    def add(self, e: sources.Example) -> None:
        parts = {"tokens": np.asarray(e.input_ids, np.int32), "mask": np.asarray(e.loss_mask, np.int8),
                 "prompt": np.asarray(e.prompt_ids, np.int32), "ids": e.id.encode(), "answers": e.answer.encode(),
                 "tasks": (e.task or "").encode()}
        for k, v in parts.items():
            self.files[k].write(v if isinstance(v, bytes) else v.tobytes())
            if k in self.ends:
                self.ends[k].append(self.ends[k][-1] + len(v))
        self.n += 1

    def finish(self) -> None:
        for f in self.files.values():
            f.close()
        for k, name in OFFSETS.items():
            np.save(os.path.join(self.dir, f"{self.prefix}_{name}.npy"), np.frombuffer(self.ends[k], np.int64))


def _unstrings(data: np.ndarray, off: np.ndarray) -> list[str]:
    raw = data.tobytes()
    return [raw[off[n]:off[n + 1]].decode() for n in range(len(off) - 1)]


def _split(path: str, prefix: str) -> list:
    def mapped(k):  # a plain ndarray view of the map: slices of an np.memmap are several times heavier
        f = os.path.join(path, f"{prefix}_{k}.bin")
        return np.asarray(np.memmap(f, ARRAYS[k], "r")) if os.path.getsize(f) else np.zeros(0, ARRAYS[k])

    tokens, mask, prompt = mapped("tokens"), mapped("mask"), mapped("prompt")
    off, poff = (np.load(os.path.join(path, f"{prefix}_{OFFSETS[k]}.npy")) for k in ("tokens", "prompt"))
    ids, answers, tasks = (_unstrings(mapped(k), np.load(os.path.join(path, f"{prefix}_{OFFSETS[k]}.npy")))
                           for k in ("ids", "answers", "tasks"))
    return [sources.Example(id=i, input_ids=tokens[off[n]:off[n + 1]], loss_mask=mask[off[n]:off[n + 1]],
                            prompt_ids=prompt[poff[n]:poff[n + 1]], answer=a, task=t or None)
            for n, (i, a, t) in enumerate(zip(ids, answers, tasks))]


def read(path: str):
    """The examples' token arrays stay memory-mapped: pages come from disk (or the page cache
    that every process on the host shares) as batches touch them."""
    with open(os.path.join(path, "stats.json")) as f:
        return _split(path, "train"), _split(path, "held"), json.load(f)


def load_examples(cfg, tokenizer, seed: int):
    """sources.load_examples, through the cache: (train, held_out, stats)."""
    cache_dir = cfg.get("cache_dir", "")
    if cfg.get("streaming") and not cache_dir:
        raise ValueError("config.data.streaming=True writes the tokenized set to config.data.cache_dir: set one")
    if not cache_dir or cfg.source == "synthetic":
        return sources.load_examples(cfg, tokenizer, seed)
    path = os.path.join(os.path.expanduser(cache_dir), key(cfg, tokenizer, seed))
    built = _build(cfg, tokenizer, seed, path) if multihost.is_leader() and not os.path.exists(path) else None
    multihost.barrier("data cache")
    if built is not None:
        return built
    if not os.path.exists(path):  # a cache dir this process does not share with process 0
        return _build(cfg, tokenizer, seed, path)
    t = time.perf_counter()
    train, held, stats = read(path)
    logging.info("data %s: %d training and %d held-out examples read from the tokenization cache %s in %.1f s "
                 "(not tokenized again)", cfg.source, len(train), len(held), path, time.perf_counter() - t)
    return train, held, stats


def _build(cfg, tokenizer, seed, path):
    """Tokenize into a temporary directory, then rename it into place whole (complete or absent)."""
    t = time.perf_counter()
    tmp = f"{path}.{os.getpid()}.tmp"
    os.makedirs(tmp, exist_ok=True)
    writers = {"train": Writer(tmp, "train"), "held": Writer(tmp, "held")}
    if cfg.get("streaming"):  # chunk by chunk to disk (data/stream.py), then read back mapped
        stats = stream.build(cfg, tokenizer, seed, writers)
    else:
        train, held, stats = sources.load_examples(cfg, tokenizer, seed)
        for examples, w in ((train, writers["train"]), (held, writers["held"])):
            for e in examples:
                w.add(e)
    for w in writers.values():
        w.finish()
    with open(os.path.join(tmp, "stats.json"), "w") as f:
        json.dump(stats, f)
    try:
        os.rename(tmp, path)
    except OSError:  # another process put the same entry there first
        shutil.rmtree(tmp, ignore_errors=True)
    if cfg.get("streaming"):
        train, held, stats = read(path)
    logging.info("data %s: tokenized in %.1f s, cached in %s", cfg.source, time.perf_counter() - t, path)
    return train, held, stats
