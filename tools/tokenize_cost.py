"""What loading and tokenising a training set costs one process (every process of a multi-host
run does it for the whole set): wall time, peak resident memory, and the examples' own size.

    python tools/tokenize_cost.py --data ../shared/data/gsm_8k_train.json --rows 100000 \
        --tokenizer ~/.cache/sftmix_jax/smollm2-135m-instruct [--template chat] [--max_length 1024]

The file's rows are repeated (with fresh ids) up to --rows. With --cache DIR the examples go through
the tokenization cache (data/cache.py): run it twice, the second run reads what the first wrote.
"""
import argparse
import json
import os
import resource
import sys
import tempfile
import time


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="an Alpaca-style JSON list")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--tokenizer", required=True, help="an HF tokenizer directory, or 'synthetic'")
    p.add_argument("--template", default="chat")
    p.add_argument("--max_length", type=int, default=1024)
    p.add_argument("--cache", default="", help="a tokenization cache directory ('' = none)")
    p.add_argument("--num_proc", type=int, default=1, help="tokenizing processes (data.num_proc; 0 = one per core)")
    p.add_argument("--streaming", action="store_true", help="data.streaming: chunk by chunk into --cache")
    a = p.parse_args()
    name = os.path.join(tempfile.gettempdir(), f"tokenize_cost_{a.rows}_{os.path.basename(a.data)}.jsonl")
    if not os.path.exists(name):  # the same file (and mtime) for both runs: the cache key holds it
        rows = json.load(open(a.data))
        rows = [dict(rows[i % len(rows)], id=f"r{i}") for i in range(a.rows)]
        with open(name + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(name + ".tmp", name)
        del rows

    from sftmix_jax import hf
    from sftmix_jax.data import cache, sources

    tok = hf.load_tokenizer(os.path.expanduser(a.tokenizer))
    cfg = sources.default_config()
    cfg.source, cfg.template, cfg.max_length, cfg.eval_fraction = name, a.template, a.max_length, 0.0
    cfg.cache_dir, cfg.num_proc, cfg.streaming = a.cache, a.num_proc, a.streaming
    cached = bool(a.cache) and os.path.exists(os.path.join(os.path.expanduser(a.cache), cache.key(cfg, tok, 0)))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    train, held, stats = cache.load_examples(cfg, tok, seed=0)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    own = sum(e.input_ids.nbytes + e.loss_mask.nbytes + e.prompt_ids.nbytes + len(e.answer) for e in train)
    tokens = sum(len(e.input_ids) for e in train)
    print(json.dumps({"rows": a.rows, "from_cache": cached, "examples": len(train), "tokens": tokens, "seconds": round(seconds, 1),
                      "rows_per_s": round(a.rows / seconds), "peak_rss_mib": round(peak / 1024),
                      "peak_rss_growth_mib": round((peak - before) / 1024),
                      "example_arrays_and_answers_mib": round(own / 2**20, 1), "bad": stats["bad"]}, indent=1))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
