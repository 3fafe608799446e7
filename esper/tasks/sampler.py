"""Per-env minibatches for N host runs at once, drawn on the task's device.

Every env gets its own shuffle of the training set each epoch (one batched keyed permutation,
[N, T]); a step is ONE index_select of N*B images, then batched augmentation and
normalization. There is no Python loop over envs, and nothing leaves the device.

Epoch length: ceil(T / B) steps. When B does not divide T the last step is smaller
(T mod B images per env), so every env sees every training example exactly once per epoch.
Set `drop_last=True` for a fixed shape instead (T // B full steps; the leftover T mod B
examples of each env's shuffle are skipped that epoch), e.g. to avoid a second compiled graph.

Why the randomness is keyed per env: `epoch(keys, epoch)` draws env i's permutation and its
crop/flip offsets from the counter-based `esper.rng`, as a pure function of (keys[i], epoch[i]).
So env i gets exactly the same data whether it trains alone or inside a batch of N (a stateful
`torch.Generator` shared by the batch would couple every env's stream to the batch's
composition), and a run resumes from (key, epoch) alone: the sampler holds no RNG state, so
there is nothing of it to checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor

from esper import rng
from esper.tasks.base import TaskData, crop_flip

_PERM_STREAM = 0x7A5C  # esper.rng stream ids for the sampler's keyed draws
_AUG_STREAM = 0x7A5D


class EnvBatchSampler:
    """Minibatches [N, B, C, H, W] with an independent, keyed order per env.

    Stateless apart from its configuration: all randomness comes from the `keys` and `epoch`
    passed to `epoch`, so there is no sampler state to save or restore.
    """

    def __init__(
        self,
        task: TaskData,
        n_envs: int,
        batch_size: int,
        *,
        drop_last: bool = False,
    ) -> None:
        if n_envs < 1 or batch_size < 1:
            raise ValueError(f"n_envs and batch_size must be positive, got {n_envs}, {batch_size}")
        if drop_last and batch_size > task.train_size:
            raise ValueError(
                f"drop_last with batch_size {batch_size} > train size {task.train_size} "
                "would give empty epochs"
            )
        self.task = task
        self.device = task.device
        self.n_envs = n_envs
        self.batch_size = batch_size
        self.drop_last = drop_last

    @property
    def steps_per_epoch(self) -> int:
        """Steps in one epoch: ceil(T / B), or T // B with drop_last."""
        t, b = self.task.train_size, self.batch_size
        return t // b if self.drop_last else -(-t // b)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _gather(self, perm: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """Raw inputs [N, b, *sample_shape] and targets [N, b, *label_shape] of one step, by ONE
        index_select each."""
        b = self.batch_size
        idx = perm[:, step * b : (step + 1) * b]  # [N, b]
        n, bb = idx.shape
        flat = idx.reshape(-1)
        x = self.task.train_x.index_select(0, flat).view(n, bb, *self.task.sample_shape)
        y = self.task.train_y.index_select(0, flat).view(n, bb, *self.task.label_shape)
        return x, y

    def epoch(self, keys: Tensor, epoch: Tensor | int) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch: x [N, b, C, H, W] float32 and y [N, b] int64 per step, in order.

        `keys` [N] are the envs' RNG keys and `epoch` ([N] or a scalar) their epoch counters.
        Env i's permutation and crop/flip draws are a pure function of (keys[i], epoch[i]), so
        an env reproduces its data stream regardless of batch composition.
        """
        if keys.shape != (self.n_envs,):
            raise ValueError(f"keys must be [{self.n_envs}], got {tuple(keys.shape)}")
        ekey = rng.stream_key(keys.to(self.device), _PERM_STREAM, epoch)
        perm = rng.permutations(ekey, self.task.train_size)  # [N, T]
        pad = self.task.crop_padding
        for step in range(self.steps_per_epoch):
            x, y = self._gather(perm, step)
            if self.task.augment:
                u = rng.uniform(rng.stream_key(ekey, _AUG_STREAM, step), (y.shape[1], 3))
                span = 2 * pad + 1
                oy = (u[..., 0] * span).long().clamp_(max=span - 1)
                ox = (u[..., 1] * span).long().clamp_(max=span - 1)
                x = crop_flip(x, pad, oy, ox, (u[..., 2] < 0.5) & self.task.flip)
            yield self.task.prepare(x), y

    def val_batches(
        self, batch_size: int | None = None, split: str = "val"
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """A shared evaluation split (``val`` or ``test``) in order, as (x [B, C, H, W] float32,
        y [B]) chunks."""
        b = batch_size or self.batch_size
        vx, vy = self.task.split(split)
        for start in range(0, vy.shape[0], b):
            yield self.task.prepare(vx[start : start + b]), vy[start : start + b]
