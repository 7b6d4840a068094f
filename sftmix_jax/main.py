"""python -m sftmix_jax.main --config configs/NAME.py[:ARG] --workdir DIR [--config.a.b=v ...]

Runs the stages of config.stages in order, one file each in stages/: reference (NTP, keeping
checkpoints), confidence (their replay -> the split), baseline (weak-to-strong only: NTP on the
target model), sftmix (NTP + Mixup on the split), evaluate.
A stage whose outputs are complete (DIR/<stage>/done.json) is skipped; an interrupted one resumes.
"""
import dataclasses
import functools
import json
import logging as std_logging
import os

import jax
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from sftmix_jax import config as config_lib
from sftmix_jax import hf, multihost, sharding
from sftmix_jax.data import cache as data_cache
from sftmix_jax.data import sources
from sftmix_jax.ops import cpu
from sftmix_jax.stages import baseline, confidence, evaluate, pretrain, reference, sftmix

RUNNERS = {"reference": reference.run, "confidence": confidence.run, "baseline": baseline.run, "sftmix": sftmix.run,
           "evaluate": evaluate.run}

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
        return sharding.make_mesh(self.config.mesh)

    @functools.cached_property
    def tokenizer(self):
        return hf.load_tokenizer(self.config.tokenizer or self.config.model.source)

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    @functools.cached_property
    def data(self):
        """(train examples, held-out examples, stats)."""
        return data_cache.load_examples(self.config.data, self.tokenizer, self.config.seed)

    @functools.cached_property
    def reference(self) -> "Run":
        """The reference model's view of the run: itself, unless weak-to-strong with its own tokenizer."""
        return _ReferenceRun(self) if self.config.reference.model_source else self

    def is_done(self, stage: str) -> bool:
        """Decided by process 0 for all: every process skips the same stages."""
        return multihost.agree(epath.Path(self.stage_dir(stage), "done.json").exists())

    def mark_done(self, stage: str, summary: dict) -> None:
        """The last write of a stage: its presence means every output of the stage is complete.
        Returns when every process has finished the stage and can read all its files."""
        if multihost.is_leader():
            multihost.write_atomic(epath.Path(self.stage_dir(stage), "done.json"), json.dumps(summary, indent=2))
        multihost.barrier(f"{stage} done")


class _ReferenceRun(Run):
    """Weak-to-strong: the reference model's tokenizer and chat template, and its tokenization of
    the same rows (the same held-out split), the training examples in the target's order and ids,
    so that the confidence scores join back to the target's examples by id."""

    def __init__(self, target: Run):  # config, workdir and mesh stay the target run's
        self.target = target

    config = property(lambda self: self.target.config)
    workdir = property(lambda self: self.target.workdir)
    mesh = property(lambda self: self.target.mesh)

    @functools.cached_property
    def tokenizer(self):
        r = self.config.reference
        return hf.load_tokenizer(r.tokenizer or r.model_source)

    @functools.cached_property
    def data(self):
        train, held, stats = data_cache.load_examples(self.config.data, self.tokenizer, self.config.seed)
        return sources.select_ids(train, [e.id for e in self.target.data[0]], "the reference model's tokenizer"), held, stats


def run_stages(config, workdir: str, heartbeat_timeout: int = 30) -> None:
    if config_lib.needs_x64(config):  # before any array exists; it stays on for the rest of the process
        jax.config.update("jax_enable_x64", True)
    launch = multihost.initialize(heartbeat_timeout)
    multihost.label_logs()
    logging.info("%s", launch)
    if cpu.keep_freed_memory():
        logging.info("glibc: freed memory stays in the process (set any MALLOC_ variable to opt out)")
    stages = config_lib.parse_stages(config.stages)
    config_lib.validate(config, stages, jax.device_count(), jax.process_count())
    resolved = json.loads(config.to_json_best_effort())
    refused = None
    if multihost.is_leader():
        try:
            config_lib.check_workdir_config(workdir, resolved)
        except SystemExit as e:
            refused = str(e)
    refused = multihost.agree(refused)  # every process leaves, or none
    if refused:
        raise multihost.AgreedExit(refused)
    multihost.barrier("config.json")
    run = Run(config, workdir)
    for stage in stages:
        if stage == "baseline" and not baseline.needed(run.config):
            continue  # the reference run is the NTP baseline
        if run.is_done(stage):
            logging.info("stage %s: complete in %s, skipped", stage, run.stage_dir(stage))
            continue
        if stage != "evaluate":  # model.source='pretrain': the cached base, built if absent
            run.config = pretrain.resolve(run.config, run.tokenizer, run.mesh, run.pad_id)
        logging.info("stage %s: running", stage)
        epath.Path(run.stage_dir(stage)).mkdir(parents=True, exist_ok=True)
        run.mark_done(stage, RUNNERS[stage](run) or {})
    multihost.barrier("pipeline finished")


class _QuietLibraries(std_logging.Filter):
    """Orbax logs every file rename at INFO; keep its warnings, drop the chatter."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
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
