"""The built-in task suite and byte-level tokenizer."""

import collections

import pytest
import transformers

from sftmix_jax.data import synthetic


@pytest.fixture(scope="module")
def tok():
    return synthetic.make_tokenizer()


def test_generate_is_deterministic_balanced_and_unique():
    rows = synthetic.generate(60, seed=3)
    assert rows == synthetic.generate(60, seed=3)
    assert rows != synthetic.generate(60, seed=4)
    assert synthetic.generate(20, seed=3) == rows[:20]  # Prefix property: held-out tails are new.
    assert collections.Counter(r["task"] for r in rows) == {t: 10 for t in synthetic.TASKS}
    assert len({r["id"] for r in rows}) == 60
    assert len({(r["instruction"], r["input"]) for r in rows}) == 60
    assert rows[7]["id"] == f"synthetic-{rows[7]['task']}-7"
    assert set(rows[0]) == {"id", "task", "instruction", "input", "output"}


def _answer(row):
    task, inp = row["task"], row["input"]
    if task == "copy":
        return inp
    if task == "upper":
        return inp.upper()
    if task == "reverse":
        return inp[::-1]
    if task == "sort":
        return "".join(sorted(inp))
    if task == "add":
        a, b = inp.split("+")
        return str(int(a) + int(b))
    if task == "count":
        letter = row["instruction"].split("'")[1]
        return str(inp.count(letter))
    raise AssertionError(task)


def test_answers_are_exact():
    rows = synthetic.generate(600, seed=0)
    for row in rows:
        assert row["output"] == _answer(row), row
        assert 0 < len(row["output"]) <= 8
    counts = [r["output"] for r in rows if r["task"] == "count"]
    assert sum(c != "0" for c in counts) > len(counts) // 2  # Not a constant answer.


def test_tokenizer_roundtrips_text(tok):
    assert len(tok) < 300
    for text in ["hello world", "  spaces\tand\nnewlines ", "héllo wörld — 日本語 🙂", ""]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text.encode("utf-8"))  # One token per byte.
        assert tok.decode(ids) == text
    assert tok("a")["input_ids"] == [tok.bos_token_id, ord("a")]
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.eos_token == "<|end|>"


def test_chat_template(tok):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}]
    full = tok.apply_chat_template(messages, tokenize=False)
    assert full == "<|bos|><|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello<|end|>"
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert full.startswith(prompt) and prompt.endswith("<|assistant|>")
    enc = tok.apply_chat_template(messages[:2], tokenize=True, add_generation_prompt=True)
    ids = enc["input_ids"] if isinstance(enc, collections.abc.Mapping) else enc
    assert ids == tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == prompt
    with pytest.raises(Exception, match="Unknown role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_save_load_roundtrip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "<|user|>Reverse: ñandú 🙂<|end|><|assistant|>"
    for special in (True, False):
        assert loaded(text, add_special_tokens=special)["input_ids"] == \
            tok(text, add_special_tokens=special)["input_ids"]
    assert loaded.chat_template == tok.chat_template
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id) == \
        (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id)
    messages = [{"role": "user", "content": "x"}]
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == text
