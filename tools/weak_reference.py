"""A tiny weak reference with its own tokenizer, for trying weak-to-strong on configs/tiny.py offline.

    python tools/weak_reference.py runs/weak_reference [--family gemma2]
    python -m sftmix_jax.main --config configs/tiny.py --workdir runs/tiny_w2s \\
        --config.reference.model_source=runs/weak_reference

Writes, in Hugging Face format, a randomly initialised model smaller than the tiny target, with a
byte-level BPE tokenizer learnt from the suite (`synthetic.bpe_tokenizer`: other ids for the same
text, same chat template). The reference stage trains it on the suite in its own tokenization; the
confidence split joins back to the target's examples by id; the NTP baseline is the target model.
"""
import argparse

from sftmix_jax import hf
from sftmix_jax.data import synthetic
from sftmix_jax.model.llama import ModelConfig, init_model

FAMILIES = {  # model_type -> the fields that make it that family (Gemma-2: the paper's weak reference is Gemma)
    "llama": dict(model_type="llama"),
    "gemma2": dict(model_type="gemma2", embed_scale=True, norm_plus_one=True, activation="gelu_tanh", post_norms=True,
                   query_pre_attn_scalar=16, attn_softcap=50.0, final_softcap=30.0, sliding_window=16,
                   sliding_layers=(True, False)),
}


def write(out: str, family: str = "gemma2", seed: int = 0) -> str:
    """The weak reference's HF directory: a random model of `family` with the suite's BPE tokenizer."""
    tok = synthetic.bpe_tokenizer()
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, tie_embeddings=True, **FAMILIES[family])
    hf.save_pretrained(init_model(cfg, seed=seed), out, tokenizer=tok)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="output directory (config.json, model.safetensors, tokenizer)")
    p.add_argument("--family", default="gemma2", choices=sorted(FAMILIES))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(write(a.out, a.family, a.seed))


if __name__ == "__main__":
    main()
