"""Stage 1, reference: plain NTP on the SFT set, keeping C checkpoints for the confidence replay
(config.reference.checkpoints, evenly spaced, the last at the end)."""
import jax

from sftmix_jax import checkpoints, config, losses, trainer
from sftmix_jax.data.batching import TrainBatches


def run(run) -> dict:
    c = run.config
    batches = TrainBatches(run.data[0], c.train.batch_size, c.seed, c.data.buckets,
                           jax.process_index(), jax.process_count(), pad_id=run.pad_id)
    summary = trainer.run_stage(run, "reference", config.reference_model_config(c), batches,
                                losses.ntp_loss_fn(c.train.ce_chunk or None), num_replay=c.reference.checkpoints)
    return {**summary, "replay_steps": checkpoints.replay_steps(summary["steps"], c.reference.checkpoints)}
