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

from sftmix_jax import config


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
    c = config.defaults()  # everything not set here: sftmix_jax/config.py
    c.model.source = a["model"]  # its own tokenizer and chat template
    c.data.source = a["data"]
    c.data.template = "chat"  # SmolLM2-Instruct's chat template
    c.data.num_examples = int(a["n"])
    c.data.max_length = 256
    c.data.buckets = (128, 192, 256)
    c.train.update(dict(batch_size=8, lr=1e-5, log_every=1, eval_every=10, eval_batch_size=8, save_every=10))
    c.confidence.batch_size = 16
    # multiple_choice, e.g. MedQA with a network:
    # --config.evaluate.multiple_choice.source=GBaker/MedQA-USMLE-4-options:test
    # --config.evaluate.multiple_choice.fields.choices=options --config.evaluate.multiple_choice.fields.answer=answer_idx
    c.evaluate.update(dict(max_new_tokens=32, batch_size=8))
    c.evaluate.multiple_choice.batch_size = 8
    return c
