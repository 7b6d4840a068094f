"""The SFTMix paper's experiments (arXiv 2410.05248), with its hyperparameters.

    python -m sftmix_jax.main --config configs/paper.py:EXPERIMENT --workdir gs://BUCKET/sftmix/EXPERIMENT

EXPERIMENT           model                     data                          epochs  intended slice
llama31_8b_alpaca    meta-llama/Llama-3.1-8B   tatsu-lab/alpaca (52K)        3       v4-32 / v5e-64, FSDP over all chips
mistral7b_alpaca     mistralai/Mistral-7B-v0.1 tatsu-lab/alpaca (52K)        3       v4-32 / v5e-64
qwen25_14b_alpaca    Qwen/Qwen2.5-14B          tatsu-lab/alpaca (52K)        3       v4-32 (tight on v5e-64: 16 GiB chips)
llama31_8b_ultrachat meta-llama/Llama-3.1-8B   HuggingFaceH4/ultrachat_200k  1       v4-32 / v5e-64
llama31_8b_medalpaca meta-llama/Llama-3.1-8B   Medical Meadow (see below)    3       v4-32 / v5e-64
llama31_8b_alpaca_w2s  as llama31_8b_alpaca, with Gemma-2B as the weak reference, as in the paper: it
                     trains and replays the rows in its own tokenizer; the NTP baseline is a `baseline`
                     stage on Llama-3.1-8B

Paper setup: AdamW, lr 2e-6, weight decay 0.1, cosine schedule, warmup ratio 0.1, batch 32,
mu 0.2, alpha 0.5. Compute in bfloat16 with float32 master weights and optimizer state.

Memory plan per chip (FSDP over N chips; P parameters; float32 master weights, AdamW m and v,
float32 gradients = 16 bytes/parameter, all sharded; activations with remat per block, bf16):
  Llama-3.1-8B  P = 8.03e9: 128 GB of state -> 8.0 GB/chip on 16 chips (v4-32, 32 GiB HBM),
                2.0 GB/chip on 64 (v5e-64, 16 GiB). Activations at batch 32 x 1024 tokens:
                block inputs 2 rows/chip x 1024 x 4096 x 2 B x 32 layers = 0.5 GB on 16 chips,
                one block's recompute ~0.2 GB, float32 logits of 2 x 1024 x 128256 = 1.0 GB
                (less with train.ce_chunk). ~10 GB/chip on v4-32, ~3 GB/chip on v5e-64.
  Mistral-7B    P = 7.24e9: 116 GB -> 7.2 GB/chip on 16, 1.8 on 64; logits 2 x 1024 x 32000 x 4 B
                = 0.26 GB. ~8.5 GB/chip on v4-32.
  Qwen2.5-14B   P = 14.7e9: 235 GB -> 14.7 GB/chip on 16, 3.7 on 64; logits 2 x 1024 x 152064 x 4
                = 1.2 GB; activations 48 layers x 2 x 1024 x 5120 x 2 B = 1.0 GB. ~17.5 GB/chip on
                v4-32; on v5e-64 ~5 GB/chip.
The confidence replay restores parameters only (bf16 compute over float32 weights: 4 B/param).

Medical Meadow: the paper trains on MedAlpaca's 263K mixture of the Medical Meadow sets. Build
it as one JSON/JSONL (fields instruction/input/output) and pass
--config.data.source=PATH; the default below is one real subset (medical_meadow_medical_flashcards).
Gated models (Llama) need HF_TOKEN on every host.
"""
from sftmix_jax import config

EXPERIMENTS = {
    "llama31_8b_alpaca": ("meta-llama/Llama-3.1-8B", "tatsu-lab/alpaca", "alpaca", 3.0),
    "mistral7b_alpaca": ("mistralai/Mistral-7B-v0.1", "tatsu-lab/alpaca", "alpaca", 3.0),
    "qwen25_14b_alpaca": ("Qwen/Qwen2.5-14B", "tatsu-lab/alpaca", "alpaca", 3.0),
    "llama31_8b_ultrachat": ("meta-llama/Llama-3.1-8B", "HuggingFaceH4/ultrachat_200k:train_sft", "messages", 1.0),
    "llama31_8b_medalpaca": ("meta-llama/Llama-3.1-8B", "medalpaca/medical_meadow_medical_flashcards", "alpaca", 3.0),
    "llama31_8b_alpaca_w2s": ("meta-llama/Llama-3.1-8B", "tatsu-lab/alpaca", "alpaca", 3.0),
}


def get_config(arg="llama31_8b_alpaca"):
    if arg not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {arg!r}; choose one of {sorted(EXPERIMENTS)}")
    model, source, fmt, epochs = EXPERIMENTS[arg]
    c = config.defaults()  # everything not set here: sftmix_jax/config.py (the paper's SFTMix settings)
    c.model.update(dict(source=model, dtype="bfloat16", remat="full"))
    c.export.dtype = "bfloat16"  # the HF exports: half the size of the float32 master weights
    c.data.update(dict(source=source, format=fmt, max_length=1024, eval_fraction=0.02, buckets=(256, 512, 768, 1024),
                       template="alpaca"))  # base models: the Stanford Alpaca prompt (+ EOS)
    c.train.update(dict(epochs=epochs, min_lr_ratio=0.0, b2=0.999, ce_chunk=256))
    if arg.endswith("_w2s"):
        c.reference.model_source = "google/gemma-2b"  # its own tokenizer (256K vocabulary); gated like Llama
    c.confidence.batch_size = 128
    c.mesh.update(dict(data=1, fsdp=-1))
    # multiple_choice: the healthcare run scores MedQA (4 options) by option log-likelihood in the
    # Alpaca prompt it was tuned on. MedMCQA: source openlifescienceai/medmcqa:validation,
    # fields.choices='opa,opb,opc,opd', fields.answer=cop. PubMedQA: qiaojin/PubMedQA:train,
    # subset=pqa_labeled, fixed_choices='yes,no,maybe', fields.answer=final_decision,
    # fields.context=context.contexts, lettered=False.
    mc = c.evaluate.multiple_choice
    mc.update(dict(template="alpaca", lettered=True))
    mc.fields.update(dict(choices="options", answer="answer_idx"))
    if arg == "llama31_8b_medalpaca":
        mc.source = "GBaker/MedQA-USMLE-4-options:test"
    return c
