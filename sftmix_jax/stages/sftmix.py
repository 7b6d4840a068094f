"""Stage 3, sftmix: NTP + mu * Mixup on confident/unconfident pairs (SFTMIX.md), from the same
initial model as the reference, on the split the confidence stage wrote."""
import jax

from sftmix_jax import losses, trainer
from sftmix_jax.data import split
from sftmix_jax.data.batching import PairedBatches


def run(run) -> dict:
    c = run.config
    train_ex = run.data[0]
    confident, unconfident = split.load_split(run.stage_dir("confidence"), train_ex, c.confidence.split, c.seed)
    batches = PairedBatches(train_ex, confident, unconfident, c.train.batch_size, c.seed, c.data.buckets,
                            jax.process_index(), jax.process_count(), pad_id=run.pad_id, pairing=c.sftmix.pairing)
    s = c.sftmix
    loss_fn = losses.sftmix_loss_fn(s.mu, s.alpha, s.per_pair, s.ntp, c.train.ce_chunk or None)
    return trainer.run_stage(run, "sftmix", c.model, batches, loss_fn)
