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
# Keys that may change between invocations on the same workdir without changing results.
MUTABLE_KEYS = ("stages",)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/NAME.py[:ARG]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, scores, exports and reports.")
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
        from sftmix_jax import data

        return data.load_examples(self.config.data, self.tokenizer, self.config.seed)

    def is_done(self, stage: str) -> bool:
        return epath.Path(self.stage_dir(stage), "done.json").exists()

    def mark_done(self, stage: str, summary: dict) -> None:
        """The last write of a stage: its presence means every output of the stage is complete."""
        write_atomic(epath.Path(self.stage_dir(stage), "done.json"), json.dumps(summary, indent=2))


def parse_stages(spec: str) -> list[str]:
    stages = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ValueError(f"config.stages={spec!r}: unknown stage(s) {unknown}; choose from {','.join(STAGES)}")
    return sorted(stages, key=STAGES.index)


def check_workdir_config(workdir: str, config: dict) -> None:
    """Write DIR/config.json, or refuse a workdir that holds a different config."""
    path = epath.Path(workdir, "config.json")
    strip = lambda c: {k: v for k, v in c.items() if k not in MUTABLE_KEYS}  # noqa: E731
    if path.exists():
        old = json.loads(path.read_text())
        if strip(old) != strip(config):
            diff = sorted(_diff(strip(old), strip(config)))
            raise SystemExit(
                f"{workdir} holds a run with a different config (differing keys: {', '.join(diff[:10])}). "
                "Use a new --workdir, or the same config to resume.")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(config, indent=2, sort_keys=True))


def write_atomic(path, text: str) -> None:
    """Write to a temporary name, then rename: readers never see half a file."""
    tmp = epath.Path(str(path) + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            yield from _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    elif a != b:
        yield prefix.rstrip(".")


def run_stages(config, workdir: str) -> None:
    import jax

    from sftmix_jax import confidence, evaluate, train

    from sftmix_jax import sharding

    sharding.init_distributed()
    stages = parse_stages(config.stages)
    resolved = json.loads(config.to_json_best_effort())
    if jax.process_index() == 0:
        check_workdir_config(workdir, resolved)
    run = Run(config, workdir)
    runners = {"reference": train.run_reference, "confidence": confidence.run,
               "sftmix": train.run_sftmix, "evaluate": evaluate.run}
    for stage in stages:
        if run.is_done(stage):
            logging.info("stage %s: complete in %s, skipped", stage, run.stage_dir(stage))
            continue
        logging.info("stage %s: running", stage)
        epath.Path(run.stage_dir(stage)).mkdir(parents=True, exist_ok=True)
        run.mark_done(stage, runners[stage](run) or {})


class _QuietLibraries(std_logging.Filter):
    """Orbax logs every file rename at INFO; keep its warnings, drop the chatter."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    run_stages(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
