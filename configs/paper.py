"""The SFTMix paper's experiments (arXiv 2410.05248), with its hyperparameters.

    python -m sftmix_jax.main --config configs/paper.py:EXPERIMENT --workdir gs://BUCKET/sftmix/EXPERIMENT

EXPERIMENT           model                     data                          epochs  intended slice
llama31_8b_alpaca    meta-llama/Llama-3.1-8B   tatsu-lab/alpaca (52K)        3       v4-32 / v5e-64, FSDP over all chips
mistral7b_alpaca     mistralai/Mistral-7B-v0.1 tatsu-lab/alpaca (52K)        3       v4-32 / v5e-64
qwen25_14b_alpaca    Qwen/Qwen2.5-14B          tatsu-lab/alpaca (52K)        3       v4-32 (tight on v5e-64: 16 GiB chips)
llama31_8b_ultrachat meta-llama/Llama-3.1-8B   HuggingFaceH4/ultrachat_200k  1       v4-32 / v5e-64
llama31_8b_medalpaca meta-llama/Llama-3.1-8B   Medical Meadow (see below)    3       v4-32 / v5e-64
llama31_8b_alpaca_w2s  as llama31_8b_alpaca, with Llama-3.2-1B as the weak reference (the paper's
                     Gemma-2B is not a supported architecture; any smaller Llama/Mistral/Qwen2 works)

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
import ml_collections

from sftmix_jax.data import sources
from sftmix_jax.model import lora

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
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stages = "reference,confidence,sftmix,evaluate"
    c.tokenizer = ""  # the model's tokenizer
    c.model = ml_collections.ConfigDict(dict(source=model, init=ml_collections.ConfigDict(),
                                             dtype="bfloat16", param_dtype="float32", remat="full", attention="auto"))

    c.data = sources.default_config()
    c.data.source = source
    c.data.format = fmt
    c.data.template = "alpaca"  # base models: the Stanford Alpaca prompt (+ EOS)
    c.data.max_length = 1024
    c.data.overflow = "truncate"
    c.data.eval_fraction = 0.02
    c.data.buckets = (256, 512, 768, 1024)

    c.train = ml_collections.ConfigDict(dict(
        epochs=epochs, steps=0, batch_size=32, grad_accum=1,
        lr=2e-6, min_lr_ratio=0.0, warmup_ratio=0.1, weight_decay=0.1, grad_clip=1.0,
        b1=0.9, b2=0.999, eps=1e-8, ce_chunk=256,
        log_every=10, eval_every=500, eval_batch_size=64, save_every=500, keep_latest=2,
        skip_nonfinite=False,  # True: skip (and count) batches whose loss is not finite
        wandb_project=''))  # a W&B project name logs there too (pip install wandb); '' = TensorBoard only
    c.reference = ml_collections.ConfigDict(dict(
        model_source="meta-llama/Llama-3.2-1B" if arg.endswith("_w2s") else "", checkpoints=3))
    c.confidence = ml_collections.ConfigDict(dict(batch_size=128, split="confidence"))
    c.sftmix = ml_collections.ConfigDict(dict(mu=0.2, alpha=0.5, per_pair=False, ntp=True,
                                              pairing="random"))  # 'length': pair similar response lengths
    c.lora = lora.default_config()  # rank > 0: LoRA adapters only (the compute-constrained setting)
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, dcn_data=1))
    # multiple_choice (sftmix_jax/multiple_choice.py): the healthcare run scores MedQA (4 options) by option
    # log-likelihood in the Alpaca prompt it was tuned on; source '' = off. MedMCQA: source
    # openlifescienceai/medmcqa:validation, fields.choices='opa,opb,opc,opd', fields.answer=cop. PubMedQA:
    # qiaojin/PubMedQA:train, subset=pqa_labeled, fixed_choices='yes,no,maybe', fields.answer=final_decision,
    # fields.context=context.contexts, lettered=False.
    c.evaluate = ml_collections.ConfigDict(dict(max_new_tokens=256, exact_match=False, batch_size=64,
        other=dict(source="", num_examples=0),  # a held-out set not trained on (forgetting): file, first N rows
        multiple_choice=dict(
        source="GBaker/MedQA-USMLE-4-options:test" if arg == "llama31_8b_medalpaca" else "", split="test", subset="",
        num_examples=0, batch_size=64, template="alpaca", lettered=True, fixed_choices="",
        fields=dict(id="id", question="question", choices="options", answer="answer_idx", context=""))))
    return c
