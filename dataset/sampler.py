"""`LengthGroupedSampler`: batches of similar length, shuffled with a seed, split across ranks.

`LengthGroupedSampler(lengths, batch_size, world_size=1, rank=0, seed=0, megabatch_mult=8, drop_last=False)`
yields dataset indices for ONE rank; use it with `DataLoader(batch_size=batch_size, sampler=...)`.
Each epoch (`set_epoch(e)`; the order depends only on seed + epoch):
1. shuffle all indices; cut them into megabatches of `batch_size * world_size * megabatch_mult`;
2. sort each megabatch by length (longest first) and cut it into global batches of
   `batch_size * world_size`, so one global step sees similar lengths on every rank (little padding);
3. shuffle the order of the global batches, but put the one holding the longest sample first
   (an out-of-memory shows at step 1, not hours in);
4. rank r takes items [r * batch_size, (r + 1) * batch_size) of each global batch.
The index list is padded by repeating from its start to fill the last global batch (every rank gets the
same number of steps), or cut with `drop_last=True`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

from ..core.errors import UserError


class LengthGroupedSampler(torch.utils.data.Sampler):
    def __init__(self, lengths: Sequence[int], batch_size: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, megabatch_mult: int = 8, drop_last: bool = False):
        if not lengths:
            raise ValueError("LengthGroupedSampler: no lengths")
        if not (0 <= rank < world_size) or batch_size < 1 or megabatch_mult < 1:
            raise ValueError(f"LengthGroupedSampler: bad rank/world_size/batch_size/megabatch_mult "
                             f"{rank}/{world_size}/{batch_size}/{megabatch_mult}")
        self.lengths, self.batch_size = list(lengths), batch_size
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.megabatch_mult, self.drop_last, self.epoch = megabatch_mult, drop_last, 0
        g = batch_size * world_size
        n = len(self.lengths)
        self.n_global = n // g if drop_last else -(-n // g)
        if self.n_global == 0:
            raise UserError(f"the data has {n} usable samples, fewer than one global batch of {g}: lower "
                            f"per_device_train_batch_size / global_batch_size or add data")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        """The epoch's global batches (each `batch_size * world_size` indices, similar lengths)."""
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        g = self.batch_size * self.world_size
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        total = self.n_global * g
        while len(order) < total:  # pad by repeating (short datasets may need several rounds)
            order += order[: total - len(order)]
        order = order[:total]
        mega = g * self.megabatch_mult
        batches = []
        for start in range(0, total, mega):
            chunk = sorted(order[start:start + mega], key=lambda i: -self.lengths[i])
            batches += [chunk[j:j + g] for j in range(0, len(chunk), g)]
        rng.shuffle(batches)
        longest = max(range(len(batches)), key=lambda b: max(self.lengths[i] for i in batches[b]))
        batches.insert(0, batches.pop(longest))
        return batches

    def __iter__(self) -> Iterator[int]:
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for batch in self.global_batches():
            yield from batch[lo:hi]

    def __len__(self) -> int:
        return self.n_global * self.batch_size
