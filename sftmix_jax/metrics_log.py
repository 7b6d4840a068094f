"""A training stage's metrics: DIR/<stage>/metrics.jsonl, TensorBoard (DIR/<stage>/tb) and, when a
project is named, Weights & Biases.

Object stores (gs://, s3://) cannot append to an object: there every row would rewrite it. So on a
remote workdir the rows and the TensorBoard events go to a local mirror and are copied over whole
at `sync` (the loop calls it at each checkpoint and at the end); a crash loses only rows after the
last checkpoint, which the resumed run writes again. On a local workdir the mirror is the workdir.
"""
import hashlib
import json
import os
import tempfile

from etils import epath


def is_remote(path) -> bool:
    return "://" in str(path)


class MetricsLog:
    """Rows by step; on resume, rows past the restored step are dropped."""

    def __init__(self, stage_dir: str, start_step: int, enabled: bool = True, wandb_project: str = "",
                 run_config: dict | None = None, remote: bool | None = None):
        self.enabled, self.wandb = enabled, None
        self.remote = is_remote(stage_dir) if remote is None else remote
        self.stage_dir = stage_dir
        key = hashlib.sha1(str(stage_dir).encode()).hexdigest()[:16]
        self.local = os.path.join(tempfile.gettempdir(), "sftmix_jax_logs", key) if self.remote else stage_dir
        self.path = os.path.join(self.local, "metrics.jsonl")
        if not enabled:
            return
        os.makedirs(self.local, exist_ok=True)
        target = epath.Path(stage_dir, "metrics.jsonl")
        if target.exists():
            rows = [json.loads(line) for line in target.read_text().splitlines() if line.strip()]
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows if r["step"] <= start_step)
        elif self.remote and os.path.exists(self.path):
            os.remove(self.path)  # a mirror left by an earlier run that never synced
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(os.path.join(self.local, "tb"), purge_step=start_step + 1)
        if wandb_project:
            self.wandb = _wandb_run(wandb_project, stage_dir, self.local, run_config)

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        metrics = {k: float(v) for k, v in metrics.items()}
        with open(self.path, "a") as f:  # always a local file
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def sync(self):
        """Remote workdir: copy the rows and the TensorBoard events over, whole (no appends)."""
        if not (self.enabled and self.remote):
            return
        self.tb.flush()
        out = epath.Path(self.stage_dir)
        if os.path.exists(self.path):
            with open(self.path) as f:
                (out / "metrics.jsonl").write_text(f.read())
        tb = os.path.join(self.local, "tb")
        for name in sorted(os.listdir(tb)) if os.path.isdir(tb) else ():  # event files: small, rewritten whole
            (out / "tb").mkdir(parents=True, exist_ok=True)
            with open(os.path.join(tb, name), "rb") as f:
                (out / "tb" / name).write_bytes(f.read())

    def close(self):
        if self.enabled:
            self.tb.close()
            self.sync()
            if self.wandb is not None:
                self.wandb.finish()


def _wandb_run(project: str, stage_dir: str, local_dir: str, run_config):
    """One W&B run per stage directory, resumed under the same id after a restart; its files local."""
    try:
        import wandb
    except ImportError as e:
        raise ImportError(f"config.train.wandb_project={project!r} needs `pip install wandb` "
                          "(or set it to '' for TensorBoard only)") from e
    stage_dir = str(stage_dir).rstrip("/")
    name = os.path.basename(os.path.dirname(stage_dir)) + "/" + os.path.basename(stage_dir)
    ident = stage_dir if is_remote(stage_dir) else os.path.abspath(stage_dir)
    run_id = hashlib.sha1(ident.encode()).hexdigest()[:16]
    return wandb.init(project=project, name=name, id=run_id, resume="allow", config=run_config or {}, dir=local_dir)
