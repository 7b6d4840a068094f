"""Batches: the shuffled NTP sampler, the confident/unconfident paired sampler, eval batches.

Batches are pure functions of (seed, step), so a resumed run sees the same batches, and
lengths are padded to a few buckets so that jit compiles a few shapes only.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from sftmix_jax.data.sources import Example


def pad_length(n: int, buckets: Sequence[int], fallback: int) -> int:
    """The smallest bucket >= n; `fallback` when n exceeds them all."""
    return min((b for b in buckets if b >= n), default=max(fallback, n))


def collate(examples: Sequence[Example], rows: np.ndarray, length: int, pad_id: int = 0) -> dict:
    """Rows (indices into examples, -1 = padding row) -> a batch of [B, length] arrays."""
    B = len(rows)
    input_ids_BL = np.full((B, length), pad_id, np.int32)
    attention_mask_BL = np.zeros((B, length), np.int32)
    loss_mask_BL = np.zeros((B, length), np.float32)
    for b, i in enumerate(rows):
        if i < 0:
            continue
        e = examples[i]
        n = len(e.input_ids)
        input_ids_BL[b, :n] = e.input_ids
        attention_mask_BL[b, :n] = 1
        loss_mask_BL[b, :n] = e.loss_mask
    # Position t predicts token t+1; the last position predicts nothing.
    targets_BL = np.full_like(input_ids_BL, pad_id)
    targets_BL[:, :-1] = input_ids_BL[:, 1:]
    weights_BL = np.zeros_like(loss_mask_BL)
    weights_BL[:, :-1] = loss_mask_BL[:, 1:]
    return {"input_ids": input_ids_BL, "attention_mask": attention_mask_BL,
            "targets": targets_BL, "weights": weights_BL,
            "index": np.asarray(rows, np.int32)}


class _Batches:
    """Shared by the samplers: lengths, buckets, the per-process slicing and the epoch cache.

    A sampler defines steps_per_epoch and _epoch_rows(epoch) -> global rows [S, B]; batch(step)
    is row step % S of epoch step // S, computed once per epoch rather than once per step.
    """

    def __init__(self, examples, batch_size, seed, buckets, process_index, process_count, pad_id):
        if batch_size <= 0 or batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} must be a positive multiple of "
                             f"process_count={process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.buckets = tuple(sorted(buckets))
        self.process_index, self.process_count, self.pad_id = process_index, process_count, pad_id
        self.lengths = np.array([len(e.input_ids) for e in examples], np.int64)
        # One shape beyond the buckets: the longest example rounded up to a multiple of 64.
        self.fallback = -(-int(self.lengths.max(initial=1)) // 64) * 64
        self._cached = None  # (epoch, rows_IB)

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """Global rows [steps_per_epoch, batch_size] of one epoch."""
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self._epoch_rows(epoch))
        return self._cached[1]

    def batch(self, step: int) -> dict:
        epoch, i = divmod(step, self.steps_per_epoch)
        return self._emit(self.epoch_rows(epoch)[i])

    def _emit(self, rows_B: np.ndarray) -> dict:
        """Global rows -> this process's contiguous slice; the length comes from the whole
        global batch so that every process pads alike."""
        length = pad_length(int(self.lengths[rows_B].max()), self.buckets, self.fallback)
        local = np.array_split(rows_B, self.process_count)[self.process_index]
        return collate(self.examples, local, length, self.pad_id)


class TrainBatches(_Batches):
    """Epochs of seeded permutations; batch(step) is a pure function of (seed, step)."""

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int,
                 buckets: Sequence[int], process_index: int = 0, process_count: int = 1,
                 *, pad_id: int = 0):
        super().__init__(examples, batch_size, seed, buckets, process_index, process_count, pad_id)
        if len(examples) < batch_size:
            raise ValueError(f"the training set has {len(examples)} usable examples, fewer than one batch "
                             f"(config.train.batch_size={batch_size}): use more data or a smaller batch")

    @property
    def steps_per_epoch(self) -> int:
        return len(self.examples) // self.batch_size  # drop_last

    def _epoch_rows(self, epoch: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        S, B = self.steps_per_epoch, self.batch_size
        return order[: S * B].reshape(S, B)


class PairedBatches(_Batches):
    """SFTMix batches of B/2 pairs: row 2k confident, row 2k+1 unconfident.

    Each half is permuted per (seed, epoch) independently and the k-th draws are paired
    ('random', the paper's pairing). 'length': within each window of `pair_window` draws both
    halves are sorted by response length and paired in order, then the pairs are shuffled, so
    that Mixup (aligned over min(N_c, N_u) response tokens) truncates less; each half is still
    drawn once per epoch. Adjacent pairs survive any contiguous split: hosts, devices and
    micro-batches get whole pairs.
    """

    def __init__(self, examples: Sequence[Example], confident: Sequence[int],
                 unconfident: Sequence[int], batch_size: int, seed: int,
                 buckets: Sequence[int], process_index: int = 0, process_count: int = 1,
                 *, pad_id: int = 0, pairing: str = "random", pair_window: int = 256):
        if batch_size % (2 * process_count):
            raise ValueError(f"batch_size={batch_size} must be even (confident/unconfident pairs), "
                             f"with an even number of rows on each of {process_count} processes")
        if pairing not in ("random", "length"):
            raise ValueError(f"pairing={pairing!r}: use 'random' or 'length'")
        super().__init__(examples, batch_size, seed, buckets, process_index, process_count, pad_id)
        self.halves = [np.asarray(confident, np.int64), np.asarray(unconfident, np.int64)]
        for h in self.halves:
            if h.size and (h.min() < 0 or h.max() >= len(examples)):
                raise ValueError("confident/unconfident indices out of range of examples")
        if self.steps_per_epoch == 0:
            raise ValueError(f"halves of {[len(h) for h in self.halves]} rows are smaller "
                             f"than batch_size/2={batch_size // 2}")
        self.pairing, self.pair_window = pairing, pair_window
        if pairing == "length":
            self.response_lengths = np.array([int(e.loss_mask.sum()) for e in examples], np.int64)

    @property
    def steps_per_epoch(self) -> int:
        return min(len(h) for h in self.halves) // (self.batch_size // 2)

    def _epoch_rows(self, epoch: int) -> np.ndarray:
        I, B = self.steps_per_epoch, self.batch_size
        n = I * B // 2  # pairs this epoch
        c_M, u_M = (h[np.random.default_rng([self.seed, epoch, which]).permutation(len(h))[:n]]
                    for which, h in enumerate(self.halves))
        if self.pairing == "length":
            window_M = np.arange(n) // self.pair_window
            c_M, u_M = (x[np.lexsort((self.response_lengths[x], window_M))] for x in (c_M, u_M))
            shuffle_M = np.random.default_rng([self.seed, epoch, 2]).permutation(n)
            c_M, u_M = c_M[shuffle_M], u_M[shuffle_M]
        return np.stack([c_M, u_M], 1).reshape(I, B)  # c0 u0 c1 u1 ...


def padding_report(batches: _Batches, max_length: int) -> dict:
    """Pad tokens / all tokens over one epoch of global batches: every row padded to
    max_length vs our length buckets (each process pads its slice to the global length)."""
    rows_IB = batches.epoch_rows(0)
    lengths_IB = batches.lengths[rows_IB]
    tokens = int(lengths_IB.sum())
    padded_I = [pad_length(int(n), batches.buckets, batches.fallback) for n in lengths_IB.max(1)]
    return {"tokens": tokens,
            "pad_fraction_max_length": round(1 - tokens / (rows_IB.size * max_length), 4),
            "pad_fraction_buckets": round(1 - tokens / (sum(padded_I) * rows_IB.shape[1]), 4)}


def eval_batches(examples: Sequence[Example], batch_size: int, buckets: Sequence[int],
                 *, pad_id: int = 0) -> Iterator[dict]:
    """Every example once, shortest first (less padding); the last batch padded with -1 rows."""
    if not examples:
        return
    batches = _Batches(examples, batch_size, 0, buckets, 0, 1, pad_id)
    order = np.argsort(batches.lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start: start + batch_size]
        rows = np.concatenate([rows, np.full(batch_size - len(rows), -1, np.int64)])
        length = pad_length(int(batches.lengths[rows[rows >= 0]].max()), batches.buckets,
                            batches.fallback)
        yield collate(examples, rows, length, pad_id)


# ----------------------------------------------------------------------------------------
# Packed eval batches: several examples per row (forward-only scoring)
# ----------------------------------------------------------------------------------------
def pack_rows(lengths: np.ndarray, length: int, max_segments: int = 64) -> list[list[int]]:
    """Best-fit decreasing: example indices (each of length <= `length`) -> rows of at most `length`
    tokens and `max_segments` examples; longest first, each into the row it fills the most."""
    rows, free_rows = [], [[] for _ in range(length + 1)]  # free_rows[r]: open rows with r tokens free
    open_count = np.zeros(length + 1, np.int64)  # len(free_rows[r]), searched in NumPy
    for i in np.argsort(-np.asarray(lengths), kind="stable"):
        n = int(lengths[i])
        fits = np.flatnonzero(open_count[n:])
        if fits.size:
            free = n + int(fits[0])
            row = free_rows[free].pop()
            open_count[free] -= 1
        else:
            free, row = length, len(rows)
            rows.append([])
        rows[row].append(int(i))
        if len(rows[row]) < max_segments:
            free_rows[free - n].append(row)
            open_count[free - n] += 1
    return rows


def collate_packed(examples: Sequence[Example], rows: Sequence[Sequence[int]], length: int, segments: int,
                   pad_id: int = 0) -> dict:
    """Rows of example indices -> [B, length] arrays with segment_ids (0 = padding, z + 1 = the row's
    z-th example), positions restarting at 0 per example, and index [B, segments] (-1: none).

    An example's last token predicts nothing (weight 0), as in `collate`: never the next example."""
    B = len(rows)
    input_ids_BL = np.full((B, length), pad_id, np.int32)
    targets_BL = np.full((B, length), pad_id, np.int32)
    weights_BL = np.zeros((B, length), np.float32)
    segment_ids_BL, positions_BL = np.zeros((B, length), np.int32), np.zeros((B, length), np.int32)
    index_BZ = np.full((B, segments), -1, np.int32)
    for b, row in enumerate(rows):
        start = 0
        for z, i in enumerate(row):
            e = examples[i]
            end = start + len(e.input_ids)
            input_ids_BL[b, start:end] = e.input_ids
            targets_BL[b, start:end - 1] = e.input_ids[1:]
            weights_BL[b, start:end - 1] = e.loss_mask[1:]
            segment_ids_BL[b, start:end], positions_BL[b, start:end] = z + 1, np.arange(end - start)
            index_BZ[b, z], start = i, end
    return {"input_ids": input_ids_BL, "targets": targets_BL, "weights": weights_BL,
            "segment_ids": segment_ids_BL, "positions": positions_BL, "index": index_BZ}


class PackedBatches:
    """Every example once, packed (`pack_rows`) into batches of `batch_size` rows, the last padded with
    empty rows. Rows are as long as the largest bucket; examples longer than it are packed apart,
    into rows of `eval_batches`' fallback length (the longest example rounded up to 64). `segments`
    (examples per row, a power of two) is fixed for the whole set: one compiled shape per row length."""

    def __init__(self, examples: Sequence[Example], batch_size: int, buckets: Sequence[int], *,
                 pad_id: int = 0, max_segments: int = 64):
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        lengths = np.array([len(e.input_ids) for e in examples], np.int64)
        fallback = -(-int(lengths.max(initial=1)) // 64) * 64  # as _Batches
        fits = lengths <= max(buckets)
        self.plan = []  # (row length, rows of example indices)
        for group, length in ((fits, max(buckets)), (~fits, fallback)):
            where = np.flatnonzero(group)
            if where.size:
                self.plan.append((length, [[int(where[i]) for i in r] for r in pack_rows(lengths[where], length,
                                                                                          max_segments)]))
        most = max((len(r) for _, rows in self.plan for r in rows), default=1)
        self.segments = 1 << (most - 1).bit_length()

    def __len__(self) -> int:
        return sum(-(-len(rows) // self.batch_size) for _, rows in self.plan)

    def __iter__(self) -> Iterator[dict]:
        for length, rows in self.plan:
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start: start + self.batch_size]
                chunk = chunk + [[]] * (self.batch_size - len(chunk))
                yield collate_packed(self.examples, chunk, length, self.segments, self.pad_id)
