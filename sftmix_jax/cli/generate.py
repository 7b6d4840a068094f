"""Chat with a model: sampling with a KV cache (sftmix_jax.model.decode), with its chat template.

    python -m sftmix_jax.cli.generate --model DIR --prompt "Why is the sky blue?" [--temperature 0.7 --top_p 0.9]
    python -m sftmix_jax.cli.generate --model DIR            # interactive: one prompt per line

DIR: any HF-format model directory (e.g. WORKDIR/sftmix/hf) or hub id.
"""
import argparse
import sys

from sftmix_jax.model.decode import generate


def prompt_ids(tokenizer, text: str, system: str = "", chat: bool = True) -> list[int]:
    """The chat template's user turn + generation prompt, or the raw text without a template."""
    if chat and tokenizer.chat_template:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return list(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"])
    return tokenizer(text)["input_ids"]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m sftmix_jax.cli.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF-format model directory or hub id")
    p.add_argument("--prompt", action="append", help="a user message (repeatable); none: read lines from stdin")
    p.add_argument("--system", default="", help="system message for the chat template")
    p.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on accelerators)")
    args = p.parse_args(argv)

    from sftmix_jax import hf
    from sftmix_jax.ops import cpu

    cpu.prefer_accurate_matmuls()  # before JAX starts its backend: the pipeline's numerics
    model = hf.load_pretrained(args.model, dtype=args.dtype)
    tok = hf.load_tokenizer(args.model)

    def answer(texts):
        ids = [prompt_ids(tok, t, args.system, not args.raw) for t in texts]
        outs = generate(model, ids, args.max_new_tokens, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id or 0,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed, batch_size=len(ids))
        return [tok.decode(o, skip_special_tokens=True) for o in outs]

    if args.prompt:
        for text, out in zip(args.prompt, answer(args.prompt)):
            print(out if len(args.prompt) == 1 else f">>> {text}\n{out}\n")
        return
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print(">>> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        if line.strip():
            print(answer([line.strip()])[0], flush=True)


if __name__ == "__main__":
    main()
