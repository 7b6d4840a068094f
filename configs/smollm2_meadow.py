"""SmolLM2-135M-Instruct on Medical Meadow (the paper's healthcare SFT data, a small sample), on a CPU.

    python ../shared/tools/smollm2_hf.py ~/.cache/sftmix_jax/smollm2-135m-instruct
    python -m sftmix_jax.main --config configs/smollm2_meadow.py --workdir runs/meadow
    python -m sftmix_jax.main --config configs/smollm2_meadow.py:model=DIR,data=FILE.json --workdir ...

The argument is `key=value` pairs: `model` (an HF directory or hub id; default the path
above), `data` (an Alpaca-style JSON/JSONL file; default ../shared/data/medical_meadow_small.json),
`n` (rows used, default 400). Sized for a 2-core CPU: one epoch over 360 training rows,
sequences up to 256 tokens (about 20 s a step); on an accelerator raise n, batch and length.
GPTeacher-style data names its answer `response`: add --config.data.fields.output=response.
"""
import os

import ml_collections

from sftmix_jax.data import sources
from sftmix_jax.model import lora


def parse_arg(arg):
    out = dict(model=os.path.expanduser("~/.cache/sftmix_jax/smollm2-135m-instruct"),
               data="../shared/data/medical_meadow_small.json", n="400")
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in out:
            raise ValueError(f"unknown config argument {key!r}; use {sorted(out)}")
        out[key] = value
    return out


def get_config(arg=None):
    a = parse_arg(arg)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stages = "reference,confidence,sftmix,evaluate"
    c.tokenizer = ""  # '' = the model's own tokenizer and chat template
    c.model = ml_collections.ConfigDict(dict(source=a["model"], init=ml_collections.ConfigDict(),
                                             dtype="float32", param_dtype="float32", remat="none",
                                             attention="auto"))

    c.data = sources.default_config()
    c.data.source = a["data"]
    c.data.format = "alpaca"
    c.data.template = "chat"  # SmolLM2-Instruct's chat template
    c.data.num_examples = int(a["n"])
    c.data.eval_fraction = 0.1
    c.data.max_length = 256
    c.data.buckets = (128, 192, 256)

    c.train = ml_collections.ConfigDict(dict(
        epochs=1.0, steps=0, batch_size=8, grad_accum=1,
        lr=1e-5, min_lr_ratio=0.1, warmup_ratio=0.1, weight_decay=0.1, grad_clip=1.0,
        b1=0.9, b2=0.95, eps=1e-8, ce_chunk=0,
        log_every=1, eval_every=10, eval_batch_size=8, save_every=10, keep_latest=2,
        skip_nonfinite=False,  # True: skip (and count) batches whose loss is not finite
        wandb_project=''))  # a W&B project name logs there too (pip install wandb); '' = TensorBoard only
    c.reference = ml_collections.ConfigDict(dict(model_source="", checkpoints=3))
    c.confidence = ml_collections.ConfigDict(dict(batch_size=16, split="confidence"))
    c.sftmix = ml_collections.ConfigDict(dict(mu=0.2, alpha=0.5, per_pair=False, ntp=True,
                                              pairing="random"))  # 'length': pair similar response lengths
    c.lora = lora.default_config()  # rank > 0: LoRA adapters only (the compute-constrained setting)
    # Device mesh: -1 takes the devices left over. FSDP shards parameters and optimizer state
    # over `fsdp`; tensor parallelism shards heads, MLP and vocabulary over `tensor`.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1))
    # multiple_choice (sftmix_jax/multiple_choice.py; source '' = off), e.g. MedQA with a network:
    # --config.evaluate.multiple_choice.source=GBaker/MedQA-USMLE-4-options:test
    # --config.evaluate.multiple_choice.fields.choices=options --config.evaluate.multiple_choice.fields.answer=answer_idx
    c.evaluate = ml_collections.ConfigDict(dict(max_new_tokens=32, exact_match=False, batch_size=8,
        other=dict(source="", num_examples=0),  # a held-out set not trained on (forgetting): file, first N rows
        multiple_choice=dict(
        source="", split="test", subset="", num_examples=0, batch_size=8, template="chat", lettered=False,
        fixed_choices="", fields=dict(id="id", question="question", choices="choices", answer="answer", context=""))))
    return c
