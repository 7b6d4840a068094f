"""Instruction data: load rows (files or hub sets), turn them into tokenized Examples with a
response mask (render.py renders and masks), split off the held-out set. Batching: batching.py.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from sftmix_jax.data import synthetic
from sftmix_jax.data.render import _INVALID, BadRow, mask_turns, render, render_turns, row_to_messages


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        source="synthetic",  # 'synthetic' | local .json/.jsonl/.parquet | hub id[:split]
        split="train",  # hub split when the source names none
        format="alpaca",  # 'alpaca' | 'messages' | 'sharegpt' | 'prompt_completion' | 'text'
        fields=ml_collections.ConfigDict(dict(
            # GPTeacher names its answer field 'response': fields.output='response'.
            instruction="instruction", input="input", output="output",
            messages="messages", conversations="conversations", id="id",
            prompt="prompt", completion="completion",  # format 'prompt_completion' (TRL's)
            text="text")),  # format 'text': plain documents, the loss on every token
        # A system message for rows without one (with the 'alpaca' template: the preamble in place
        # of "Below is an instruction ..."); '' = none.
        system_prompt="",
        template="chat",  # 'chat': tokenizer.apply_chat_template | 'alpaca': Stanford prompt + EOS
        max_length=512,
        overflow="truncate",  # 'truncate' | 'drop'
        num_examples=0,  # 0 = all rows; else the first N rows in file order
        eval_source="",  # separate held-out source; else eval_fraction of the rows
        eval_fraction=0.1,
        max_bad_fraction=0.05,
        num_proc=0,  # processes tokenizing sets of 20K+ rows; 0 = one per core, 1 = this process only
        streaming=False,  # True: read and tokenize chunk by chunk into cache_dir (sets larger than memory; stream.py)
        buckets=(64, 128, 256, 512),
        synthetic=ml_collections.ConfigDict(dict(num_train=2400, num_eval=240, seed=0)),
        # Tokenized examples, shared by stages, runs and processes (data/cache.py; a local or shared
        # filesystem path); '' = tokenize on every run. The synthetic suite is never cached.
        cache_dir="~/.cache/sftmix_jax/data",
        # Several sources at once: a list of dicts {source, weight, name, format, fields, split}
        # (format/fields/split default to the keys above). The training set takes rows of each in
        # proportion to the weights (`_mixture`); every source holds out eval_fraction of its rows.
        mixture=(),
    ))


@dataclasses.dataclass(eq=False)  # eq on numpy fields would be ambiguous
class Example:
    id: str
    input_ids: np.ndarray  # [L] int32, prompt + responses, each assistant turn ending in EOS
    loss_mask: np.ndarray  # [L] int8, 1 exactly on the tokens of the assistant turns
    prompt_ids: np.ndarray  # tokens up to the generation prompt of the last assistant turn
    answer: str  # text of the last assistant turn
    task: str | None = None


# ----------------------------------------------------------------------------------------
# Rows -> messages
# ----------------------------------------------------------------------------------------



def _read_json(path: str) -> list[dict]:
    """Local (or gs://) JSON list or JSONL, read row by row: errors name the line, a corrupt
    JSONL line becomes a counted bad row, and rows may differ in their fields or types
    (where datasets' Arrow loader would fail on the whole file with a schema error)."""
    text = epath.Path(path).read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path} is empty: expected a JSON list of rows or one JSON object per line")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    rows.append({_INVALID: n})
    bad = [i for i, r in enumerate(rows) if not isinstance(r, dict)]
    if bad:
        raise ValueError(f"{path}: rows must be JSON objects; rows {bad[:10]} are not")
    return rows


def _read_rows(source: str, default_split: str) -> list[dict]:
    import datasets  # Imported here: slow, and unused by the synthetic source.

    lower = source.lower()
    if lower.endswith((".json", ".jsonl")):
        return _read_json(source)
    if lower.endswith(".parquet"):
        ds = datasets.load_dataset("parquet", data_files=source, split="train")
    else:  # A hub id or a local dataset directory; 'id:split' picks a split.
        if os.path.exists(source) and not os.path.isdir(source):
            raise ValueError(f"{source}: unknown file type; use .json, .jsonl or .parquet")
        name, split = source, default_split
        if not os.path.exists(source) and ":" in source:
            name, split = source.rsplit(":", 1)
        ds = datasets.load_dataset(name, split=split)
    return ds.to_list()


def _row_ids(rows: list[dict], id_field: str, what: str) -> list[str]:
    """The row's own id when it has one, else its index in file order."""
    ids = [str(r[id_field]) if r.get(id_field) is not None else str(i) for i, r in enumerate(rows)]
    dups = [i for i, c in collections.Counter(ids).items() if c > 1]
    if dups:
        raise ValueError(f"{what}: {len(dups)} ids occur more than once (ids must be unique "
                         f"for the confidence stage), e.g. {dups[:10]}; fix the data or set "
                         "data.fields.id to a field that does not exist to use row indices")
    return ids


def _check_render_settings(cfg, tokenizer) -> None:
    if cfg.overflow not in ("truncate", "drop"):
        raise ValueError(f"data.overflow={cfg.overflow!r}; expected 'truncate' or 'drop'")
    if cfg.template not in ("chat", "alpaca"):
        raise ValueError(f"data.template={cfg.template!r}; expected 'chat' or 'alpaca'")
    if cfg.template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template; set data.template='alpaca'")
    if cfg.template == "alpaca" and tokenizer.eos_token is None:
        raise ValueError("data.template='alpaca' needs a tokenizer with an eos_token")


def _render_rows(rows, ids, fmt, fields, tokenizer, template, system_prompt="") -> list:
    """[(row, id, messages, texts)] per row; (row, id, None, [reason]) for a bad row."""
    rendered = []
    for row, rid in zip(rows, ids):
        try:
            messages = row_to_messages(row, fmt, fields)
            if system_prompt and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": system_prompt}] + messages
            rendered.append((row, rid, messages, render_turns(messages, tokenizer, template)))
        except BadRow as e:
            rendered.append((row, rid, None, list(e.args)))
    return rendered


def _example(row, rid, messages, token_lists, eos_id, cfg, stats):
    """An Example, or None when the row is dropped as too long; raises BadRow."""
    ids_L, mask_L, prompt_len = mask_turns(token_lists, eos_id)
    prompt_ids = ids_L[:prompt_len].copy()  # Before any cut: generation needs it whole.
    if len(ids_L) > cfg.max_length:
        # A cut that leaves no response token leaves nothing to learn: drop the row.
        if cfg.overflow == "drop" or not mask_L[: cfg.max_length].any():
            stats["dropped_too_long"] += 1
            return None
        ids_L, mask_L = ids_L[: cfg.max_length], mask_L[: cfg.max_length]
        stats["truncated"] += 1
    task = row.get("task")
    return Example(id=rid, input_ids=ids_L, loss_mask=mask_L, prompt_ids=prompt_ids, answer=messages[-1]["content"],
                   task=task if isinstance(task, str) else None)


def _text_chunk(rows, ids, fields, tokenizer, cfg, counts):
    """Format 'text' (plain documents, TRL's language-modelling format): BOS + text + EOS, the loss on
    every token after BOS; longer documents are cut at max_length (or dropped, overflow='drop')."""
    out, bad, texts = [], [], []
    for row, rid in zip(rows, ids):
        text = row.get(fields.text) if _INVALID not in row else None
        if not isinstance(text, str) or not text.strip():
            bad.append(("invalid_json" if _INVALID in row else f"missing_field:{fields.text}" if text is None
                        else "empty_text", rid))
        texts.append(text if isinstance(text, str) and text.strip() else "")
    encoded = tokenizer([t for t in texts if t], add_special_tokens=False)["input_ids"] if any(texts) else []
    encoded, bos, eos = iter(encoded), [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [], tokenizer.eos_token_id
    for row, rid, text in zip(rows, ids, texts):
        if not text:
            out.append(None)
            continue
        ids_L = np.asarray(bos + next(encoded) + [eos], np.int32)
        if len(ids_L) > cfg.max_length:
            counts["dropped_too_long" if cfg.overflow == "drop" else "truncated"] += 1
            if cfg.overflow == "drop":
                out.append(None)
                continue
            ids_L = ids_L[: cfg.max_length]
        mask_L = np.ones(len(ids_L), np.int8)
        mask_L[: len(bos)] = 0
        out.append(Example(id=rid, input_ids=ids_L, loss_mask=mask_L, prompt_ids=ids_L[: len(bos)], answer=text))
    return out, bad, counts


def _convert_chunk(rows, ids, fmt, fields, tokenizer, cfg):
    """One chunk of rows -> ([Example or None per row], [(reason, id) per bad row], counts)."""
    counts = {"truncated": 0, "dropped_too_long": 0}
    if fmt == "text":
        return _text_chunk(rows, ids, fields, tokenizer, cfg, counts)
    eos_id = tokenizer.eos_token_id if cfg.template == "alpaca" else None
    rendered = _render_rows(rows, ids, fmt, fields, tokenizer, cfg.template, cfg.get("system_prompt", ""))
    flat = [t for _, _, m, texts in rendered if m is not None for t in texts]
    # Chat templates write their own BOS; the Alpaca text relies on the tokenizer's.
    encoded = iter(tokenizer(flat, add_special_tokens=cfg.template == "alpaca")["input_ids"] if flat else [])
    out, bad = [], []
    for row, rid, messages, texts in rendered:
        try:
            if messages is None:
                raise BadRow(texts[0])
            out.append(_example(row, rid, messages, [next(encoded) for _ in texts], eos_id, cfg, counts))
        except BadRow as e:
            bad.append((e.args[0], rid))
            out.append(None)
    return out, bad, counts


PARALLEL_ROWS = 20_000
_WORKER = {}  # in a tokenizing worker process: (fmt, fields, tokenizer, cfg)


def _worker_init(*settings):
    _WORKER["settings"] = settings


def _worker_chunk(rows, ids):
    return _convert_chunk(rows, ids, *_WORKER["settings"])  # fewer rows tokenize faster than worker processes start


def _chunks(rows, ids, fmt, fields, tokenizer, cfg, chunk: int):
    """_convert_chunk over the rows in order: in worker processes (data.num_proc; 0 = one per core)
    for large sets, here otherwise. Workers are spawned, not forked: JAX's threads are running."""
    starts = range(0, len(rows), chunk)
    procs = cfg.get("num_proc", 0) or os.cpu_count() or 1
    if procs <= 1 or len(rows) < PARALLEL_ROWS:
        yield from (_convert_chunk(rows[s: s + chunk], ids[s: s + chunk], fmt, fields, tokenizer, cfg) for s in starts)
        return
    import concurrent.futures
    import multiprocessing

    # the tokenizer and settings go to each worker once (initializer), the rows chunk by chunk
    with concurrent.futures.ProcessPoolExecutor(min(procs, len(starts)), mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_worker_init, initargs=(fmt, fields, tokenizer, cfg)) as pool:
        yield from pool.map(_worker_chunk, (rows[s: s + chunk] for s in starts), (ids[s: s + chunk] for s in starts))


def tally(bad: collections.Counter, bad_ids: dict, stats: dict, bad_rows, counts: dict) -> None:
    """Add a chunk's bad rows (counted by reason, the first 5 ids kept) and counts."""
    for reason, rid in bad_rows:
        bad[reason] += 1
        if len(bad_ids[reason]) < 5:
            bad_ids[reason].append(rid)
    for k, n in counts.items():
        stats[k] += n


def _convert(rows, fmt, fields, tokenizer, cfg, what: str, stats: dict, chunk: int = 1024):
    """Rows -> [Example or None per row], adding to stats; raises above max_bad_fraction.

    Rows go in chunks: one tokenizer call per chunk lets the Rust tokenizer use every
    core, and the chunk bounds the memory held by Python lists of token ids.
    """
    if fmt != "text":  # plain documents use no template
        _check_render_settings(cfg, tokenizer)
    ids = _row_ids(rows, fields.id, what)
    bad, bad_ids, out = collections.Counter(), collections.defaultdict(list), []
    for examples, bad_rows, counts in _chunks(rows, ids, fmt, fields, tokenizer, cfg, chunk):
        out += examples
        tally(bad, bad_ids, stats, bad_rows, counts)
    n_bad = sum(bad.values())
    if n_bad:
        logging.warning("%s: skipped %d of %d rows: %s; first ids %s", what, n_bad, len(rows), dict(bad), dict(bad_ids))
    if rows and n_bad / len(rows) > cfg.max_bad_fraction:
        raise ValueError(f"{what}: {n_bad} of {len(rows)} rows are bad "
                         f"(> data.max_bad_fraction={cfg.max_bad_fraction}): reasons "
                         f"{dict(bad)}, first ids {dict(bad_ids)}")
    stats["rows"] += len(rows)
    for reason, n in bad.items():
        stats["bad"][reason] = stats["bad"].get(reason, 0) + n
        stats["bad_ids"][reason] = (stats["bad_ids"].get(reason, []) + bad_ids[reason])[:5]
    return out


def check_template_fits(cfg, tokenizer) -> None:
    """Refuse a max_length that the prompt template alone fills: every row would be dropped."""
    minimal = [dict(role="user", content="x", instruction="x", input=""), dict(role="assistant", content="y")]
    n = len(tokenizer(render(tokenizer, cfg.template, minimal, False), add_special_tokens=cfg.template == "alpaca")["input_ids"])
    if n >= cfg.max_length:
        raise ValueError(f"config.data.max_length={cfg.max_length} is too short: the {cfg.template!r} template "
                         f"alone takes {n} tokens for a one-character instruction and answer")


def load_examples(cfg: ml_collections.ConfigDict, tokenizer, seed: int):
    """-> (train, held_out, stats); both lists keep file order.

    Held out: data.eval_source when set; else a seeded eval_fraction of the rows (after
    num_examples), chosen among rows before any is skipped, so the split does not move
    when max_length or the template changes. The synthetic source holds out its own
    synthetic.num_eval rows, generated after (and distinct from) the training rows.
    """
    stats = {"rows": 0, "bad": {}, "bad_ids": {}, "truncated": 0, "dropped_too_long": 0}
    if cfg.format != "text":  # plain documents: no template to fit
        check_template_fits(cfg, tokenizer)
    if cfg.get("mixture"):
        train, held = _mixture(cfg, tokenizer, seed, stats)
    elif cfg.source == "synthetic":
        s = cfg.synthetic
        rows = synthetic.generate(s.num_train + s.num_eval, s.seed)
        fields = default_config().fields  # Synthetic rows use the Alpaca field names.
        train = _convert(rows[: s.num_train], "alpaca", fields, tokenizer, cfg, "synthetic", stats)
        held = _convert(rows[s.num_train:], "alpaca", fields, tokenizer, cfg,
                        "synthetic held-out", stats)
    else:
        rows = _read_rows(cfg.source, cfg.split)
        if cfg.num_examples:
            rows = rows[: cfg.num_examples]
        train = _convert(rows, cfg.format, cfg.fields, tokenizer, cfg, cfg.source, stats)
        if cfg.eval_source:
            held = _convert(_read_rows(cfg.eval_source, cfg.split), cfg.format, cfg.fields,
                            tokenizer, cfg, cfg.eval_source, stats)
        else:
            train, held = _hold_out(train, cfg.eval_fraction, seed)
    train = [e for e in train if e is not None]
    held = [e for e in held if e is not None]
    stats.update(train=len(train), held_out=len(held))
    logging.info("data %s: %s", cfg.source, stats)
    return train, held, stats


def _hold_out(examples: list, fraction: float, seed) -> tuple[list, list]:
    """A seeded `fraction` of the rows (bad ones included, so the split does not move with them)."""
    is_held = np.zeros(len(examples), bool)
    is_held[np.random.default_rng(seed).permutation(len(examples))[: int(round(fraction * len(examples)))]] = True
    return [e for e, h in zip(examples, is_held) if not h], [e for e, h in zip(examples, is_held) if h]


def _mixture(cfg, tokenizer, seed: int, stats: dict) -> tuple[list, list]:
    """data.mixture -> (train, held_out); ids become 'name:id'.

    The training set is the largest one whose shares of the sources are the weights without
    repeating a row: n = min_s(len_s / share_s) rows, a seeded sample of each source's. Held out:
    eval_fraction of each source, all kept (each source's metrics stay comparable).
    """
    parts = []
    for i, m in enumerate(cfg.mixture):
        m = dict(m)
        name, weight = str(m.get("name") or f"s{i}"), float(m.get("weight", 1.0))
        if weight <= 0 or "source" not in m:
            raise ValueError(f"config.data.mixture[{i}] = {m}: needs a source and a weight > 0")
        fields = cfg.fields.copy_and_resolve_references()
        fields.update(m.get("fields") or {})
        rows = _read_rows(m["source"], m.get("split") or cfg.split)
        examples = _convert(rows, m.get("format") or cfg.format, fields, tokenizer, cfg, m["source"], stats)
        train, held = (
            [dataclasses.replace(e, id=f"{name}:{e.id}") for e in part if e is not None]
            for part in _hold_out(examples, cfg.eval_fraction, [seed, i]))
        parts.append((name, weight, train, held))
    share = np.array([w for _, w, _, _ in parts]) / sum(w for _, w, _, _ in parts)
    total = min(len(t) / s for (_, _, t, _), s in zip(parts, share))
    train, held = [], []
    for i, ((name, _, t, h), s) in enumerate(zip(parts, share)):
        keep = np.sort(np.random.default_rng([seed, 2, i]).permutation(len(t))[: int(total * s)])
        train += [t[k] for k in keep]
        held += h
        stats.setdefault("mixture", {})[name] = {"train": len(keep), "of": len(t), "held_out": len(h), "share": float(s)}
    return train, held


def check_vocab(examples: list[Example], vocab_size: int, what: str) -> None:
    """Refuse token ids the model has no embedding for (they would give NaNs, or silently wrong rows)."""
    for e in examples:
        if len(e.input_ids) and int(e.input_ids.max()) >= vocab_size:
            raise ValueError(f"example {e.id!r} has token id {int(e.input_ids.max())} >= vocab_size {vocab_size} of "
                             f"{what}: the tokenizer is not this model's (config.tokenizer, config.reference.tokenizer)")


def select_ids(examples: list[Example], ids: list[str], what: str) -> list[Example]:
    """The examples with these ids, in this order: another tokenization of the same rows joined by id."""
    by_id = {e.id: e for e in examples}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} training examples are missing under {what} (bad, or too long for "
                         f"data.max_length), e.g. ids {missing[:10]}: raise data.max_length, or drop these rows")
    return [by_id[i] for i in ids]


def load_other(cfg: ml_collections.ConfigDict, source: str, num_examples: int, tokenizer) -> list[Example]:
    """A second held-out set the model is not trained on (forgetting): the first num_examples rows
    of `source`, in config.data's format, fields, template and max_length."""
    stats = {"rows": 0, "bad": {}, "bad_ids": {}, "truncated": 0, "dropped_too_long": 0}
    rows = _read_rows(source, cfg.split)
    rows = rows[:num_examples] if num_examples else rows
    out = [e for e in _convert(rows, cfg.format, cfg.fields, tokenizer, cfg, source, stats) if e is not None]
    logging.info("data %s (other held-out set): %s", source, stats)
    return out
