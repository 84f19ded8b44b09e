"""Fixed-length training sequences and a deterministic, resumable order over them.

The data position is one integer: the number of sequences consumed so far. From it alone the
sampler knows the epoch and the place inside that epoch's permutation, so a resumed run reads
exactly the sequences an uninterrupted run would have read.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch


class PackedSequences:
    """Non-overlapping windows of ``seq_len`` tokens over a token stream.

    Documents are already separated by EOS in the stream, so a window may span several documents
    (the usual GPT packing). The tail shorter than ``seq_len`` is dropped. The model shifts labels
    inside the window, so pass ``seq_len = context + 1`` to train on full ``context``-token inputs.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def __getitem__(self, i: int) -> torch.Tensor:
        """LongTensor [seq_len]."""
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {i} out of range ({n} sequences)")
        window = self.tokens[i * self.seq_len:(i + 1) * self.seq_len]
        return torch.from_numpy(np.asarray(window, dtype=np.int64))


class SequenceSampler:
    """A fresh permutation of ``range(n_sequences)`` per epoch, fixed by ``(seed, epoch)``.

    Position ``p`` (sequences consumed so far) maps to epoch ``p // n`` and to entry ``p % n`` of
    that epoch's permutation; every sequence is visited exactly once per epoch.
    """

    def __init__(self, n_sequences: int, seed: int = 0) -> None:
        if n_sequences <= 0:
            raise ValueError(f"need at least one sequence to sample from, got {n_sequences} "
                             "(is the split smaller than one seq_len?)")
        self.n = n_sequences
        self.seed = seed
        self._epoch = -1
        self._perm: list[int] = []

    def epoch_of(self, position: int) -> int:
        return position // self.n

    def permutation(self, epoch: int) -> list[int]:
        """The order of epoch ``epoch`` (cached: consecutive calls usually stay in one epoch)."""
        if epoch != self._epoch:
            # Hash (seed, epoch) into the generator seed so nearby pairs give unrelated orders.
            digest = hashlib.sha256(f"{self.seed}:{epoch}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)
            self._perm = torch.randperm(self.n, generator=g).tolist()
            self._epoch = epoch
        return self._perm

    def indices(self, start: int, count: int) -> list[int]:
        """Sequence indices for positions ``start .. start + count - 1``."""
        if start < 0 or count < 0:
            raise ValueError(f"start and count must be >= 0, got {start}, {count}")
        out: list[int] = []
        pos = start
        while len(out) < count:
            epoch, offset = divmod(pos, self.n)
            take = min(count - len(out), self.n - offset)
            out.extend(self.permutation(epoch)[offset:offset + take])
            pos += take
        return out


def batch(dataset: PackedSequences, sampler: SequenceSampler, position: int, batch_size: int) -> torch.Tensor:
    """LongTensor [batch_size, seq_len]: the sequences at positions ``position .. + batch_size``.

    The caller advances its position by ``batch_size`` (times the data-parallel world size when each
    rank reads ``position + rank * batch_size``).
    """
    idx: Sequence[int] = sampler.indices(position, batch_size)
    return torch.stack([dataset[i] for i in idx])
