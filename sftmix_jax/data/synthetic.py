"""The built-in instruction suite and byte-level tokenizer behind configs/tiny.py.

Nothing here touches a file or the network: the tokenizer is assembled in code and the
tasks are generated from a seed, so the tiny pipeline runs anywhere. The task families
have exact, short answers of graded difficulty (copying is easy, adding is hard), so a
tiny model shows a measurable difference between training recipes in a few CPU minutes.
"""

from __future__ import annotations

import numpy as np
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors

# ----------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------

PAD, BOS, EOS = "<pad>", "<|bos|>", "<|end|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
# Ids 0..255 are the bytes themselves; the special tokens follow in this order.
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS.values())

# One turn is `<|role|>content<|end|>`; the rendering of the first k messages is a string
# prefix of the rendering of k+1 messages, which the loss mask in data.py relies on.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, as the ByteLevel pre-tokenizer applies it."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:  # Unprintable bytes go to code points 256.. in byte order.
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A 262-token byte-level tokenizer (id == byte value) with a chat template.

    A BPE model without merges over the 256 byte characters gives exactly one token per
    UTF-8 byte, and the ByteLevel decoder joins bytes back, so any unicode round-trips.
    """
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    # add_special_tokens=True prepends BOS, like Llama tokenizers; chat text carries its own.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


def bpe_tokenizer(vocab_size: int = 384, seed: int = 0) -> transformers.PreTrainedTokenizerFast:
    """Another tokenizer for the same suite (a weak-to-strong reference with its own vocabulary):
    byte-level BPE with merges learnt from suite rows, the special tokens first (ids 0..5), and
    the same chat template. Deterministic for a (vocab_size, seed)."""
    from tokenizers import trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [" ".join(r.values()) for r in generate(2000, seed + 1)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False, model_max_length=4096)


# ----------------------------------------------------------------------------------------
# Task suite: terse instructions, so that compute goes to the answers
# ----------------------------------------------------------------------------------------

TASKS = ("copy", "upper", "reverse", "sort", "count", "add")  # roughly easy -> hard
# The pre-training corpus is broader than the instruction suite (pretrain.py).
PRETRAIN_TASKS = TASKS + ("lower", "length", "subtract", "max")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _word(rng: np.random.Generator) -> str:
    return "".join(rng.choice(list(_LETTERS), size=int(rng.integers(3, 6))))


def _make(task: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """One (instruction, input, output) of a family; the output is computed, never sampled."""
    if task == "copy":
        w = _word(rng)
        return "copy", w, w
    if task == "upper":
        w = _word(rng)
        return "upper case", w, w.upper()
    if task == "reverse":
        w = _word(rng)
        return "reverse", w, w[::-1]
    if task == "sort":
        digits = "".join(str(d) for d in rng.integers(0, 10, size=int(rng.integers(3, 6))))
        return "sort digits", digits, "".join(sorted(digits))
    if task == "count":
        w = _word(rng)
        # Mostly a letter of the word so that answers are not nearly always 0.
        in_word = rng.random() < 0.8
        letter = w[int(rng.integers(len(w)))] if in_word else str(rng.choice(list(_LETTERS)))
        instruction = f"count '{letter}'"
        return instruction, w, str(w.count(letter))
    if task == "add":
        a, b = (int(x) for x in rng.integers(0, 100, size=2))
        return "add", f"{a}+{b}", str(a + b)
    if task == "lower":
        w = _word(rng)
        return "lower case", w.upper(), w
    if task == "length":
        w = _word(rng) + _word(rng)
        return "length", w, str(len(w))
    if task == "subtract":
        a, b = sorted((int(x) for x in rng.integers(0, 100, size=2)), reverse=True)
        return "subtract", f"{a}-{b}", str(a - b)
    if task == "max":
        digits = "".join(str(d) for d in rng.integers(0, 10, size=int(rng.integers(3, 6))))
        return "max digit", digits, max(digits)
    raise ValueError(f"unknown task {task!r}; expected one of {PRETRAIN_TASKS}")


def generate(num: int, seed: int) -> list[dict]:
    """`num` Alpaca-style rows, families in round-robin order, prompts unique within a call.

    Deterministic in (num, seed), and generate(n, s) is a prefix of generate(m, s) for
    n <= m, so a held-out tail taken from a longer call never repeats a training prompt.
    """
    rng = np.random.default_rng(seed)
    rows, seen = [], set()
    for n in range(num):
        task = TASKS[n % len(TASKS)]
        for _ in range(1000):  # Rejection keeps prompts unique; the spaces are large.
            instruction, inp, out = _make(task, rng)
            if (instruction, inp) not in seen:
                break
        else:
            raise ValueError(f"task {task!r} ran out of unique prompts at {num} rows")
        seen.add((instruction, inp))
        rows.append({"id": f"synthetic-{task}-{n}", "task": task,
                     "instruction": instruction, "input": inp, "output": out})
    return rows


def corpus(num_docs: int, max_bytes: int, seed: int, exclude=frozenset(),
           chat_fraction: float = 0.0) -> list[list[tuple[str, str]]]:
    """Documents for pre-training, each a list of (prompt, answer) lines packed while the document
    stays within `max_bytes`: `instruction: input -> ` + `output` + newline, of every family in
    PRETRAIN_TASKS, drawn at random. The loss is on the answers only (pretrain.documents).

    chat_fraction: the share of the pre-training-only families' rows written as a chat turn
    instead (CHAT_TEMPLATE's markup), as web text holds some dialogue. The instruction suite's
    families never are: fine-tuning must carry the format over to them.
    exclude: (instruction, input) pairs never used (the instruction set's train and held-out
    prompts), so that fine-tuning data and held-out answers are not pre-trained on.
    """
    rng = np.random.default_rng(seed)
    docs, lines, size = [], [], 0
    while len(docs) < num_docs:
        task = PRETRAIN_TASKS[int(rng.integers(len(PRETRAIN_TASKS)))]
        instruction, inp, out = _make(task, rng)
        if (instruction, inp) in exclude:
            continue
        if task not in TASKS and rng.random() < chat_fraction:
            line = (f"{ROLE_TOKENS['user']}{instruction}\n\n{inp}{EOS}{ROLE_TOKENS['assistant']}", f"{out}{EOS}\n")
        else:
            line = (f"{instruction}: {inp} -> ", f"{out}\n")
        n = len("".join(line).encode())
        if lines and size + n > max_bytes:
            docs.append(lines)
            lines, size = [], 0
        lines.append(line)
        size += n
    return docs
