"""Stage 2, confidence: replay the reference checkpoints -> perplexities -> confidence -> split.

    Perp_c(i) = exp(mean response NLL of example i under checkpoint c)
    Conf(i)   = -mean_c Perp_c(i)        Var(i) = std_c Perp_c(i)

The split is at the median of Conf into equal confident (upper) and unconfident (lower)
halves; with an odd count the median example is dropped (and recorded as such). Each
checkpoint's perplexities are cached, so an interrupted replay resumes at the next checkpoint.
"""
import json
import os

import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from sftmix_jax import checkpoints, config, hf, multihost, sharding
from sftmix_jax.data import sources
from sftmix_jax.model import lora
from sftmix_jax.model.llama import abstract_model
from sftmix_jax.scoring import example_nll


def replay(ckpt_dir, steps, examples, model, batch_size, buckets, pad_id, cache_dir, mesh=None, pack=True) -> np.ndarray:
    """Perplexity [C, n] of every example under each checkpoint, cached per checkpoint.

    model: the reference model, abstract (`abstract_model`) or, under LoRA, the base weights with
    adapters. The trained parameters only are restored (all of them, or the adapters), sharded for
    `mesh`, which may differ from the training mesh. pack: `example_nll`'s (config.scoring.pack).
    """
    graphdef, abstract, frozen = nnx.split(model, lora.trainable(model), ...)
    if mesh is not None:
        abstract = sharding.with_shardings(abstract, sharding.state_shardings(abstract, mesh))
    perps = []
    for step in steps:
        cache = epath.Path(cache_dir, f"perplexity_step{step}.npy")
        if multihost.agree(cache.exists()):  # the leader's view: all replay the same checkpoints
            logging.info("replay: checkpoint %d cached", step)
            with cache.open("rb") as f:
                perps.append(np.load(f))
            continue
        if not epath.Path(ckpt_dir, str(step)).exists():
            raise FileNotFoundError(
                f"reference checkpoint {step} is gone from {ckpt_dir}: the confidence stage replays the "
                f"reference checkpoints {list(steps)}. Restore it, or rerun the reference stage (delete its done.json).")
        params = checkpoints.restore_params(ckpt_dir, step, abstract)
        nll, count = example_nll(nnx.merge(graphdef, params, frozen), examples, batch_size, buckets, pad_id, mesh,
                                 desc=f"replay step {step}", pack=pack)
        if (count == 0).any():
            raise ValueError(f"examples without response tokens: {[examples[i].id for i in np.flatnonzero(count == 0)[:5]]}")
        perp = np.exp(nll / count)
        if multihost.is_leader():
            tmp = epath.Path(str(cache) + ".tmp")
            with tmp.open("wb") as f:
                np.save(f, perp)
            tmp.replace(cache)
        perps.append(perp)
    return np.stack(perps)


def median_split(conf: np.ndarray):
    """(confident, unconfident, dropped) row indices: equal halves by confidence."""
    order = np.argsort(-conf, kind="stable")  # most confident first; ties by row order
    half = len(order) // 2
    dropped = order[half : len(order) - half]  # the median row when the count is odd
    return np.sort(order[:half]), np.sort(order[len(order) - half :]), dropped


def run(run) -> dict:
    run = run.reference  # weak-to-strong: the reference model's own tokenization of the same examples
    c = run.config
    out = run.stage_dir("confidence")
    steps = json.loads(epath.Path(run.stage_dir("reference"), "done.json").read_text())["replay_steps"]
    if len(steps) < 2:
        raise ValueError(f"confidence needs >= 2 reference checkpoints to replay, got {steps}: "
                         "set config.reference.checkpoints >= 2")
    train_ex = run.data[0]
    model_cfg = config.reference_model_config(c)
    if c.get("lora") and c.lora.rank > 0:  # checkpoints hold the adapters: load the base weights
        model = lora.apply(hf.load_model(model_cfg, seed=c.seed, mesh=run.mesh), c.lora, c.seed, run.mesh)
    else:  # checkpoints hold every parameter: no weights to load
        model = abstract_model(hf.model_config(model_cfg))
    sources.check_vocab(train_ex, model.cfg.vocab_size, f"the reference model ({model_cfg.source})")
    perp_CE = replay(os.path.join(run.stage_dir("reference"), "checkpoints"), steps, train_ex,
                     model, c.confidence.batch_size, c.data.buckets, run.pad_id, out, run.mesh,
                     c.scoring.pack)
    conf_E, var_E = -perp_CE.mean(0), perp_CE.std(0)
    confident, unconfident, dropped = median_split(conf_E)
    split = np.full(len(train_ex), "", object)
    split[confident], split[unconfident], split[dropped] = "confident", "unconfident", "dropped"
    if len(dropped):
        logging.info("odd number of examples: dropped the median example %s", train_ex[dropped[0]].id)
    if multihost.is_leader():  # read by the sftmix stage after mark_done's barrier
        rows = [json.dumps({"id": ex.id, "perplexity": perp_CE[:, i].tolist(), "confidence": float(conf_E[i]),
                            "variability": float(var_E[i]), "split": split[i]}) + "\n" for i, ex in enumerate(train_ex)]
        tmp = epath.Path(out, "scores.jsonl.tmp")
        tmp.write_text("".join(rows))
        tmp.replace(epath.Path(out, "scores.jsonl"))
        data_map(conf_E, var_E, split, os.path.join(out, "data_map.png"), steps)
    summary = {
        "checkpoint_steps": steps,
        "confident": {"n": len(confident), "confidence": [float(conf_E[confident].min()), float(conf_E[confident].max())]},
        "unconfident": {"n": len(unconfident), "confidence": [float(conf_E[unconfident].min()), float(conf_E[unconfident].max())]},
        "dropped": [train_ex[i].id for i in dropped],
    }
    logging.info("confidence split: %s", summary)
    return summary


def data_map(conf, var, split, path, steps):
    """Dataset-Cartography data map (variability vs confidence by split) and a confidence histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, hist) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    bins = np.linspace(conf.min(), conf.max(), 50)
    for name, color in (("confident", "tab:blue"), ("unconfident", "tab:orange"), ("dropped", "gray")):
        m = split == name
        if m.any():
            ax.scatter(var[m], conf[m], s=6, alpha=0.5, color=color, label=f"{name} ({m.sum()})")
            hist.hist(conf[m], bins=bins, color=color, alpha=0.7, label=name)
    ax.set(xlabel="variability (std of perplexity over checkpoints)", ylabel="confidence (-mean perplexity)",
           title=f"Data map: {len(conf)} examples, checkpoints {steps}")
    ax.legend(markerscale=3)
    hist.set(xlabel="confidence", ylabel="examples", title="Confidence")
    fig.tight_layout()
    with epath.Path(path).open("wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
