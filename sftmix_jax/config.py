"""The experiment config: every setting checked in one place before any compute (`validate`), the
workdir's record of the config it was run with, and values derived from it.

Configs are ml_collections files (configs/NAME.py); configs/common.py holds the shared defaults.
"""
import json

import ml_collections
from etils import epath

from sftmix_jax import multihost, sharding
from sftmix_jax.data import sources
from sftmix_jax.model import lora
from sftmix_jax.model.llama import REMAT
from sftmix_jax.ops.attention import ATTENTION

STAGES = ("reference", "confidence", "baseline", "sftmix", "evaluate")  # baseline: weak-to-strong only
DTYPES = ("float32", "bfloat16", "float16", "float64")  # config.model.dtype / param_dtype
# Keys that may change between invocations on the same workdir without changing what is trained
# (evaluate settings apply when the evaluate stage runs again: delete DIR/evaluate/done.json).
MUTABLE_KEYS = ("stages", "evaluate", "train.wandb_project", "data.cache_dir", "data.num_proc")


def parse_stages(spec: str) -> list[str]:
    stages = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ValueError(f"config.stages={spec!r}: unknown stage(s) {unknown}; choose from {','.join(STAGES)}")
    return sorted(stages, key=STAGES.index)


def _batch_problems(c, stages, num_devices: int, process_count: int) -> list[str]:
    """Mesh, batch sizes and their divisibility."""
    problems = []
    try:
        d, f, _ = sharding.mesh_shape(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, num_devices)
        dp = d * f
    except ValueError as e:
        problems.append(str(e))
        dp = 1
    b, accum = c.train.batch_size, c.train.grad_accum
    if b <= 0 or accum <= 0 or b % accum:
        problems.append(f"config.train.batch_size={b} must be a positive multiple of config.train.grad_accum={accum}")
    elif (b // accum) % dp:
        problems.append(f"config.train.batch_size={b} (per micro-batch {b // accum}) must be divisible by the "
                        f"data-parallel size data*fsdp={dp}")
    if "sftmix" in stages and (b // max(accum, 1)) % (2 * process_count):
        problems.append(f"config.train.batch_size={b}: SFTMix needs an even number of rows per micro-batch "
                        f"and per host (confident/unconfident pairs); use a multiple of {2 * accum * process_count}")
    for key in ("train.eval_batch_size", "confidence.batch_size", "evaluate.batch_size"):
        node, name = key.split(".")
        if c[node][name] % dp:
            problems.append(f"config.{key}={c[node][name]} must be divisible by data*fsdp={dp}")
    return problems


def _method_problems(c, stages) -> list[str]:
    """SFTMix, LoRA, the confidence split and the replay."""
    problems = []
    if c.sftmix.mu < 0:
        problems.append(f"config.sftmix.mu={c.sftmix.mu} must be >= 0 (0.2 in the paper)")
    if c.sftmix.alpha <= 0:
        problems.append(f"config.sftmix.alpha={c.sftmix.alpha} must be > 0 (Beta(alpha, alpha); 0.5 in the paper)")
    if not c.sftmix.ntp and c.sftmix.mu != 1:  # the ablation is the Mixup loss alone, not a scaled-down one
        problems.append(f"config.sftmix.ntp=False (Mixup only) needs config.sftmix.mu=1: the loss is mu * Mixup, and "
                        f"mu={c.sftmix.mu} would only rescale it (and loosen the gradient clip by 1/mu)")
    if c.get("lora"):
        if c.lora.rank < 0:
            problems.append(f"config.lora.rank={c.lora.rank} must be >= 0 (0 = full fine-tuning)")
        elif c.lora.rank > 0:
            try:
                lora.parse_targets(c.lora.targets)
            except ValueError as e:
                problems.append(str(e))
    if c.sftmix.get("pairing", "random") not in ("random", "length"):
        problems.append(f"config.sftmix.pairing={c.sftmix.pairing!r}: use 'random' (the paper) or 'length'")
    if c.confidence.split not in ("confidence", "random"):
        problems.append(f"config.confidence.split={c.confidence.split!r}: use 'confidence' or 'random'")
    if not isinstance(c.get("scoring", {}).get("pack", True), bool):
        problems.append(f"config.scoring.pack={c.scoring.pack!r}: use True (pack examples into rows) or False")
    if "confidence" in stages and c.reference.checkpoints < 2:
        problems.append(f"config.reference.checkpoints={c.reference.checkpoints}: the confidence replay needs >= 2")
    return problems


def _model_problems(c) -> list[str]:
    """Dtypes, remat, scan_layers, attention."""
    problems = []
    for key in ("dtype", "param_dtype"):
        if c.model[key] not in DTYPES:
            problems.append(f"config.model.{key}={c.model[key]!r}: use one of {', '.join(DTYPES)}")
    if c.get("export", {}).get("dtype") not in ("", None, *DTYPES):
        problems.append(f"config.export.dtype={c.export.dtype!r}: use '' (model.param_dtype) or one of {', '.join(DTYPES)}")
    if c.model.get("remat", "none") not in REMAT:
        problems.append(f"config.model.remat={c.model.remat!r}: use one of {', '.join(REMAT)}")
    if not isinstance(c.model.get("scan_layers", False), bool):
        problems.append(f"config.model.scan_layers={c.model.scan_layers!r}: use True or False")
    if c.model.get("attention", "auto") not in ATTENTION:
        problems.append(f"config.model.attention={c.model.attention!r}: use one of {', '.join(ATTENTION)}")
    return problems


def _data_problems(c) -> list[str]:
    """Format, fields, template, overflow, the pre-trained base."""
    problems = []
    fmt = c.data.format
    needed = {"alpaca": ("instruction", "output"), "messages": ("messages",), "sharegpt": ("conversations",),
              "prompt_completion": ("prompt", "completion"), "text": ("text",)}
    if fmt not in needed:
        problems.append(f"config.data.format={fmt!r}: use alpaca, messages, sharegpt, prompt_completion or text")
    else:
        problems += [f"config.data.fields.{k} is empty: name the column that holds it" for k in needed[fmt]
                     if not c.data.fields.get(k)]
    if c.data.template not in ("chat", "alpaca"):
        problems.append(f"config.data.template={c.data.template!r}: use 'chat' or 'alpaca'")
    if c.data.overflow not in ("truncate", "drop"):
        problems.append(f"config.data.overflow={c.data.overflow!r}: use 'truncate' or 'drop'")
    if c.model.source == "pretrain" and (c.data.source != "synthetic" or c.tokenizer != "synthetic"
                                         or not c.get("pretrain")):
        problems.append("config.model.source='pretrain' (a base pre-trained on the synthetic corpus) needs "
                        "config.data.source='synthetic', config.tokenizer='synthetic' and a config.pretrain block")
    return problems


def validate(config, stages, num_devices: int, process_count: int = 1) -> None:
    """Every setting checked before any compute: one message naming the key and the fix."""
    c = config
    problems = (_batch_problems(c, stages, num_devices, process_count) + _method_problems(c, stages)
                + _model_problems(c) + _data_problems(c))
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))


def check_workdir_config(workdir: str, config: dict) -> None:
    """Write DIR/config.json, or refuse a workdir that holds a different config."""
    path = epath.Path(workdir, "config.json")

    def strip(c):
        c = json.loads(json.dumps(c))
        for key in MUTABLE_KEYS:
            *parents, leaf = key.split(".")
            node = c
            for p in parents:
                node = node.get(p, {})
            node.pop(leaf, None)
        return c

    if path.exists():
        old = json.loads(path.read_text())
        # A key added to the code since the run started, at its default, changes nothing that ran.
        default = json.loads(defaults().to_json_best_effort())
        diff = sorted(k for k in _diff(strip(old), strip(config))
                      if _get(old, k, _MISSING) is not _MISSING or _get(config, k, None) != _get(default, k, _MISSING))
        if diff:
            raise SystemExit(
                f"{workdir} holds a run with a different config (differing keys: {', '.join(diff[:10])}). "
                "Use a new --workdir, or the same config to resume.")
        if old == config:
            return
    path.parent.mkdir(parents=True, exist_ok=True)  # new, or only mutable keys changed: record them
    multihost.write_atomic(path, json.dumps(config, indent=2, sort_keys=True))


_MISSING = object()


def _get(tree: dict, dotted: str, default):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return default
        tree = tree[part]
    return tree


def _diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            yield from _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    elif a != b:
        yield prefix.rstrip(".")


def needs_x64(config) -> bool:
    """float64 weights or activations need JAX's 64-bit mode (off by default: float64 -> float32)."""
    return "float64" in (config.model.dtype, config.model.param_dtype)


def reference_model_config(c):
    """The config block of the reference model (config.model unless weak-to-strong)."""
    if not c.reference.model_source:
        return c.model
    m = c.model.copy_and_resolve_references()
    m.unlock()
    m.source = c.reference.model_source
    return m


# ----------------------------------------------------------------------------------------
# Defaults: every key a config has; configs/*.py set what differs
# ----------------------------------------------------------------------------------------
def defaults() -> ml_collections.ConfigDict:
    """The full config with the paper's SFTMix settings; an experiment file overrides the rest."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stages = ",".join(STAGES)
    c.tokenizer = ""  # '' = the model's own tokenizer and chat template; 'synthetic' = the built-in one
    c.model = ml_collections.ConfigDict(dict(
        source="",  # an HF directory or hub id; 'init' = random init from `init`; 'pretrain' (configs/tiny.py)
        init=ml_collections.ConfigDict(),  # ModelConfig fields for source='init' / 'pretrain'
        dtype="float32",  # compute dtype (bfloat16 on accelerators)
        param_dtype="float32", remat="none",  # remat: none | full | dots (activation checkpointing per block)
        scan_layers=False,  # True: the layers' parameters stacked and run under one scan (compile time flat in depth)
        attention="auto"))  # auto | blocked | xla | cudnn | splash
    c.data = sources.default_config()
    c.train = ml_collections.ConfigDict(dict(
        epochs=1.0, steps=0,  # steps > 0 overrides epochs
        batch_size=32, grad_accum=1,
        lr=2e-6, min_lr_ratio=0.1, warmup_ratio=0.1, weight_decay=0.1, grad_clip=1.0,
        b1=0.9, b2=0.95, eps=1e-8,
        ce_chunk=0,  # >0: cross-entropy over sequence chunks of this size
        log_every=10, eval_every=500, eval_batch_size=64, save_every=500, keep_latest=2,
        skip_nonfinite=False,  # True: skip (and count) batches whose loss is not finite
        wandb_project=""))  # a W&B project name logs there too (pip install wandb); '' = TensorBoard only
    c.reference = ml_collections.ConfigDict(dict(
        model_source="",  # '' = config.model; else a (smaller) HF model: weak-to-strong
        tokenizer="",  # weak-to-strong: '' = the reference model's own tokenizer; 'synthetic' = the built-in one
        checkpoints=3))  # C checkpoints replayed for confidence, evenly spaced, last at the end
    c.confidence = ml_collections.ConfigDict(dict(batch_size=64, split="confidence"))  # or 'random' (the control)
    # Forward-only scoring (replay, held-out loss, multiple choice): pack several examples per row,
    # attention kept within each; False: one example per row (the same scores to float rounding).
    c.scoring = ml_collections.ConfigDict(dict(pack=True))
    c.sftmix = ml_collections.ConfigDict(dict(mu=0.2, alpha=0.5, per_pair=False, ntp=True,
                                              pairing="random"))  # 'length': pair similar response lengths
    c.export = ml_collections.ConfigDict(dict(dtype=""))  # DIR/<stage>/hf weights: '' = model.param_dtype
    c.lora = lora.default_config()  # rank > 0: LoRA adapters only (the compute-constrained setting)
    # Device mesh: -1 takes the devices left over. FSDP shards parameters and optimizer state
    # over `fsdp`; tensor parallelism shards heads, MLP and vocabulary over `tensor`.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1))
    c.evaluate = ml_collections.ConfigDict(dict(
        max_new_tokens=256, exact_match=False, batch_size=64,
        other=dict(source="", num_examples=0),  # a held-out set not trained on (forgetting): file, first N rows
        multiple_choice=_multiple_choice()))
    return c


def _multiple_choice() -> ml_collections.ConfigDict:
    """config.evaluate.multiple_choice (stages/multiple_choice.py): accuracy by option log-likelihood."""
    return ml_collections.ConfigDict(dict(
        source="",  # '' = off | local .json/.jsonl/.parquet | hub id[:split]
        split="test",  # hub split when the source names none
        subset="",  # hub config name, e.g. 'pqa_labeled' for PubMedQA
        num_examples=0,  # 0 = all questions; else the first N
        batch_size=64,  # rows are (question, option) pairs
        template="chat",  # 'chat' (tokenizer's template) | 'alpaca' | 'plain' ("...\nAnswer: option")
        # True: list "A. option" lines in the prompt and score "A. option" (large models); False:
        # score the bare option text (cloze style; small models put most mass on the letter A).
        lettered=False,
        fixed_choices="",  # options shared by every question, comma-separated (PubMedQA: 'yes,no,maybe')
        # Field names; dots reach into nested fields ('context.contexts'). choices: one field
        # holding a list or a {"A": text, ...} dict, or several comma-separated fields, one
        # option each (MedMCQA: 'opa,opb,opc,opd'). answer: a 0-based index, a letter, a key
        # of the choices dict, or the text of an option.
        fields=dict(id="id", question="question", choices="choices", answer="answer", context=""),
    ))
