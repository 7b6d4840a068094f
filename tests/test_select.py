"""The selection export: scores.jsonl joined back to source rows (no training)."""

import json

import pytest

from sftmix_jax.data import sources
from sftmix_jax.cli import select
from sftmix_jax.data import synthetic

# Ids: the row's own `id`, else its index in file order (row 2 has none: id "2").
ROWS = [{"id": "a", "instruction": "qa", "output": "1"}, {"id": "b", "instruction": "qb", "output": "2"},
        {"instruction": "qc", "output": "3", "extra": [1, 2]}, {"id": "d", "instruction": "qd", "output": "4"},
        {"id": "e", "instruction": "qe", "output": "5"}, {"id": "f", "instruction": "qf", "output": "6"}]
# Row "d" was held out; "e" is the median of an odd count, dropped from the split.
SCORES = [("a", -1.5, 0.2, "confident"), ("b", -4.0, 0.1, "unconfident"), ("2", -1.1, 0.9, "confident"),
          ("e", -2.0, 0.5, "dropped"), ("f", -3.0, 0.3, "unconfident")]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def make_workdir(tmp_path, scores=SCORES, **data_overrides):
    cfg = sources.default_config()
    cfg.source = str(tmp_path / "source.jsonl")
    cfg.update(data_overrides)
    write_jsonl(tmp_path / "source.jsonl", ROWS)
    work = tmp_path / "run"
    write_jsonl(work / "confidence" / "scores.jsonl",
                [{"id": i, "perplexity": [-c, -c], "confidence": c, "variability": v, "split": s}
                 for i, c, v, s in scores])
    (work / "config.json").write_text(json.dumps({"seed": 0, "data": json.loads(cfg.to_json_best_effort())}))
    return str(work)


def scored(row_index, conf, var):
    return {**ROWS[row_index], "sftmix_confidence": conf, "sftmix_variability": var}


def test_split_export(tmp_path):
    out = tmp_path / "out"
    assert select.select(make_workdir(tmp_path), str(out)) == {"confident.jsonl": 2, "unconfident.jsonl": 2}
    assert read_jsonl(out / "confident.jsonl") == [scored(0, -1.5, 0.2), scored(2, -1.1, 0.9)]
    assert read_jsonl(out / "unconfident.jsonl") == [scored(1, -4.0, 0.1), scored(5, -3.0, 0.3)]
    assert not (out / "top_k.jsonl").exists()


def test_top_k_and_fraction(tmp_path):
    work, out = make_workdir(tmp_path), tmp_path / "out"
    select.select(work, str(out), top_k=3)  # the most confident first
    assert [r["instruction"] for r in read_jsonl(out / "top_k.jsonl")] == ["qc", "qa", "qe"]
    select.select(work, str(out), fraction=0.4, by="variability")  # round(0.4 * 5) = 2 rows
    assert read_jsonl(out / "top_k.jsonl") == [scored(2, -1.1, 0.9), scored(4, -2.0, 0.5)]
    select.select(work, str(out), top_k=50)
    assert len(read_jsonl(out / "top_k.jsonl")) == 5
    for bad, match in [(dict(top_k=2, fraction=0.5), "not both"), (dict(fraction=1.5), "fraction"),
                       (dict(fraction=0.01), "selects none"), (dict(top_k=2, by="loss"), "by=")]:
        with pytest.raises(ValueError, match=match):
            select.select(work, str(out), **bad)


def test_synthetic_source_regenerated(tmp_path):
    rows = synthetic.generate(12, 0)
    scores = [(rows[i]["id"], -float(i), 0.0, "confident" if i < 3 else "unconfident") for i in (1, 2, 7, 11)]
    work, out = make_workdir(tmp_path, scores, source="synthetic", synthetic=dict(num_train=12)), tmp_path / "out"
    select.select(work, str(out))
    assert [r["id"] for r in read_jsonl(out / "confident.jsonl")] == [rows[1]["id"], rows[2]["id"]]
    assert read_jsonl(out / "unconfident.jsonl")[1] == {**rows[11], "sftmix_confidence": -11.0,
                                                        "sftmix_variability": 0.0}


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the confidence stage"):
        select.select(str(tmp_path / "nothing"), str(tmp_path / "out"))
    # num_examples=4 leaves rows e and f out of the source: the ids are named.
    work = make_workdir(tmp_path, num_examples=4)
    with pytest.raises(ValueError, match=r"2 of 5 ids .* not in data.source.*\['e', 'f'\]"):
        select.select(work, str(tmp_path / "out"))
    work = make_workdir(tmp_path, source=str(tmp_path / "moved.jsonl"))
    with pytest.raises(FileNotFoundError, match="moved.jsonl.*does not exist"):
        select.select(work, str(tmp_path / "out"))


def test_cli(tmp_path, capsys):
    work, out = make_workdir(tmp_path), tmp_path / "out"
    select.main(["--workdir", work, "--out", str(out), "--top_k", "2", "--by", "variability"])
    assert "top_k.jsonl: 2 rows" in capsys.readouterr().out
    assert [r["instruction"] for r in read_jsonl(out / "top_k.jsonl")] == ["qc", "qe"]
    with pytest.raises(SystemExit) as e:  # --by alone ranks nothing
        select.main(["--workdir", work, "--out", str(out), "--by", "variability"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        select.main(["--workdir", str(tmp_path / "nothing"), "--out", str(out)])
    assert e.value.code == 1 and "run the confidence stage" in capsys.readouterr().err
