"""Multiple-choice accuracy by log-likelihood (the paper's MedQA / PubMedQA / MedMCQA kind).

Each question is rendered as a user turn (chat template with the generation prompt, the
Alpaca prompt, or plain text) and every option is scored as the answer that follows it by the
summed log-probability of its tokens. The metrics are lm-evaluation-harness's: `acc` (the option
with the highest sum), `acc_norm` (the sum divided by the option's length in characters, as
lm-eval computes it); and ours, `acc_per_token` (the sum divided by the option's token count).
The forward pass is scoring.example_nll's, so a mesh shards it like every other eval.
"""
from __future__ import annotations

import dataclasses
import json
import os
import string

import numpy as np
from absl import logging
from etils import epath

from sftmix_jax.data import sources
from sftmix_jax.data.render import render_alpaca
from sftmix_jax.scoring import example_nll

LETTERS = string.ascii_uppercase


@dataclasses.dataclass
class Question:
    id: str
    question: str
    choices: list[str]
    answer: int  # index into choices
    context: str = ""


# ----------------------------------------------------------------------------------------
# Rows -> questions
# ----------------------------------------------------------------------------------------
def _field(row: dict, name: str):
    value = row
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ValueError(f"no field {name!r} (fields present: {sorted(row)[:12]})")
        value = value[part]
    return value


def _text(value, what: str) -> str:
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        value = "\n".join(value)  # PubMedQA's context is a list of passages
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} is {value!r}: expected non-empty text")
    return value.strip()


def _names(spec) -> list[str]:
    return [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]


def row_to_question(row: dict, index: int, cfg) -> Question:
    """One row -> Question; a ValueError names the row and what is wrong with it."""
    f = cfg.fields
    rid = str(row[f.id]) if f.id and isinstance(row.get(f.id), (str, int)) else str(index)
    try:
        keys, names = None, _names(f.choices)
        if cfg.fixed_choices:
            raw = _names(cfg.fixed_choices)
        elif len(names) > 1:  # one column per option
            raw = [_field(row, name) for name in names]
        else:
            raw = _field(row, names[0] if names else "")
            if isinstance(raw, dict):
                # Arrow structs give every row every key: a 4-option row of a 5-option set has E=None.
                keys = [k for k, v in raw.items() if v is not None]
                raw = [raw[k] for k in keys]
            elif not isinstance(raw, (list, tuple)):
                raise ValueError(f"choices field {f.choices!r} is a {type(raw).__name__}: expected a list or a dict")
        choices = [_text(c, f"option {k}") for k, c in enumerate(raw)]
        if not 2 <= len(choices) <= len(LETTERS):
            raise ValueError(f"{len(choices)} options: expected 2 to {len(LETTERS)}")
        answer = _answer(_field(row, f.answer), choices, keys)
        return Question(id=rid, question=_text(_field(row, f.question), "the question"), choices=choices,
                        answer=answer, context=_text(_field(row, f.context), "the context") if f.context else "")
    except ValueError as e:
        raise ValueError(f"row {index} (id {rid}): {e}") from None


def _answer(value, choices: list[str], keys) -> int:
    n = len(choices)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if not 0 <= value < n:
            raise ValueError(f"answer index {value} is out of range for {n} options (0-based)")
        return int(value)
    if isinstance(value, str):
        v = value.strip()
        if keys and v in keys:
            return keys.index(v)
        if v in choices:
            return choices.index(v)
        if len(v) == 1 and v.upper() in LETTERS[:n]:
            return LETTERS.index(v.upper())
    raise ValueError(f"answer {value!r} is neither an index, a letter {LETTERS[0]}-{LETTERS[n - 1]} "
                     "nor the text of an option")


def _read_rows(cfg) -> list[dict]:
    source = cfg.source
    if source.lower().endswith((".json", ".jsonl", ".parquet")):
        rows = sources._read_rows(source, cfg.split)
    else:  # hub id[:split], with an optional subset (config name)
        import datasets

        name, split = source.rsplit(":", 1) if ":" in source and not os.path.exists(source) else (source, cfg.split)
        rows = datasets.load_dataset(name, cfg.subset or None, split=split).to_list()
    bad = [r[sources._INVALID] for r in rows if sources._INVALID in r]
    if bad:
        raise ValueError(f"{source}: lines {bad[:10]} are not valid JSON")
    return rows


def load_questions(cfg) -> list[Question]:
    """config.evaluate.multiple_choice -> questions (the first num_examples rows, in file order)."""
    rows = _read_rows(cfg)
    if cfg.num_examples:
        rows = rows[: cfg.num_examples]
    if not rows:
        raise ValueError(f"{cfg.source}: no questions")
    questions = [row_to_question(r, i, cfg) for i, r in enumerate(rows)]
    logging.info("multiple choice %s: %d questions", cfg.source, len(questions))
    return questions


# ----------------------------------------------------------------------------------------
# Prompts and option tokens
# ----------------------------------------------------------------------------------------
def render(q: Question, tokenizer, template: str, lettered: bool) -> tuple[str, list[str]]:
    """-> (prompt text, the continuation text of each option)."""
    body = f"{q.context}\n\n{q.question}" if q.context else q.question
    answers = [f"{LETTERS[k]}. {c}" if lettered else c for k, c in enumerate(q.choices)]
    if lettered:
        body += "\n\n" + "\n".join(answers)
    if template == "chat":
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                               add_generation_prompt=True)
    elif template == "alpaca":
        prompt = render_alpaca([{"role": "user", "content": body}], tokenizer.eos_token, True)
    elif template == "plain":
        prompt, answers = body + "\nAnswer:", [" " + a for a in answers]
    else:
        raise ValueError(f"config.evaluate.multiple_choice.template={template!r}: use 'chat', 'alpaca' or 'plain'")
    return prompt, answers


def tokenize_options(tokenizer, prompt: str, answers: list[str], template: str):
    """-> (prompt ids, [ids of each option], number of options tokenized apart).

    An option's tokens are those of prompt+option beyond the prompt's tokens. Where the
    tokenizer merges across the boundary (prompt ids are no prefix), the option is
    tokenized alone and appended to the prompt ids: the text is exact, the split unusual.
    """
    special = template != "chat"  # chat templates write their own BOS
    encoded = tokenizer([prompt] + [prompt + a for a in answers], add_special_tokens=special)["input_ids"]
    prompt_ids, options, apart = encoded[0], [], 0
    for a, full in zip(answers, encoded[1:]):
        if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
            options.append(full[len(prompt_ids):])
        else:
            options.append(tokenizer(a, add_special_tokens=False)["input_ids"])
            apart += 1
    return prompt_ids, options, apart


def option_examples(questions: list[Question], tokenizer, cfg) -> list[sources.Example]:
    """One Example per (question, option): prompt + option ids, loss mask on the option tokens."""
    if cfg.template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template: set config.evaluate.multiple_choice.template "
                         "to 'alpaca' or 'plain'")
    examples, apart = [], 0
    for q in questions:
        prompt, answers = render(q, tokenizer, cfg.template, cfg.lettered)
        prompt_ids, options, n = tokenize_options(tokenizer, prompt, answers, cfg.template)
        apart += n
        for k, ids in enumerate(options):
            mask = np.r_[np.zeros(len(prompt_ids), np.int8), np.ones(len(ids), np.int8)]
            examples.append(sources.Example(id=f"{q.id}#{k}", input_ids=np.asarray(prompt_ids + ids, np.int32),
                                         loss_mask=mask, prompt_ids=np.asarray(prompt_ids, np.int32),
                                         answer=answers[k]))
    if apart:
        logging.info("multiple choice: %d options merged with the prompt's last token and were tokenized apart", apart)
    return examples


# ----------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------
def check_batch_size(cfg, mesh) -> None:
    dp = 1 if mesh is None else mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    if cfg.batch_size <= 0 or cfg.batch_size % dp:
        raise ValueError(f"config.evaluate.multiple_choice.batch_size={cfg.batch_size} must be a positive "
                         f"multiple of the data-parallel size data*fsdp={dp}")


def score(model, tokenizer, questions: list[Question], cfg, buckets, pad_id=0, mesh=None, pack=True) -> list[dict]:
    """Per question: the answer, the choice by summed, per-character and per-token log-likelihood, the scores."""
    check_batch_size(cfg, mesh)
    examples = option_examples(questions, tokenizer, cfg)
    nll, count = example_nll(model, examples, cfg.batch_size, buckets, pad_id, mesh, desc="multiple choice",
                             pack=pack)
    rows, start = [], 0
    for q in questions:
        span = slice(start, start + len(q.choices))
        ll, n = -nll[span], count[span]
        # lm-eval's acc_norm: the continuation's length in characters, without the space before it
        chars = np.array([len(e.answer.removeprefix(" ")) for e in examples[span]], float)
        start += len(q.choices)
        rows.append(dict(id=q.id, answer=q.answer, choice=int(np.argmax(ll)), choice_norm=int(np.argmax(ll / chars)),
                         choice_per_token=int(np.argmax(ll / n)), loglik=ll.tolist(), chars=chars.astype(int).tolist(),
                         tokens=n.astype(int).tolist()))
    return rows


def accuracy(rows: list[dict]) -> dict:
    """lm-eval's acc and acc_norm (per character), and acc_per_token."""
    hit = lambda key: float(np.mean([r[key] == r["answer"] for r in rows]))  # noqa: E731
    return {"acc": hit("choice"), "acc_norm": hit("choice_norm"), "acc_per_token": hit("choice_per_token"),
            "questions": len(rows)}


def evaluate(model, tokenizer, questions, cfg, buckets, pad_id=0, mesh=None, out: str | None = None,
             pack=True) -> dict:
    """Accuracies; `out`: a JSONL file for the per-question choices and scores; pack: `score`'s."""
    rows = score(model, tokenizer, questions, cfg, buckets, pad_id, mesh, pack)
    if out:
        epath.Path(out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return accuracy(rows)
