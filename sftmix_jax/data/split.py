"""The confident / unconfident split: scores.jsonl, written by the confidence stage, read by the
SFTMix stage."""
import json

import numpy as np
from etils import epath


def load_split(conf_dir, examples, mode="confidence", seed=0):
    """(confident, unconfident) row indices into `examples`, from scores.jsonl.

    mode 'random' (the control): halves of the same sizes drawn at random from the same rows.
    """
    rows = [json.loads(line) for line in epath.Path(conf_dir, "scores.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r["split"] for r in rows}  # joined by id: the reference may tokenize differently
    missing = [e.id for e in examples if e.id not in by_id]
    if missing or len(by_id) != len(examples):
        raise ValueError(f"{conf_dir}/scores.jsonl does not match the training set ({len(by_id)} scored, "
                         f"{len(examples)} training examples, unscored ids {missing[:5]}): was the data config changed?")
    split = np.array([by_id[e.id] for e in examples])
    confident, unconfident = np.flatnonzero(split == "confident"), np.flatnonzero(split == "unconfident")
    if mode == "random":
        kept = np.random.default_rng([seed, 1]).permutation(np.concatenate([confident, unconfident]))
        confident, unconfident = np.sort(kept[: len(confident)]), np.sort(kept[len(confident) :])
    elif mode != "confidence":
        raise ValueError(f"config.confidence.split={mode!r}: use 'confidence' or 'random'")
    return confident, unconfident
