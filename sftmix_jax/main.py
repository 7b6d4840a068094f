"""python -m sftmix_jax.main --config configs/NAME.py[:ARG] --workdir DIR [--config.a.b=v ...]

Runs the stages of config.stages in order (reference, confidence, sftmix, evaluate). A stage
whose outputs are complete (DIR/<stage>/done.json) is skipped; an interrupted one resumes.
"""
import dataclasses
import functools
import json
import logging as std_logging
import os

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

STAGES = ("reference", "confidence", "sftmix", "evaluate")
DTYPES = ("float32", "bfloat16", "float16", "float64")  # config.model.dtype / param_dtype
# Keys that may change between invocations on the same workdir without changing what is trained
# (evaluate settings apply when the evaluate stage runs again: delete DIR/evaluate/done.json).
MUTABLE_KEYS = ("stages", "evaluate", "train.wandb_project")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/NAME.py[:ARG]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, scores, exports and reports.")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout", 30, "Multi-process runs: seconds without a heartbeat "
                                  "from a process before the run is stopped on every process.")
flags.mark_flags_as_required(["config", "workdir"])


@dataclasses.dataclass
class Run:
    """What every stage shares: config, workdir, and the tokenizer and data, loaded once."""

    config: object
    workdir: str

    def stage_dir(self, stage: str) -> str:
        return os.path.join(self.workdir, stage)

    @functools.cached_property
    def mesh(self):
        from sftmix_jax import sharding

        return sharding.make_mesh(self.config.mesh)

    @functools.cached_property
    def tokenizer(self):
        from sftmix_jax import hf

        return hf.load_tokenizer(self.config.tokenizer or self.config.model.source)

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    @functools.cached_property
    def data(self):
        """(train examples, held-out examples, stats)."""
        from sftmix_jax.data import sources

        return sources.load_examples(self.config.data, self.tokenizer, self.config.seed)

    def is_done(self, stage: str) -> bool:
        """Decided by process 0 for all: every process skips the same stages."""
        from sftmix_jax import multihost

        return multihost.agree(epath.Path(self.stage_dir(stage), "done.json").exists())

    def mark_done(self, stage: str, summary: dict) -> None:
        """The last write of a stage: its presence means every output of the stage is complete.
        Returns when every process has finished the stage and can read all its files."""
        from sftmix_jax import multihost

        if multihost.is_leader():
            multihost.write_atomic(epath.Path(self.stage_dir(stage), "done.json"), json.dumps(summary, indent=2))
        multihost.barrier(f"{stage} done")


def parse_stages(spec: str) -> list[str]:
    stages = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ValueError(f"config.stages={spec!r}: unknown stage(s) {unknown}; choose from {','.join(STAGES)}")
    return sorted(stages, key=STAGES.index)


def validate(config, stages, num_devices: int, process_count: int = 1) -> None:
    """Every setting checked before any compute: one message naming the key and the fix."""
    from sftmix_jax import sharding

    c = config
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
    if c.sftmix.mu < 0:
        problems.append(f"config.sftmix.mu={c.sftmix.mu} must be >= 0 (0.2 in the paper)")
    if c.sftmix.alpha <= 0:
        problems.append(f"config.sftmix.alpha={c.sftmix.alpha} must be > 0 (Beta(alpha, alpha); 0.5 in the paper)")
    if not c.sftmix.ntp and c.sftmix.mu == 0:
        problems.append("config.sftmix.ntp=False with mu=0 leaves no loss: set mu > 0")
    if c.get("lora"):
        from sftmix_jax.model import lora

        if c.lora.rank < 0:
            problems.append(f"config.lora.rank={c.lora.rank} must be >= 0 (0 = full fine-tuning)")
        elif c.lora.rank > 0:
            try:
                lora.parse_targets(c.lora.targets)
            except ValueError as e:
                problems.append(str(e))
    if c.sftmix.get("pairing", "random") not in ("random", "length"):
        problems.append(f"config.sftmix.pairing={c.sftmix.pairing!r}: use 'random' (the paper) or 'length'")
    for key in ("dtype", "param_dtype"):
        if c.model[key] not in DTYPES:
            problems.append(f"config.model.{key}={c.model[key]!r}: use one of {', '.join(DTYPES)}")
    from sftmix_jax.ops.attention import ATTENTION
    from sftmix_jax.model.llama import REMAT

    if c.model.get("remat", "none") not in REMAT:
        problems.append(f"config.model.remat={c.model.remat!r}: use one of {', '.join(REMAT)}")
    if c.model.get("attention", "auto") not in ATTENTION:
        problems.append(f"config.model.attention={c.model.attention!r}: use one of {', '.join(ATTENTION)}")
    if c.confidence.split not in ("confidence", "random"):
        problems.append(f"config.confidence.split={c.confidence.split!r}: use 'confidence' or 'random'")
    if "confidence" in stages and c.reference.checkpoints < 2:
        problems.append(f"config.reference.checkpoints={c.reference.checkpoints}: the confidence replay needs >= 2")
    fmt = c.data.format
    needed = {"alpaca": ("instruction", "output"), "messages": ("messages",), "sharegpt": ("conversations",)}
    if fmt not in needed:
        problems.append(f"config.data.format={fmt!r}: use alpaca, messages or sharegpt")
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
        if strip(old) != strip(config):
            diff = sorted(_diff(strip(old), strip(config)))
            raise SystemExit(
                f"{workdir} holds a run with a different config (differing keys: {', '.join(diff[:10])}). "
                "Use a new --workdir, or the same config to resume.")
        if old == config:
            return
    path.parent.mkdir(parents=True, exist_ok=True)  # new, or only mutable keys changed: record them
    from sftmix_jax import multihost

    multihost.write_atomic(path, json.dumps(config, indent=2, sort_keys=True))


def _diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            yield from _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    elif a != b:
        yield prefix.rstrip(".")


def needs_x64(config) -> bool:
    """float64 weights or activations need JAX's 64-bit mode (off by default: float64 -> float32)."""
    return "float64" in (config.model.dtype, config.model.param_dtype)


def run_stages(config, workdir: str, heartbeat_timeout: int = 30) -> None:
    import jax

    if needs_x64(config):  # before any array exists; it stays on for the rest of the process
        jax.config.update("jax_enable_x64", True)
    from sftmix_jax import multihost, train
    from sftmix_jax.stages import confidence, evaluate, pretrain
    from sftmix_jax.ops import cpu

    launch = multihost.initialize(heartbeat_timeout)
    multihost.label_logs()
    logging.info("%s", launch)
    if cpu.keep_freed_memory():
        logging.info("glibc: freed memory stays in the process (set any MALLOC_ variable to opt out)")
    stages = parse_stages(config.stages)
    validate(config, stages, jax.device_count(), jax.process_count())
    resolved = json.loads(config.to_json_best_effort())
    refused = None
    if multihost.is_leader():
        try:
            check_workdir_config(workdir, resolved)
        except SystemExit as e:
            refused = str(e)
    refused = multihost.agree(refused)  # every process leaves, or none
    if refused:
        raise multihost.AgreedExit(refused)
    multihost.barrier("config.json")
    run = Run(config, workdir)
    runners = {"reference": train.run_reference, "confidence": confidence.run,
               "sftmix": train.run_sftmix, "evaluate": evaluate.run}
    for stage in stages:
        if run.is_done(stage):
            logging.info("stage %s: complete in %s, skipped", stage, run.stage_dir(stage))
            continue
        if stage != "evaluate":  # model.source='pretrain': the cached base, built if absent
            run.config = pretrain.resolve(run.config, run.tokenizer, run.mesh, run.pad_id)
        logging.info("stage %s: running", stage)
        epath.Path(run.stage_dir(stage)).mkdir(parents=True, exist_ok=True)
        run.mark_done(stage, runners[stage](run) or {})
    multihost.barrier("pipeline finished")


class _QuietLibraries(std_logging.Filter):
    """Orbax logs every file rename at INFO; keep its warnings, drop the chatter."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from sftmix_jax import multihost
    from sftmix_jax.ops import cpu

    cpu.prefer_accurate_matmuls()  # before JAX starts its backend
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())

    try:
        run_stages(_CONFIG.value, _WORKDIR.value, _HEARTBEAT.value)
    except BaseException as e:
        multihost.fail_fast(e, _HEARTBEAT.value)  # several processes: exit now, so that the others stop too
        raise


if __name__ == "__main__":
    app.run(main)
