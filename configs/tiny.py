"""The whole SFTMix pipeline offline on a CPU in minutes, in the paper's regime.

A tiny Llama-shaped model is pre-trained once on a broad synthetic plain-text corpus (pretrain.py;
cached in ~/.cache/sftmix_jax/pretrained), then fine-tuned for a few epochs at a fine-tuning
learning rate on the built-in instruction suite (copy, upper-case, reverse, sort digits, count a
letter, add), with the byte-level tokenizer built in code: no download, same code path as a real
HF model. --config.model.source=init trains from scratch instead (then raise the learning rate).

    python -m sftmix_jax.main --config configs/tiny.py --workdir runs/tiny
    python -m sftmix_jax.compare --config configs/tiny.py --workdir runs/tiny_compare --seeds 0-4
"""
import ml_collections

from sftmix_jax.data import sources
from sftmix_jax.model import lora
from sftmix_jax.stages import pretrain


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stages = "reference,confidence,sftmix,evaluate"
    c.tokenizer = "synthetic"

    c.model = ml_collections.ConfigDict(dict(
        source="pretrain",  # the cached base pre-trained from `init`; 'init' = random init; or an HF directory / hub id
        init=dict(vocab_size=264, hidden_size=96, intermediate_size=256, num_layers=3, num_heads=4,
                  num_kv_heads=2, head_dim=24, rope_theta=10000.0, tie_embeddings=True),
        dtype="float32", param_dtype="float32", remat="none", attention="auto"))

    c.data = sources.default_config()
    c.data.source = "synthetic"
    c.data.max_length = 64
    c.data.buckets = (24, 32, 48, 64)
    c.data.synthetic.num_train = 1200
    c.data.synthetic.num_eval = 240
    c.pretrain = pretrain.default_config()  # used when model.source == 'pretrain'

    # Fine-tuning: a few epochs at a third of the pre-training learning rate.
    c.train = ml_collections.ConfigDict(dict(
        epochs=5.0, steps=0,  # steps > 0 overrides epochs
        batch_size=32, grad_accum=1,
        lr=1e-3, min_lr_ratio=0.1, warmup_ratio=0.1, weight_decay=0.1, grad_clip=1.0,
        b1=0.9, b2=0.95, eps=1e-8,
        ce_chunk=0,  # >0: cross-entropy over sequence chunks of this size
        log_every=10, eval_every=50, eval_batch_size=64, save_every=50, keep_latest=2,
        skip_nonfinite=False,  # True: skip (and count) batches whose loss is not finite
        wandb_project=''))  # a W&B project name logs there too (pip install wandb); '' = TensorBoard only

    c.reference = ml_collections.ConfigDict(dict(
        model_source="",  # '' = config.model; else a (smaller) HF model: weak-to-strong
        checkpoints=3))  # C checkpoints replayed for confidence, evenly spaced, last at the end

    c.confidence = ml_collections.ConfigDict(dict(batch_size=64, split="confidence"))  # or 'random'
    c.sftmix = ml_collections.ConfigDict(dict(mu=0.2, alpha=0.5, per_pair=False, ntp=True,
                                              pairing="random"))  # 'length': pair similar response lengths
    c.lora = lora.default_config()  # rank > 0: LoRA adapters only (the compute-constrained setting)
    # Device mesh: -1 takes the devices left over. FSDP shards parameters and optimizer state
    # over `fsdp`; tensor parallelism shards heads, MLP and vocabulary over `tensor`.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1))
    # multiple_choice: accuracy by option log-likelihood on a question set (sftmix_jax/multiple_choice.py
    # documents every key); source "" = off.
    c.evaluate = ml_collections.ConfigDict(dict(max_new_tokens=16, exact_match=True, batch_size=64,
        other=dict(source="", num_examples=0),  # a held-out set not trained on (forgetting): file, first N rows
        multiple_choice=dict(
        source="", split="test", subset="", num_examples=0, batch_size=64, template="chat", lettered=False,
        fixed_choices="", fields=dict(id="id", question="question", choices="choices", answer="answer", context=""))))
    return c
