"""Batches of scaled activations for the training workers, deterministic given the seed (so resume and the
1-vs-N-worker equivalence hold)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..harvest.shards import ActivationStore


def norm_scales(x_mean_norm, y_mean_norm, d_model: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer factors that bring the mean activation norm to sqrt(d_model) (docs/design.md)."""
    sx = d_model**0.5 / torch.tensor(x_mean_norm, dtype=torch.float32).clamp_min(1e-12)
    sy = d_model**0.5 / torch.tensor(y_mean_norm, dtype=torch.float32).clamp_min(1e-12)
    return sx, sy


class StoreFeed:
    """Shuffled token batches from a persisted harvest: epochs over shards in a seeded order, tokens shuffled in a
    buffer of `buffer_tokens`. Data-parallel replica r of R takes global batches r, r + R, ..."""

    def __init__(self, url: str, batch_tokens: int, seed: int, buffer_tokens: int, dp: int = 1, dp_idx: int = 0):
        self.store = ActivationStore(url)
        self.b, self.seed, self.buf, self.dp, self.dp_idx = batch_tokens, seed, max(buffer_tokens, batch_tokens), dp, dp_idx
        if self.store.n_tokens < batch_tokens:
            from ..errors import CTRayError

            raise CTRayError(f"the harvest has {self.store.n_tokens} tokens, fewer than one batch ({batch_tokens})")

    def _global(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = 0
        while True:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.store.shards))
            xs, ys, n = [], [], 0
            for k, i in enumerate(order):
                s = self.store.read(int(i), compact=True)
                xs.append(s["x"])
                ys.append(s["y"])
                n += len(s["x"])
                last = k == len(order) - 1
                while n >= self.buf or (last and n >= self.b):
                    x, y = torch.cat(xs), torch.cat(ys)
                    xs = ys = None  # keep one copy of the buffer alive
                    perm = torch.from_numpy(rng.permutation(len(x)))
                    take = (len(x) // self.b) * self.b if last else self.buf // self.b * self.b
                    for j in range(0, take, self.b):
                        sel = perm[j : j + self.b]
                        yield x[sel].float(), y[sel].float()
                    rest = perm[take:]
                    xs, ys, n = [x[rest]], [y[rest]], len(rest)
                    del x, y
            epoch += 1

    def batches(self, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for k, batch in enumerate(self._global()):
            if k % self.dp != self.dp_idx:
                continue
            if k // self.dp < skip:
                continue
            yield batch

    def first_global_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return next(self._global())

    def scales(self, d_model: int):
        return norm_scales(self.store.manifest["x_mean_norm"], self.store.manifest["y_mean_norm"], d_model)


class StreamFeed:
    """Batches straight from the Ray Data harvest (rank 0 of the group reads them; see loop.py). The stream is
    re-run for further epochs."""

    def __init__(self, dataset_shard, batch_tokens: int, buffer_tokens: int, seed: int):
        self.ds, self.b, self.buf, self.seed = dataset_shard, batch_tokens, buffer_tokens, seed

    def batches(self, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        k = 0
        while True:
            for batch in self.ds.iter_batches(batch_size=self.b, batch_format="numpy", drop_last=True,
                                              local_shuffle_buffer_size=self.buf, local_shuffle_seed=self.seed):
                if k >= skip:
                    yield torch.from_numpy(batch["x"]).float(), torch.from_numpy(batch["y"]).float()
                k += 1
