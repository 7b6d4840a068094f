"""Orbax checkpoints of a training stage: the manager, restore with a fallback past an unreadable
checkpoint, parameters-only restore for the confidence replay."""
import os
import time

import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm

from sftmix_jax import multihost

ITEMS = ("params", "opt_state", "meta")


def replay_steps(total_steps: int, num: int) -> list[int]:
    """C checkpoint steps evenly spaced over the run, the last at the end."""
    return sorted({max(1, int(round(total_steps * (c + 1) / num))) for c in range(num)})


def _abs(directory: str) -> epath.Path:
    """Orbax wants absolute paths; gs:// and other remote paths already are."""
    return epath.Path(directory if "://" in str(directory) else os.path.abspath(directory))


def manager(directory: str, keep_steps=(), keep_latest: int = 2) -> ocp.CheckpointManager:
    policy = ocm.AnyPreservationPolicy([ocm.LatestN(keep_latest), ocm.CustomSteps(list(keep_steps))])
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True)
    return ocp.CheckpointManager(_abs(directory), options=options, item_names=ITEMS)


def restore_params(directory: str, step: int, abstract_params):
    """Parameters only (no optimizer state) of one checkpoint, e.g. for confidence replay."""
    with ocp.CheckpointManager(_abs(directory), item_names=ITEMS) as mngr:
        return mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))["params"]


def restore_latest(mngr, params, opt_state, directory: str, desc: str):
    """(params, opt_state, step) from the newest readable checkpoint, else the inputs and step 0.

    An unreadable checkpoint is set aside as <step>.unreadable.<time> (out of Orbax's sight, so the
    step can be saved anew) and the one before it is tried.
    """
    # Newest first; Orbax lists finished saves only. The leader's list, so all try the same steps.
    for step in multihost.agree(sorted(mngr.all_steps(), reverse=True)):
        error = None
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(params), opt_state=ocp.args.StandardRestore(opt_state)))
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back to the one before
            error = f"{type(e).__name__}: {str(e)[:200]}"
        if not multihost.all_ok(error is None):
            logging.warning("%s: checkpoint %d is unreadable (%s); falling back to the previous one "
                            "and keeping it as %d.unreadable", desc, step, error or "on another process", step)
            if multihost.is_leader():
                bad = _abs(os.path.join(directory, str(step)))
                bad.rename(bad.parent / f"{step}.unreadable.{int(time.time())}")
            multihost.barrier("checkpoint fallback")
            mngr.reload()
            continue
        logging.info("%s: resuming from step %d", desc, step)
        return restored["params"], restored["opt_state"], step
    return params, opt_state, 0


def save(mngr, step: int, params, opt_state, meta: dict) -> None:
    mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                            opt_state=ocp.args.StandardSave(opt_state),
                                            meta=ocp.args.JsonSave(meta)), force=True)
