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
    ids = [e.id for e in examples]
    if [r["id"] for r in rows] != ids:
        raise ValueError(f"{conf_dir}/scores.jsonl does not match the training set (was the data config changed?)")
    split = np.array([r["split"] for r in rows])
    confident, unconfident = np.flatnonzero(split == "confident"), np.flatnonzero(split == "unconfident")
    if mode == "random":
        kept = np.random.default_rng([seed, 1]).permutation(np.concatenate([confident, unconfident]))
        confident, unconfident = np.sort(kept[: len(confident)]), np.sort(kept[len(confident) :])
    elif mode != "confidence":
        raise ValueError(f"config.confidence.split={mode!r}: use 'confidence' or 'random'")
    return confident, unconfident
