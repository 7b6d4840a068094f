"""Stage 1, reference: plain NTP on the SFT set, keeping C checkpoints for the confidence replay
(config.reference.checkpoints, evenly spaced, the last at the end). Weak-to-strong: another model,
trained on the same rows in its own tokenization (`Run.reference`)."""
import jax

from sftmix_jax import checkpoints, config, losses, trainer
from sftmix_jax.data.batching import TrainBatches


def run(run) -> dict:
    run = run.reference
    c = run.config
    batches = TrainBatches(run.data[0], c.train.batch_size, c.seed, c.data.buckets,
                           jax.process_index(), jax.process_count(), pad_id=run.pad_id)
    steps = trainer.total_steps(c.train, batches.steps_per_epoch)
    if steps < c.reference.checkpoints:  # else fewer distinct checkpoints would be replayed than asked for
        raise ValueError(f"config.reference.checkpoints={c.reference.checkpoints} but the reference run has only {steps} "
                         "steps: lower the checkpoints or train longer (train.epochs / train.steps)")
    summary = trainer.run_stage(run, "reference", config.reference_model_config(c), batches,
                                losses.ntp_loss_fn(c.train.ce_chunk or None), num_replay=c.reference.checkpoints)
    return {**summary, "replay_steps": checkpoints.replay_steps(summary["steps"], c.reference.checkpoints)}
