"""Stage baseline, weak-to-strong only: plain NTP on the target model with SFTMix's hyperparameters.

When the reference is the target model, the reference run is this baseline (SFTMIX.md, stage 1)
and the stage is skipped. When the reference is another (weaker) model, SFTMix is compared
against NTP on the target model, as in the paper.
"""
import jax

from sftmix_jax import losses, trainer
from sftmix_jax.data.batching import TrainBatches


def needed(c) -> bool:
    return bool(c.reference.model_source)


def run(run) -> dict:
    c = run.config
    batches = TrainBatches(run.data[0], c.train.batch_size, c.seed, c.data.buckets,
                           jax.process_index(), jax.process_count(), pad_id=run.pad_id)
    return trainer.run_stage(run, "baseline", c.model, batches, losses.ntp_loss_fn(c.train.ce_chunk or None))
