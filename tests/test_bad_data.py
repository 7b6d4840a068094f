"""A catalogue of bad data: each kind is a counted skip (with ids) or a clear error, never silent."""
import json

import pytest

from sftmix_jax.data import batching, sources, synthetic

TOK = synthetic.make_tokenizer()
GOOD = [{"id": f"g{i}", "instruction": f"say {i}", "input": "", "output": f"ok {i}"} for i in range(40)]


def load(tmp_path, rows=None, text=None, name="d.jsonl", **overrides):
    path = tmp_path / name
    if text is None:
        text = json.dumps(rows) if name.endswith(".json") else "\n".join(json.dumps(r) for r in rows)
    path.write_text(text, encoding="utf-8")
    cfg = sources.default_config()
    cfg.source, cfg.eval_fraction, cfg.max_length = str(path), 0.0, 64
    cfg.update_from_flattened_dict(overrides)
    return sources.load_examples(cfg, TOK, 0)


def test_empty_file(tmp_path):
    with pytest.raises(ValueError, match="is empty"):
        load(tmp_path, text="  \n")


def test_invalid_json_file(tmp_path):
    with pytest.raises(ValueError, match=r"invalid JSON at line 2, column"):
        load(tmp_path, text='[{"instruction": "a",\n "output": }]', name="d.json")


def test_invalid_jsonl_line_is_a_counted_bad_row(tmp_path):
    text = "\n".join(json.dumps(r) for r in GOOD[:20]) + '\n{"instruction": "broken\n' + "\n".join(
        json.dumps(r) for r in GOOD[20:])
    train, _, stats = load(tmp_path, text=text, max_bad_fraction=0.1)
    assert stats["bad"] == {"invalid_json": 1} and len(train) == 40
    assert stats["bad_ids"]["invalid_json"] == ["20"]


def test_missing_field_names_the_field(tmp_path):
    rows = GOOD[:30] + [{"id": "x1", "instruction": "hi", "response": "wrong name"}]
    train, _, stats = load(tmp_path, rows, max_bad_fraction=0.1)
    assert stats["bad"] == {"missing_field:output": 1} and stats["bad_ids"]["missing_field:output"] == ["x1"]
    assert len(train) == 30


@pytest.mark.parametrize("output", [None, "", "   ", 42, ["a"]])
def test_null_empty_or_non_string_response(tmp_path, output):
    rows = GOOD[:30] + [{"id": "bad", "instruction": "hi", "output": output}]
    _, _, stats = load(tmp_path, rows, max_bad_fraction=0.1)
    assert sum(stats["bad"].values()) == 1
    assert ["bad"] in stats["bad_ids"].values()


def test_prompt_longer_than_max_length(tmp_path):
    rows = GOOD[:30] + [{"id": "long", "instruction": "x" * 500, "output": "y"}]
    train, _, stats = load(tmp_path, rows)
    assert stats["dropped_too_long"] == 1 and len(train) == 30
    _, _, stats = load(tmp_path, rows, overflow="drop")
    assert stats["dropped_too_long"] == 1


def test_duplicate_ids(tmp_path):
    with pytest.raises(ValueError, match=r"ids occur more than once.*'g3'"):
        load(tmp_path, GOOD + [dict(GOOD[3])])


def test_unusual_unicode_survives(tmp_path):
    rows = GOOD[:10] + [{"id": "u", "instruction": "Écris 🙂 \u200b 日本語 \U0001F9EA", "output": "ça va — ok\u00a0!"}]
    train, _, stats = load(tmp_path, rows)
    ex = [e for e in train if e.id == "u"][0]
    assert TOK.decode(ex.input_ids[ex.loss_mask.astype(bool)]).startswith("ça va — ok\u00a0!")
    assert not stats["bad"]


def test_every_row_bad(tmp_path):
    with pytest.raises(ValueError, match=r"missing_field:output"):
        load(tmp_path, [{"id": str(i), "instruction": "hi"} for i in range(10)])


def test_mixed_schemas(tmp_path):
    """Rows with other fields and types than their neighbours: each judged on its own."""
    rows = GOOD[:30] + [{"id": "m1", "instruction": "hi", "input": 7, "output": "x"},
                        {"id": "m2", "instruction": "hi", "output": "fine", "extra": {"nested": [1, 2]}}]
    train, _, stats = load(tmp_path, rows, max_bad_fraction=0.1)
    assert stats["bad"] == {"bad_field": 1} and stats["bad_ids"]["bad_field"] == ["m1"]
    assert "m2" in [e.id for e in train]


def test_unknown_role(tmp_path):
    good = [{"id": f"c{i}", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
            for i in range(20)]
    rows = good + [{"id": "r", "messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}]
    _, _, stats = load(tmp_path, rows, format="messages", max_bad_fraction=0.1)
    assert stats["bad"] == {"unknown_role": 1} and stats["bad_ids"]["unknown_role"] == ["r"]


def test_empty_conversation(tmp_path):
    good = [{"id": f"c{i}", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
            for i in range(20)]
    rows = good + [{"id": "e", "conversations": []}]
    _, _, stats = load(tmp_path, rows, format="sharegpt", max_bad_fraction=0.1)
    assert stats["bad"] == {"empty_conversation": 1} and stats["bad_ids"]["empty_conversation"] == ["e"]


def test_too_many_bad_rows_is_an_error_naming_counts_and_ids(tmp_path):
    rows = GOOD[:10] + [{"id": f"b{i}", "instruction": "hi"} for i in range(5)]
    with pytest.raises(ValueError, match=r"5 of 15 rows.*missing_field:output.*b0"):
        load(tmp_path, rows, max_bad_fraction=0.05)


def test_dataset_smaller_than_one_batch(tmp_path):
    train, _, _ = load(tmp_path, GOOD[:5])
    with pytest.raises(ValueError, match=r"5 usable examples, fewer than one batch \(config.train.batch_size=8\)"):
        batching.TrainBatches(train, 8, 0, (64,))


def test_unknown_file_type(tmp_path):
    with pytest.raises(ValueError, match="unknown file type"):
        load(tmp_path, text="a,b\n1,2", name="d.csv")
