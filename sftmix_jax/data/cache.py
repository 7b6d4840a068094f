"""Tokenized examples cached on disk, shared by every stage, run and process.

The key covers everything the examples depend on: the data config (sources and their sizes and
modification times, format, fields, template, max_length, overflow, held-out split), the seed,
the tokenizer (its vocabulary and merges, chat template, special tokens) and a format version.
Process 0 builds a missing entry while the others wait, then every process reads it; a process
that cannot see the entry (a cache dir that is not shared) builds its own. The synthetic suite
is generated in seconds and not cached. `data.cache_dir=''` turns the cache off.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import numpy as np
from absl import logging

from sftmix_jax import multihost
from sftmix_jax.data import sources, stream

VERSION = 3  # bump when Example or the tokenization changes what a key should give


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


def _strings(xs) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes of all strings and their offsets (a fixed-width str array pads every row to the longest)."""
    data = [x.encode() for x in xs]
    return np.frombuffer(b"".join(data), np.uint8), np.cumsum([0] + [len(d) for d in data]).astype(np.int64)


def _unstrings(data: np.ndarray, off: np.ndarray) -> list[str]:
    raw = np.asarray(data).tobytes()
    return [raw[off[n]:off[n + 1]].decode() for n in range(len(off) - 1)]


def _pack(examples, prefix: str) -> dict:
    cat = lambda xs, dt: np.concatenate([np.asarray(x, dt) for x in xs]) if xs else np.zeros(0, dt)  # noqa: E731
    offsets = lambda xs: np.cumsum([0] + [len(x) for x in xs]).astype(np.int64)  # noqa: E731
    tokens, prompts = [e.input_ids for e in examples], [e.prompt_ids for e in examples]
    strings = {}
    for name, xs in (("ids", [e.id for e in examples]), ("answers", [e.answer for e in examples]),
                     ("tasks", [e.task or "" for e in examples])):
        strings[f"{prefix}_{name}"], strings[f"{prefix}_{name}_offsets"] = _strings(xs)
    return {**strings, f"{prefix}_tokens": cat(tokens, np.int32), f"{prefix}_offsets": offsets(tokens),
            f"{prefix}_mask": cat([e.loss_mask for e in examples], np.int8),
            f"{prefix}_prompt": cat(prompts, np.int32), f"{prefix}_prompt_offsets": offsets(prompts)}


def _unpack(z, prefix: str) -> list:
    off, poff = z[f"{prefix}_offsets"], z[f"{prefix}_prompt_offsets"]
    tokens, mask, prompt = z[f"{prefix}_tokens"], z[f"{prefix}_mask"], z[f"{prefix}_prompt"]
    ids, answers, tasks = (_unstrings(z[f"{prefix}_{k}"], z[f"{prefix}_{k}_offsets"]) for k in ("ids", "answers", "tasks"))
    return [sources.Example(id=i, input_ids=tokens[off[n]:off[n + 1]], loss_mask=mask[off[n]:off[n + 1]],
                            prompt_ids=prompt[poff[n]:poff[n + 1]], answer=a, task=t or None)
            for n, (i, a, t) in enumerate(zip(ids, answers, tasks))]


def save(path: str, train, held, stats) -> None:
    """A directory of .npy arrays (read back memory-mapped) and stats.json, renamed into place whole."""
    tmp = f"{path}.{os.getpid()}.tmp"
    os.makedirs(tmp, exist_ok=True)
    for name, array in {**_pack(train, "train"), **_pack(held, "held")}.items():
        np.save(os.path.join(tmp, name + ".npy"), array)
    with open(os.path.join(tmp, "stats.json"), "w") as f:
        json.dump(stats, f)
    try:
        os.rename(tmp, path)  # complete or absent
    except OSError:  # another process put the same entry there first
        shutil.rmtree(tmp, ignore_errors=True)


def read(path: str):
    """The examples' token arrays stay memory-mapped: pages come from disk (or the page cache
    that every process on the host shares) as batches touch them."""
    # plain ndarray views of the maps: slices of an np.memmap are several times heavier objects
    z = {f[:-4]: np.asarray(np.load(os.path.join(path, f), mmap_mode="r")) for f in os.listdir(path) if f.endswith(".npy")}
    with open(os.path.join(path, "stats.json")) as f:
        return _unpack(z, "train"), _unpack(z, "held"), json.load(f)


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
    t = time.perf_counter()
    if cfg.get("streaming"):  # chunk by chunk to disk (data/stream.py), then read back mapped
        tmp = f"{path}.{os.getpid()}.tmp"
        os.makedirs(tmp, exist_ok=True)
        with open(os.path.join(tmp, "stats.json"), "w") as f:
            json.dump(stream.build(cfg, tokenizer, seed, tmp), f)
        os.rename(tmp, path)
        train, held, stats = read(path)
    else:
        train, held, stats = sources.load_examples(cfg, tokenizer, seed)
        save(path, train, held, stats)
    logging.info("data %s: tokenized in %.1f s, cached in %s", cfg.source, time.perf_counter() - t, path)
    return train, held, stats
