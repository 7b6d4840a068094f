"""Loading, templates, response masks and the batch samplers (CPU, no jax)."""

import json

import numpy as np
import pytest

from sftmix_jax.data import batching, render, sources, synthetic

EOS = "<|end|>"


@pytest.fixture(scope="module")
def tok():
    return synthetic.make_tokenizer()


def write(path, rows):
    """A JSON list for .json, one object a line for .jsonl."""
    with open(path, "w") as f:
        if str(path).endswith(".jsonl"):
            f.writelines(json.dumps(r) + "\n" for r in rows)
        else:
            json.dump(rows, f)
    return str(path)


def config(source, **overrides):
    cfg = sources.default_config()
    cfg.source, cfg.eval_fraction = source, 0.0
    cfg.update(overrides)
    return cfg


def masked_text(tok, e):
    return tok.decode(e.input_ids[e.loss_mask == 1])


# ----------------------------------------------------------------------------------------
# Formats and response masks
# ----------------------------------------------------------------------------------------

GPTEACHER = [
    {"instruction": "Pretend to be a pirate.", "input": "", "response": "Arr, matey!"},
    {"instruction": "Translate.", "input": "Bonjour à tous", "response": "Hello everyone 🙂"},
    {"instruction": "Say hi.", "input": "", "response": "Hi\n\nthere."},
]


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_alpaca_format_custom_answer_field(tok, tmp_path, template):
    cfg = config(write(tmp_path / "gpteacher.json", GPTEACHER), template=template)
    cfg.fields.output = "response"
    train, held, stats = sources.load_examples(cfg, tok, seed=0)
    assert (len(train), len(held), stats["bad"]) == (3, 0, {})
    for row, e in zip(GPTEACHER, train):
        assert masked_text(tok, e) == row["response"] + EOS
        assert e.input_ids.dtype == np.int32 and e.loss_mask.dtype == np.int8
        n_prompt = len(e.prompt_ids)
        assert np.array_equal(e.input_ids[:n_prompt], e.prompt_ids)
        assert not e.loss_mask[:n_prompt].any() and e.loss_mask[n_prompt:].all()
        assert e.answer == row["response"] and e.task is None
        prompt = tok.decode(e.prompt_ids)
        assert row["instruction"] in prompt and row["input"] in prompt
        if template == "alpaca":
            assert prompt.startswith("<|bos|>Below is an instruction")
            assert prompt.endswith("### Response:\n")
            assert ("### Input:" in prompt) == bool(row["input"])
        else:
            user = "\n\n".join(p for p in (row["instruction"], row["input"]) if p)
            assert prompt == f"<|bos|><|user|>{user}{EOS}<|assistant|>"


CHATS = [
    {"id": "c1", "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6, of course."},
        {"role": "user", "content": "Thanks"}]},  # A trailing user turn carries no loss.
    {"id": "c2", "messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
]


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_multi_turn_messages_mask_every_assistant_turn(tok, tmp_path, template):
    cfg = config(write(tmp_path / "chats.jsonl", CHATS), format="messages", template=template)
    train, _, _ = sources.load_examples(cfg, tok, seed=0)
    assert [e.id for e in train] == ["c1", "c2"]
    c1, c2 = train
    assert masked_text(tok, c1) == "4" + EOS + "6, of course." + EOS
    assert masked_text(tok, c2) == "Hello!" + EOS
    assert c1.answer == "6, of course."
    assert not tok.decode(c1.input_ids).endswith("Thanks" + EOS)
    # The prompt of the last turn: everything before its text, including the first reply.
    assert tok.decode(c1.prompt_ids) + "6, of course." + EOS == tok.decode(c1.input_ids)
    if template == "chat":
        messages = CHATS[0]["messages"][:4]
        expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tok.decode(c1.prompt_ids) == expected
    else:
        assert tok.decode(c1.prompt_ids).startswith("<|bos|>You are terse.")


def test_sharegpt_format(tok, tmp_path):
    rows = [{"conversations": [
        {"from": "system", "value": "Sys"}, {"from": "human", "value": "Q1"},
        {"from": "gpt", "value": "A1"}, {"from": "user", "value": "Q2"},
        {"from": "assistant", "value": "A2"}]},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}]
    cfg = config(write(tmp_path / "share.json", rows), format="sharegpt")
    train, _, _ = sources.load_examples(cfg, tok, seed=0)
    assert [e.id for e in train] == ["0", "1"]  # No id field: row index in file order.
    assert masked_text(tok, train[0]) == "A1" + EOS + "A2" + EOS
    assert tok.decode(train[0].input_ids).startswith("<|bos|><|system|>Sys<|end|><|user|>Q1")


def test_ids_stable_across_loads(tok, tmp_path):
    cfg = config(write(tmp_path / "a.json", GPTEACHER * 4), eval_fraction=0.25)
    cfg.fields.output = "response"
    first = sources.load_examples(cfg, tok, seed=5)
    second = sources.load_examples(cfg, tok, seed=5)
    for a, b in zip(first[:2], second[:2]):
        assert [e.id for e in a] == [e.id for e in b]
        assert all(np.array_equal(x.input_ids, y.input_ids) for x, y in zip(a, b))
    assert sorted(int(e.id) for e in first[0] + first[1]) == list(range(12))


def test_template_breaking_prefix_property_raises(tok, tmp_path):
    # Like templates that rewrite earlier assistant turns (e.g. dropping reasoning).
    broken = synthetic.make_tokenizer()
    broken.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>"
        "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}{{ m['content'] }}"
        "{% endif %}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    cfg = config(write(tmp_path / "chats.jsonl", CHATS), format="messages")
    with pytest.raises(ValueError, match="prefix property"):
        sources.load_examples(cfg, broken, seed=0)


def test_parquet_source(tok, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    path = str(tmp_path / "chats.parquet")
    pq.write_table(pa.Table.from_pylist(CHATS), path)
    train, _, _ = sources.load_examples(config(path, format="messages"), tok, seed=0)
    assert [masked_text(tok, e) for e in train] == ["4" + EOS + "6, of course." + EOS,
                                                     "Hello!" + EOS]


def test_mask_turns_and_token_boundary():
    # prompt_0, full_0, prompt_1, full_1 as token ids.
    ids, mask, prompt_len = render.mask_turns([[1, 2], [1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6]])
    assert ids.tolist() == [1, 2, 3, 4, 5, 6] and mask.tolist() == [0, 0, 1, 0, 1, 1]
    assert prompt_len == 4
    with pytest.raises(render.BadRow, match="token_boundary"):  # Response merged into prompt.
        render.mask_turns([[1, 2], [1, 7]])


def test_template_refusing_a_row_is_counted(tok, tmp_path):
    no_system = synthetic.make_tokenizer()
    no_system.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    cfg = config(write(tmp_path / "chats.jsonl", CHATS), format="messages",
                 max_bad_fraction=0.5)
    train, _, stats = sources.load_examples(cfg, no_system, seed=0)
    assert stats["bad"] == {"template_error": 1} and stats["bad_ids"]["template_error"] == ["c1"]
    assert [e.id for e in train] == ["c2"]


# ----------------------------------------------------------------------------------------
# Bad rows, duplicates, lengths, splits
# ----------------------------------------------------------------------------------------

def test_bad_rows_counted_and_raised(tok, tmp_path):
    good = [{"id": f"g{i}", "instruction": "Say x.", "output": "x"} for i in range(16)]
    bad = [{"id": "b-null", "instruction": "Q", "output": None},
           {"id": "b-empty", "instruction": "Q", "output": "  "},
           {"id": "b-num", "instruction": "Q", "output": 5},
           {"id": "b-noinst", "output": "x"}]
    path = write(tmp_path / "bad.json", good + bad)
    _, _, stats = sources.load_examples(config(path, max_bad_fraction=0.5), tok, seed=0)
    assert stats["bad"] == {"empty_response": 3, "missing_field:instruction": 1}
    assert stats["bad_ids"]["empty_response"] == ["b-null", "b-empty", "b-num"]
    assert stats["rows"] == 20 and stats["train"] == 16
    with pytest.raises(ValueError, match=r"4 of 20 rows.*empty_response.*b-null"):
        sources.load_examples(config(path, max_bad_fraction=0.05), tok, seed=0)
    # A wrong answer field name is named in the error.
    cfg = config(path)
    cfg.fields.output = "response"
    with pytest.raises(ValueError, match="missing_field:response"):
        sources.load_examples(cfg, tok, seed=0)


def test_bad_conversations(tok, tmp_path):
    ok = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    rows = [ok] * 6 + [
        {"messages": [{"role": "tool", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": []},
        {"messages": [{"role": "user", "content": "q"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}]
    cfg = config(write(tmp_path / "bad.jsonl", rows), format="messages", max_bad_fraction=0.5)
    train, _, stats = sources.load_examples(cfg, tok, seed=0)
    assert stats["bad"] == {"unknown_role": 1, "empty_conversation": 1,
                            "no_assistant_turn": 1, "empty_response": 1}
    assert stats["bad_ids"]["unknown_role"] == ["6"] and len(train) == 6


def test_duplicate_ids_raise(tok, tmp_path):
    rows = [{"id": "same", "instruction": "q", "output": "a"}] * 2
    with pytest.raises(ValueError, match="same"):
        sources.load_examples(config(write(tmp_path / "d.json", rows)), tok, seed=0)


def test_truncate_vs_drop(tok, tmp_path):
    rows = [{"id": "short", "instruction": "q", "output": "a"},
            {"id": "long-answer", "instruction": "q", "output": "a" * 100},
            {"id": "long-prompt", "instruction": "q" * 100, "output": "a"}]
    path = write(tmp_path / "len.json", rows)
    train, _, stats = sources.load_examples(config(path, max_length=40), tok, seed=0)
    assert [e.id for e in train] == ["short", "long-answer"]
    assert (stats["truncated"], stats["dropped_too_long"]) == (1, 1)
    cut = train[1]
    assert len(cut.input_ids) == len(cut.loss_mask) == 40 and cut.loss_mask[-1] == 1
    assert cut.answer == "a" * 100
    train, _, stats = sources.load_examples(config(path, max_length=40, overflow="drop"), tok, 0)
    assert [e.id for e in train] == ["short"]
    assert (stats["truncated"], stats["dropped_too_long"]) == (0, 2)


def test_held_out_split_deterministic_and_disjoint(tok, tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(50)]
    cfg = config(write(tmp_path / "s.json", rows), eval_fraction=0.2)
    train, held, stats = sources.load_examples(cfg, tok, seed=1)
    train2, held2, _ = sources.load_examples(cfg, tok, seed=1)
    _, held3, _ = sources.load_examples(cfg, tok, seed=2)
    ids = lambda xs: [e.id for e in xs]
    assert (len(train), len(held), stats["train"], stats["held_out"]) == (40, 10, 40, 10)
    assert ids(train) == ids(train2) and ids(held) == ids(held2)
    assert not set(ids(train)) & set(ids(held))
    assert set(ids(train)) | set(ids(held)) == {str(i) for i in range(50)}
    assert ids(held) != ids(held3)
    assert ids(train) == sorted(ids(train), key=int)  # File order kept.
    cfg.num_examples = 20  # The first 20 rows in file order.
    train, held, _ = sources.load_examples(cfg, tok, seed=1)
    assert sorted(int(i) for i in ids(train) + ids(held)) == list(range(20)) and len(held) == 4


def test_eval_source(tok, tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
    cfg = config(write(tmp_path / "t.json", rows),
                 eval_source=write(tmp_path / "e.jsonl", rows[:3]), eval_fraction=0.5)
    train, held, stats = sources.load_examples(cfg, tok, seed=0)
    assert (len(train), len(held), stats["rows"]) == (10, 3, 13)


def test_synthetic_source(tok):
    cfg = sources.default_config()
    cfg.synthetic.update(num_train=60, num_eval=12, seed=0)
    train, held, stats = sources.load_examples(cfg, tok, seed=0)
    assert (len(train), len(held)) == (60, 12)
    assert {e.task for e in held} == set(synthetic.TASKS)
    assert not {e.id for e in train} & {e.id for e in held}
    for e in train[:12]:
        assert masked_text(tok, e) == e.answer + EOS


# ----------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------

def toy_examples(n=40, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(4, 150))
        mask = np.zeros(length, np.int8)
        mask[int(rng.integers(1, length)):] = 1
        out.append(sources.Example(id=str(i), input_ids=rng.integers(0, 256, length).astype(np.int32),
                                loss_mask=mask, prompt_ids=np.zeros(1, np.int32), answer=""))
    return out


def check_batch(examples, batch, buckets=(64, 128)):
    B, L = batch["input_ids"].shape
    assert L in buckets or L == 192  # 192: the longest toy example rounded up to 64.
    for key, dtype in [("input_ids", np.int32), ("attention_mask", np.int32),
                       ("targets", np.int32), ("weights", np.float32), ("index", np.int32)]:
        assert batch[key].dtype == dtype and batch[key].shape[0] == B
    for b, i in enumerate(batch["index"]):
        if i < 0:
            assert not batch["weights"][b].any() and not batch["attention_mask"][b].any()
            continue
        e = examples[i]
        n = len(e.input_ids)
        assert n <= L
        assert np.array_equal(batch["input_ids"][b, :n], e.input_ids)
        assert (batch["input_ids"][b, n:] == 7).all()  # pad_id
        assert batch["attention_mask"][b].sum() == n
        assert np.array_equal(batch["targets"][b, :-1], batch["input_ids"][b, 1:])
        assert np.array_equal(batch["weights"][b, : n - 1], e.loss_mask[1:])
        assert not batch["weights"][b, n - 1:].any()


def test_train_batches():
    ex = toy_examples()
    tb = batching.TrainBatches(ex, 8, seed=3, buckets=(64, 128), pad_id=7)
    again = batching.TrainBatches(ex, 8, seed=3, buckets=(64, 128), pad_id=7)
    assert tb.steps_per_epoch == 5
    for step in (0, 4, 7, 23):
        a, b = tb.batch(step), again.batch(step)
        assert all(np.array_equal(a[k], b[k]) for k in a)
        check_batch(ex, a)
    epochs = [np.concatenate([tb.batch(e * 5 + s)["index"] for s in range(5)]) for e in range(2)]
    for idx in epochs:
        assert sorted(idx) == list(range(40))
    assert not np.array_equal(epochs[0], epochs[1])
    # Process slices partition the global batch, in order, at the same padded length.
    for step in (0, 6):
        full = tb.batch(step)
        parts = [batching.TrainBatches(ex, 8, 3, (64, 128), p, 4, pad_id=7).batch(step)
                 for p in range(4)]
        assert all(p["index"].shape == (2,) for p in parts)
        for k in full:
            assert np.array_equal(np.concatenate([p[k] for p in parts]), full[k])
    with pytest.raises(ValueError):
        batching.TrainBatches(ex, 6, 0, (64,), process_index=0, process_count=4)


def test_paired_batches():
    ex = toy_examples()
    conf, unconf = list(range(0, 40, 2)), list(range(1, 30, 2))  # 20 and 15 rows
    pb = batching.PairedBatches(ex, conf, unconf, 6, seed=0, buckets=(64, 128), pad_id=7)
    assert pb.steps_per_epoch == 5
    for step in range(12):
        batch = pb.batch(step)
        check_batch(ex, batch)
        assert set(batch["index"][0::2]) <= set(conf) and set(batch["index"][1::2]) <= set(unconf)
    assert sorted(np.concatenate([pb.batch(s)["index"][1::2] for s in range(5)])) == unconf
    with pytest.raises(ValueError, match="even"):
        batching.PairedBatches(ex, conf, unconf, 5, 0, (64,))
    # Two hosts: each holds a contiguous slice of whole (confident, unconfident) pairs.
    pb4 = batching.PairedBatches(ex, conf, unconf, 8, 1, (64, 128))
    hosts = [batching.PairedBatches(ex, conf, unconf, 8, 1, (64, 128), p, 2).batch(3)
             for p in range(2)]
    full = pb4.batch(3)["index"]
    assert list(hosts[0]["index"]) == list(full[0:4])
    assert list(hosts[1]["index"]) == list(full[4:8])
    assert hosts[0]["input_ids"].shape == hosts[1]["input_ids"].shape


def test_length_pairing():
    ex = toy_examples(400)
    conf, unconf = list(range(0, 400, 2)), list(range(1, 400, 2))
    resp = np.array([int(e.loss_mask.sum()) for e in ex])
    make = lambda pairing: batching.PairedBatches(ex, conf, unconf, 8, 5, (64, 128), pairing=pairing,  # noqa: E731
                                                  pair_window=16, pad_id=7)
    pb, again, rand = make("length"), make("length"), make("random")
    assert pb.steps_per_epoch == 50
    for step in (0, 120, 7, 49, 50):  # out of order: a step depends on (seed, step) alone
        a, b = pb.batch(step), again.batch(step)
        assert all(np.array_equal(a[k], b[k]) for k in a)
        check_batch(ex, a)
    epochs = [np.stack([pb.batch(e * 50 + s)["index"] for s in range(50)]) for e in range(2)]
    for idx_SB in epochs:  # each half drawn exactly once per epoch, on its own rows
        assert sorted(idx_SB[:, 0::2].ravel()) == conf and sorted(idx_SB[:, 1::2].ravel()) == unconf
    assert not np.array_equal(epochs[0], epochs[1])

    def gap(batches):
        rows = np.concatenate([batches.batch(s)["index"] for s in range(50)]).reshape(-1, 2)
        return np.abs(resp[rows[:, 0]] - resp[rows[:, 1]]).mean()

    assert gap(pb) < 0.5 * gap(rand)
    hosts = [batching.PairedBatches(ex, conf, unconf, 8, 5, (64, 128), p, 2, pairing="length",
                                    pair_window=16).batch(3)["index"] for p in range(2)]
    assert np.array_equal(np.concatenate(hosts), pb.batch(3)["index"])
    with pytest.raises(ValueError, match="pairing"):
        make("sorted")


@pytest.mark.parametrize("paired", [False, True])
def test_padding_report_matches_the_batches(paired):
    ex = toy_examples(40)
    batches = (batching.PairedBatches(ex, range(0, 40, 2), range(1, 40, 2), 6, 0, (64, 128)) if paired
               else batching.TrainBatches(ex, 8, 3, (64, 128)))
    epoch = [batches.batch(s) for s in range(batches.steps_per_epoch)]
    tokens = sum(int(b["attention_mask"].sum()) for b in epoch)
    slots = sum(b["attention_mask"].size for b in epoch)
    rows = sum(len(b["index"]) for b in epoch)
    assert batching.padding_report(batches, 200) == {
        "tokens": tokens, "pad_fraction_max_length": round(1 - tokens / (rows * 200), 4),
        "pad_fraction_buckets": round(1 - tokens / slots, 4)}


def test_eval_batches_cover_every_example_once():
    ex = toy_examples(23)
    batches = list(batching.eval_batches(ex, 5, (64, 128), pad_id=7))
    index = np.concatenate([b["index"] for b in batches])
    assert len(batches) == 5 and (index == -1).sum() == 2 and (index[-2:] == -1).all()
    assert sorted(index[index >= 0]) == list(range(23))
    lengths = [len(ex[i].input_ids) for i in index[index >= 0]]
    assert lengths == sorted(lengths)
    for b in batches:
        check_batch(ex, b)
    assert list(batching.eval_batches([], 4, (64,))) == []


def test_a_mixture_samples_its_sources_by_weight(tmp_path, tok):
    """data.mixture with weights 3:1 (two formats and field maps): training batches hold the
    sources 3:1 over 1,000 rows, within sampling noise."""
    a = write(tmp_path / "a.jsonl", [{"id": i, "instruction": f"Say {i}", "output": str(i)} for i in range(800)])
    b = write(tmp_path / "b.jsonl", [{"chat": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
                                     for i in range(800)])
    cfg = config("", eval_fraction=0.05)
    cfg.mixture = ({"source": a, "weight": 3.0, "name": "alpaca"},
                   {"source": b, "weight": 1.0, "name": "chat", "format": "messages", "fields": {"messages": "chat"}})
    train, held, stats = sources.load_examples(cfg, tok, seed=0)
    assert stats["mixture"]["alpaca"]["train"] == 760 and stats["mixture"]["chat"]["train"] == 253  # 760 / 0.75 rows
    assert len(held) == 80 and {e.id.split(":")[0] for e in held} == {"alpaca", "chat"}
    assert len({e.id for e in train}) == len(train) and train[0].id.startswith("alpaca:")
    batches = batching.TrainBatches(train, 40, 0, (64,), 0, 1)
    rows = np.concatenate([batches.batch(s)["index"] for s in range(25)])  # 1,000 rows
    share = np.mean([train[r].id.startswith("alpaca:") for r in rows])
    assert abs(share - 0.75) < 3 * np.sqrt(0.75 * 0.25 / 1000), share  # 3 sigma: 0.041
    with pytest.raises(ValueError, match=r"mixture\[1\].*weight > 0"):
        cfg.mixture = ({"source": a}, {"source": b, "weight": 0})
        sources.load_examples(cfg, tok, seed=0)


def test_prompt_completion_rows_and_a_system_prompt(tmp_path, tok):
    rows = [{"prompt": "2+2?", "completion": "4"},
            {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}]},
            {"prompt": "no completion"}]
    path = write(tmp_path / "pc.jsonl", rows)
    train, _, stats = sources.load_examples(config(path, format="prompt_completion", max_bad_fraction=0.5), tok, seed=0)
    assert [masked_text(tok, e) for e in train] == ["4" + EOS, "Hello" + EOS]
    assert stats["bad"] == {"missing_field:completion": 1}
    want = tok.apply_chat_template([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], tokenize=False)
    assert tok.decode(train[0].input_ids) == want
    # a system prompt for every row (the Alpaca preamble, under the alpaca template)
    cfg = config(path, format="prompt_completion", max_bad_fraction=0.5, system_prompt="You are terse.")
    train, _, _ = sources.load_examples(cfg, tok, seed=0)
    assert tok.decode(train[0].input_ids).startswith("<|bos|><|system|>You are terse.<|end|><|user|>2+2?")
    cfg.template = "alpaca"
    train, _, _ = sources.load_examples(cfg, tok, seed=0)
    assert tok.decode(train[0].input_ids, skip_special_tokens=True).startswith("You are terse.\n\n### Instruction:\n2+2?")
    assert masked_text(tok, train[0]) == "4" + EOS


def test_worker_processes_tokenize_as_this_one_does(tmp_path, tok, monkeypatch):
    rows = [{"id": f"r{i}", "instruction": f"Echo {i}" * (i % 4 + 1), "output": "" if i % 50 == 7 else f"{i}"}
            for i in range(3000)]
    cfg = config(write(tmp_path / "d.jsonl", rows), max_length=24, num_proc=1)
    one = sources.load_examples(cfg, tok, seed=0)
    monkeypatch.setattr(sources, "PARALLEL_ROWS", 100)
    cfg.num_proc = 2
    two = sources.load_examples(cfg, tok, seed=0)
    assert one[2] == two[2] and one[2]["bad"] == {"empty_response": 60} and one[2]["truncated"] > 0
    assert [e.id for e in one[0]] == [e.id for e in two[0]]
    for a, b in zip(one[0], two[0]):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.loss_mask, b.loss_mask)


def test_text_rows_are_documents_with_the_loss_on_every_token(tmp_path, tok):
    rows = [{"text": "The cat sat."}, {"text": "x" * 100}, {"body": "no text field"}, {"text": "  "}]
    path = write(tmp_path / "t.jsonl", rows)
    train, _, stats = sources.load_examples(config(path, format="text", max_length=40, max_bad_fraction=0.5), tok, 0)
    first = train[0]
    assert first.input_ids.tolist() == [tok.bos_token_id] + tok("The cat sat.", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id]
    assert first.loss_mask.tolist() == [0] + [1] * (len(first.input_ids) - 1)
    assert len(train[1].input_ids) == 40 and stats["truncated"] == 1
    assert stats["bad"] == {"missing_field:text": 1, "empty_text": 1}
