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
import ml_collections

from sftmix_jax.data import sources
from sftmix_jax.model import lora

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
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stages = "reference,confidence,sftmix,evaluate"
    c.tokenizer = ""
    c.model = ml_collections.ConfigDict(dict(source=model, init=ml_collections.ConfigDict(),
                                             dtype="bfloat16", param_dtype="float32", remat="full", attention="auto"))
    c.data = sources.default_config()
    c.data.source = source
    c.data.format = "alpaca"
    c.data.template = "alpaca"  # base models: the Stanford Alpaca prompt (+ EOS)
    c.data.num_examples = a["rows"]
    c.data.eval_fraction = 0.02
    c.data.max_length = 512
    c.data.buckets = (128, 256, 384, 512)
    c.train = ml_collections.ConfigDict(dict(
        epochs=3.0, steps=0, batch_size=32, grad_accum=1,
        lr=lr, min_lr_ratio=0.0, warmup_ratio=0.1, weight_decay=0.1, grad_clip=1.0,
        b1=0.9, b2=0.999, eps=1e-8, ce_chunk=0,
        log_every=10, eval_every=200, eval_batch_size=64, save_every=200, keep_latest=2,
        skip_nonfinite=False, wandb_project=''))
    c.reference = ml_collections.ConfigDict(dict(model_source="", checkpoints=3))
    c.confidence = ml_collections.ConfigDict(dict(batch_size=64, split="confidence"))
    c.sftmix = ml_collections.ConfigDict(dict(mu=0.2, alpha=0.5, per_pair=False, ntp=True, pairing="random"))
    c.lora = lora.default_config()
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, dcn_data=1))
    mc = MEDQA if source == MEADOW else dict(source="", fields={})
    c.evaluate = ml_collections.ConfigDict(dict(max_new_tokens=128, exact_match=False, batch_size=64,
        other=dict(source="", num_examples=0),  # a held-out set not trained on (forgetting): file, first N rows
        multiple_choice=dict(
        source=mc["source"], split="test", subset="", num_examples=0, batch_size=32, template="alpaca", lettered=True,
        fixed_choices="", fields=dict(id="id", question="question", context="",
                                      **{**dict(choices="choices", answer="answer"), **mc["fields"]}))))
    return c
