"""The whole SFTMix pipeline offline on a CPU in minutes, in the paper's regime.

A tiny Llama-shaped model is pre-trained once on a broad synthetic plain-text corpus
(stages/pretrain.py; cached in ~/.cache/sftmix_jax/pretrained), then fine-tuned for a few epochs at
a fine-tuning learning rate on the built-in instruction suite (copy, upper-case, reverse, sort
digits, count a letter, add), with the byte-level tokenizer built in code: no download, same code
path as a real HF model. --config.model.source=init trains from scratch instead (then raise the
learning rate).

    python -m sftmix_jax.main --config configs/tiny.py --workdir runs/tiny
    python -m sftmix_jax.compare --config configs/tiny.py --workdir runs/tiny_compare --seeds 0-4
"""
from sftmix_jax import config
from sftmix_jax.stages import pretrain


def get_config(arg=None):
    del arg
    c = config.defaults()  # everything not set here: sftmix_jax/config.py
    c.tokenizer = "synthetic"
    c.model.source = "pretrain"  # the cached base pre-trained from `init`; 'init' = random init
    c.model.init.update(dict(vocab_size=264, hidden_size=96, intermediate_size=256, num_layers=3, num_heads=4,
                             num_kv_heads=2, head_dim=24, rope_theta=10000.0, tie_embeddings=True))
    c.data.source = "synthetic"
    c.data.max_length = 64
    c.data.buckets = (24, 32, 48, 64)
    c.data.synthetic.num_train = 1200
    c.data.synthetic.num_eval = 240
    c.pretrain = pretrain.default_config()  # used when model.source == 'pretrain'
    # Fine-tuning: a few epochs at a third of the pre-training learning rate.
    c.train.update(dict(epochs=5.0, lr=1e-3, eval_every=50, save_every=50))
    c.evaluate.update(dict(max_new_tokens=16, exact_match=True))
    return c
