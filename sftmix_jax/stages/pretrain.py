"""A pre-trained base for the tiny suite: the paper's regime (fine-tune a pre-trained model for a
few epochs at a small learning rate) on a CPU.

config.model.source = 'pretrain' stands for a model pre-trained by next-token prediction on a broad
synthetic task corpus (data/synthetic.py corpus: more task families than the instruction suite, as plain
text lines `instruction: input -> output` and, for the families outside the suite only, some chat
turns; none of the suite's prompts), from config.model.init. The loss is on the answers: random
inputs would otherwise dominate it, and a model this small then learns to copy letters late and
abruptly, in fine-tuning, at a seed-dependent step. It is trained once per (corpus, model,
schedule) and cached under config.pretrain.cache/<hash>; every seed and arm of the fine-tuning
stages starts from the same weights. Resumable like any stage.
"""
import fcntl
import hashlib
import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from sftmix_jax import hf, losses, multihost, trainer
from sftmix_jax.data import synthetic
from sftmix_jax.data.batching import TrainBatches
from sftmix_jax.data.sources import Example

VERSION = 2  # part of the cache key: bump when the corpus or the recipe changes meaning
# The corpus leaves out the prompts of the instruction suite's first EXCLUDED rows (or more, for a
# bigger suite): synthetic.generate(n) is a prefix of generate(m > n), so one base serves any
# num_train + num_eval up to it.
EXCLUDED = 20000


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        docs=24000, heldout_docs=512, seed=1234,  # the corpus (and the init) is fixed: not config.seed
        chat_fraction=0.5,  # of the pre-training-only families' rows, written as chat turns (synthetic.corpus)
        steps=2000, batch_size=64, lr=3e-3, warmup_ratio=0.05, min_lr_ratio=0.1,
        cache="~/.cache/sftmix_jax/pretrained"))


def cache_key(c) -> str:
    """What the weights depend on; not the cache location, not config.seed."""
    p = {k: v for k, v in c.pretrain.to_dict().items() if k != "cache"}
    key = dict(version=VERSION, pretrain=p, init=c.model.init.to_dict(), dtype=c.model.dtype,
               param_dtype=c.model.param_dtype, max_length=c.data.max_length, buckets=list(c.data.buckets),
               excluded=[excluded_rows(c), c.data.synthetic.seed], tokenizer=c.tokenizer)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def excluded_rows(c) -> int:
    return max(EXCLUDED, c.data.synthetic.num_train + c.data.synthetic.num_eval)


def base_dir(c) -> str:
    return os.path.join(os.path.expanduser(c.pretrain.cache), cache_key(c))


def documents(c, tokenizer):
    """(train, held-out) Examples: BOS, then the lines; the loss is on each line's answer."""
    s = c.data.synthetic
    exclude = {(r["instruction"], r["input"]) for r in synthetic.generate(excluded_rows(c), s.seed)}
    p = c.pretrain
    docs = synthetic.corpus(p.docs + p.heldout_docs, c.data.max_length - 1, p.seed, exclude, p.chat_fraction)
    segments = [text for lines in docs for line in lines for text in line]  # prompt, answer, prompt, ...
    tokens = iter(tokenizer(segments, add_special_tokens=False)["input_ids"])  # one batched call
    out = []
    for n, lines in enumerate(docs):
        ids, mask = [tokenizer.bos_token_id], [0]
        for _ in lines:
            for weight in (0, 1):  # the prompt, then the answer
                t = next(tokens)
                ids += t
                mask += [weight] * len(t)
        out.append(Example(id=f"pretrain-{n}", input_ids=np.asarray(ids, np.int32), loss_mask=np.asarray(mask, np.int8),
                           prompt_ids=np.asarray(ids[:1], np.int32), answer=""))
    return out[: p.docs], out[p.docs:]


def train_config(c) -> ml_collections.ConfigDict:
    """config.train with the pre-training schedule in place of the fine-tuning one."""
    t = c.train.copy_and_resolve_references()
    p = c.pretrain
    with t.unlocked():
        t.update(steps=p.steps, epochs=0.0, batch_size=p.batch_size, grad_accum=1, lr=p.lr, warmup_ratio=p.warmup_ratio,
                 min_lr_ratio=p.min_lr_ratio, eval_every=max(p.steps // 4, 1), save_every=max(p.steps // 4, 1),
                 wandb_project="")
    return t


def resolve(c, tokenizer, mesh, pad_id: int):
    """config with model.source='pretrain' replaced by the cached base's HF directory (pre-trained
    first if absent); any other config unchanged."""
    if c.model.source != "pretrain":
        return c
    base = ensure(c, tokenizer, mesh, pad_id)
    c = c.copy_and_resolve_references()
    with c.unlocked():
        c.model.source = base
    return c


def ensure(c, tokenizer, mesh, pad_id: int) -> str:
    """The base's HF directory, pre-training it first unless the cache holds it."""
    d = base_dir(c)
    hf_dir = os.path.join(d, "hf")
    if multihost.agree(epath.Path(d, "done.json").exists()):
        logging.info("pretrain: cached base %s", hf_dir)
        return hf_dir
    epath.Path(d).mkdir(parents=True, exist_ok=True)
    if jax.process_count() > 1:  # a shared directory, one run at a time: the processes act as one
        _pretrain(c, tokenizer, mesh, pad_id, d)
        return hf_dir
    with open(os.path.join(d, ".lock"), "w") as lock:  # two runs on one machine: the second waits
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not epath.Path(d, "done.json").exists():
            _pretrain(c, tokenizer, mesh, pad_id, d)
    return hf_dir


def _pretrain(c, tokenizer, mesh, pad_id: int, d: str) -> None:
    logging.info("pretrain: no cached base; pre-training one in %s (once for every seed and arm)", d)
    train_docs, held = documents(c, tokenizer)
    model_cfg = c.model.copy_and_resolve_references()
    with model_cfg.unlocked():
        model_cfg.source = "init"
    model = hf.load_model(model_cfg, seed=c.pretrain.seed, mesh=mesh)
    t = train_config(c)
    batches = TrainBatches(train_docs, t.batch_size, c.pretrain.seed, c.data.buckets, jax.process_index(),
                           jax.process_count(), pad_id=pad_id)
    model, ev = trainer.train(d, model, batches, held, losses.ntp_loss_fn(), t, mesh=mesh, seed=c.pretrain.seed,
                            total_steps=t.steps, pad_id=pad_id, buckets=c.data.buckets, desc="pretrain",
                            pack=c.scoring.pack)
    hf.save_pretrained(model, os.path.join(d, "hf"), tokenizer=tokenizer)
    if multihost.is_leader():  # written last: its presence means the base is complete
        multihost.write_atomic(epath.Path(d, "done.json"), json.dumps(
            {"heldout": ev, "steps": t.steps, "key": cache_key(c), "pretrain": c.pretrain.to_dict()}, indent=2))
    multihost.barrier("pretrain done")
    logging.info("pretrain: held-out %s; base saved to %s", ev, os.path.join(d, "hf"))
