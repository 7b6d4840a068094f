"""The model: plain Llama-family layers (llama.py), LoRA adapters (lora.py), KV-cache decoding (decode.py).

Imports nothing from data, training, stages or main."""
