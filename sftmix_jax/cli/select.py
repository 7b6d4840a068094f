"""Export the data selected by the confidence stage, as rows of the source data set.

    python -m sftmix_jax.cli.select --workdir DIR --out OUT_DIR [--top_k N | --fraction F] [--by confidence|variability]

Joins DIR/confidence/scores.jsonl to the rows of the run's data.source (read from
DIR/config.json) by id: the row's data.fields.id value, else its index in file order, as in
training. Writes OUT_DIR/confident.jsonl and OUT_DIR/unconfident.jsonl (the confidence split,
in file order), or with --top_k / --fraction OUT_DIR/top_k.jsonl (the rows with the highest
--by score first: confidence is -mean perplexity, so the most confident; or the most variable).
Each row is the original row with `sftmix_confidence` and `sftmix_variability` added.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from etils import epath

from sftmix_jax.data import sources, synthetic

BY = ("confidence", "variability")


def read_scores(workdir: str) -> list[dict]:
    path = epath.Path(workdir, "confidence", "scores.jsonl")
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: run the confidence stage first (python -m sftmix_jax.main "
            f"--config ... --workdir {workdir} --config.stages=reference,confidence)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def source_rows(data_cfg: dict) -> dict[str, dict]:
    """id -> row of the run's training source, ids assigned as training assigns them."""
    source = data_cfg["source"]
    if source == "synthetic":  # generate(n) is a prefix of generate(m): the training rows
        s = data_cfg["synthetic"]
        rows = synthetic.generate(s["num_train"], s["seed"])
        id_field = sources.default_config().fields.id
    else:
        if source.lower().endswith((".json", ".jsonl", ".parquet")) and not epath.Path(source).exists():
            raise FileNotFoundError(f"data.source={source!r} (from config.json) does not exist here; a relative "
                                    "path is relative to the directory the run was started in")
        rows = sources._read_rows(source, data_cfg["split"])
        if data_cfg["num_examples"]:
            rows = rows[: data_cfg["num_examples"]]
        id_field = data_cfg["fields"]["id"]
    return dict(zip(sources._row_ids(rows, id_field, source), rows))


def select(workdir: str, out: str, top_k: int = 0, fraction: float = 0.0, by: str = "confidence") -> dict:
    """Write the selection under `out`; -> {file name: rows written}."""
    if by not in BY:
        raise ValueError(f"by={by!r}: use one of {BY}")
    if top_k and fraction:
        raise ValueError("give top_k or fraction, not both")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be > 0")
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction={fraction} must be in (0, 1]")
    scores = read_scores(workdir)
    config_path = epath.Path(workdir, "config.json")
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} does not exist: is {workdir} a sftmix_jax workdir?")
    data_cfg = json.loads(config_path.read_text())["data"]
    rows = source_rows(data_cfg)
    missing = [s["id"] for s in scores if s["id"] not in rows]
    if missing:
        raise ValueError(f"{len(missing)} of {len(scores)} ids in scores.jsonl are not in data.source="
                         f"{data_cfg['source']!r} (was it changed since the run?), e.g. {missing[:5]}")
    scored = [{**rows[s["id"]], "sftmix_confidence": s["confidence"], "sftmix_variability": s["variability"]}
              for s in scores]
    if top_k or fraction:
        k = top_k or int(round(fraction * len(scores)))
        if k == 0:
            raise ValueError(f"fraction={fraction} of {len(scores)} rows selects none")
        order = np.argsort([-s[by] for s in scores], kind="stable")[:k]  # highest first
        files = {"top_k.jsonl": [scored[i] for i in order]}
    else:  # the median row of an odd count is 'dropped': in neither file
        files = {f"{split}.jsonl": [r for r, s in zip(scored, scores) if s["split"] == split]
                 for split in ("confident", "unconfident")}
    epath.Path(out).mkdir(parents=True, exist_ok=True)
    for name, selected in files.items():
        tmp = epath.Path(out, name + ".tmp")  # then renamed: no half-written file on a crash
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in selected))
        tmp.replace(epath.Path(out, name))
    return {name: len(selected) for name, selected in files.items()}


def main(argv=None) -> None:
    # argparse, not absl flags: absl's global registry already holds main.py's --workdir.
    p = argparse.ArgumentParser(prog="python -m sftmix_jax.cli.select", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a run directory holding confidence/scores.jsonl")
    p.add_argument("--out", required=True, help="output directory")
    k = p.add_mutually_exclusive_group()
    k.add_argument("--top_k", type=int, default=0, help="write the N rows with the highest --by score")
    k.add_argument("--fraction", type=float, default=0.0, help="write this fraction of the rows, highest --by first")
    p.add_argument("--by", choices=BY, help="score ranked by --top_k / --fraction (default: confidence)")
    a = p.parse_args(argv)
    if a.by and not (a.top_k or a.fraction):
        p.error("--by ranks rows for --top_k or --fraction; without them the export is the confidence split")
    try:
        written = select(a.workdir, a.out, a.top_k, a.fraction, a.by or "confidence")
    except (FileNotFoundError, ValueError) as e:
        p.exit(1, f"error: {e}\n")
    for name, n in written.items():
        print(f"{epath.Path(a.out, name)}: {n} rows")


if __name__ == "__main__":
    main()
