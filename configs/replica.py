"""Replicas of the paper's comparison on one accelerator (one GPU, or one TPU host), over seeds.

    python -m sftmix_jax.compare --config configs/replica.py:RUN --workdir runs/RUN --seeds 0-2

RUN                    model                     data                                          eval
qwen25_05b_medalpaca   Qwen/Qwen2.5-0.5B         medalpaca/medical_meadow_medical_flashcards   MedQA (4 options)
qwen25_15b_medalpaca   Qwen/Qwen2.5-1.5B         medalpaca/medical_meadow_medical_flashcards   MedQA (4 options)
llama32_1b_medalpaca   meta-llama/Llama-3.2-1B   medalpaca/medical_meadow_medical_flashcards   MedQA (4 options)
qwen25_05b_alpaca      Qwen/Qwen2.5-0.5B         tatsu-lab/alpaca                              held-out loss only
llama32_1b_alpaca      meta-llama/Llama-3.2-1B   tatsu-lab/alpaca                              held-out loss only

Each runs 3 epochs over the first `rows` rows (2% held out), the paper's recipe otherwise (AdamW,
cosine, warmup 0.1, batch 32, mu 0.2, alpha 0.5) at a learning rate for small models. `rows` is
set so that one seed (reference, replay, SFTMix, the random-split control, evaluation) should take
about 40 minutes: 3 seeds in about two hours. That size is an estimate from the parameter count
(6 x params x tokens at ~35% utilisation of a 1 PFLOP/s bf16 chip), not a measurement; the first
seed's log gives the real time per step: lower `rows` (`:RUN,rows=N`) if it runs long.
MedQA, PubMedQA and MedMCQA score by option log-likelihood (multiple_choice.py); swap with e.g.
--config.evaluate.multiple_choice.source=openlifescienceai/medmcqa:validation
--config.evaluate.multiple_choice.fields.choices=opa,opb,opc,opd --config.evaluate.multiple_choice.fields.answer=cop
Gated models (Llama) need HF_TOKEN. Needs a network for the hub ids, or local copies by path.
"""
from sftmix_jax import config

MEADOW = "medalpaca/medical_meadow_medical_flashcards"
RUNS = {  # model, data, rows, learning rate, batch per device step
    "qwen25_05b_medalpaca": ("Qwen/Qwen2.5-0.5B", MEADOW, 20000, 1e-5),
    "qwen25_15b_medalpaca": ("Qwen/Qwen2.5-1.5B", MEADOW, 8000, 5e-6),
    "llama32_1b_medalpaca": ("meta-llama/Llama-3.2-1B", MEADOW, 10000, 5e-6),
    "qwen25_05b_alpaca": ("Qwen/Qwen2.5-0.5B", "tatsu-lab/alpaca", 10000, 1e-5),
    "llama32_1b_alpaca": ("meta-llama/Llama-3.2-1B", "tatsu-lab/alpaca", 5000, 5e-6),
}
MEDQA = dict(source="GBaker/MedQA-USMLE-4-options:test", fields=dict(choices="options", answer="answer_idx"))


def parse_arg(arg):
    name, *rest = (arg or "").split(",")
    if name not in RUNS:
        raise ValueError(f"unknown replica run {name!r}; choose one of {sorted(RUNS)}")
    out = dict(rows=RUNS[name][2])
    for item in rest:
        key, _, value = item.partition("=")
        if key != "rows" or not value.isdigit():
            raise ValueError(f"config argument {item!r}: only rows=N")
        out["rows"] = int(value)
    return name, out


def get_config(arg="qwen25_05b_medalpaca"):
    name, a = parse_arg(arg)
    model, source, _, lr = RUNS[name]
    c = config.defaults()  # everything not set here: sftmix_jax/config.py
    c.model.update(dict(source=model, dtype="bfloat16", remat="full"))
    c.export.dtype = "bfloat16"  # the HF exports: half the size of the float32 master weights
    c.data.update(dict(source=source, num_examples=a["rows"], eval_fraction=0.02, max_length=512,
                       buckets=(128, 256, 384, 512), template="alpaca"))  # base models: the Alpaca prompt (+ EOS)
    c.train.update(dict(epochs=3.0, lr=lr, min_lr_ratio=0.0, b2=0.999, eval_every=200, save_every=200))
    c.mesh.update(dict(data=1, fsdp=-1))
    c.evaluate.max_new_tokens = 128
    c.evaluate.multiple_choice.update(dict(batch_size=32, template="alpaca", lettered=True))
    if source == MEADOW:
        c.evaluate.multiple_choice.source = MEDQA["source"]
        c.evaluate.multiple_choice.fields.update(MEDQA["fields"])
    return c
