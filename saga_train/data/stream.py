"""The batch stream of a run: class-balanced batches per epoch (a pure function of the seed and the epoch, so a
resumed run sees the batches an uninterrupted one would), decoded by DataLoader workers into ``Batch`` objects.
An image a worker cannot read raises its ``ImageLoadError`` in the main process as it is (one line naming the file),
not torch's "Caught ImageLoadError in DataLoader worker" with the worker's traceback in the message."""
import os
from dataclasses import dataclass

import torch

from ..errors import UserError
from .base import FileImageDataset
from .samplers import ClassBalancedBatchSampler


def steps_per_epoch(cfg, train_set) -> int:
    if cfg.steps_per_epoch:
        return cfg.steps_per_epoch
    return len(ClassBalancedBatchSampler(train_set.labels, cfg.classes_per_batch, cfg.images_per_class, cfg.seed))


def epoch_batches(cfg, train_set, epoch: int, count: int) -> list:
    """The epoch's ``count`` class-balanced batches (index lists), a pure function of (seed, epoch)."""
    sampler = ClassBalancedBatchSampler(train_set.labels, cfg.classes_per_batch, cfg.images_per_class, cfg.seed)
    sampler.set_epoch(epoch)
    batches = []
    while len(batches) < count:
        batches.extend(list(sampler))
        sampler.set_epoch(sampler.epoch + 1000)
    return batches[:count]


def data_workers(cfg, dataset, device) -> int:
    """DataLoader workers decoding images: ``cfg.workers``, or (-1) 0 for in-memory datasets (the synthetic
    world) and, for images on disk, up to 8 on CUDA / 2 on a CPU, leaving one core to the trainer."""
    if cfg.workers >= 0:
        return cfg.workers
    if not isinstance(dataset, FileImageDataset):
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8 if device.type == "cuda" else 2, cpus - 1))


@dataclass
class Batch:
    """A step's class-balanced micro-batch, decoded: PIL images and their labels."""

    images: list
    labels: list


def collate_batch(items) -> Batch:
    """A ``Batch`` of ``(image, label)`` items; the first ``UserError`` among them (``_ErrorsAsItems``) instead."""
    failed = next((item for item in items if isinstance(item, UserError)), None)
    if failed is not None:
        return failed
    return Batch([image for image, _ in items], [label for _, label in items])


class _ErrorsAsItems(torch.utils.data.Dataset):
    """``dataset`` whose item is the ``UserError`` that reading it raised (a damaged image), so that a DataLoader
    worker hands the error back as a value (``collate_batch``) and ``_Loader`` raises it in the main process."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            return self.dataset[i]
        except UserError as e:
            return e


class _Loader(torch.utils.data.DataLoader):
    """A DataLoader over ``_ErrorsAsItems`` raising the ``UserError`` a batch carries instead of yielding it."""

    def __iter__(self):
        for batch in super().__iter__():
            if isinstance(batch, UserError):
                raise batch
            yield batch


class StepBatches:
    """The batch sampler of steps ``start..stop-1``: each epoch's batches from ``epoch_batches`` (so resuming
    mid-epoch gives the same batches as an uninterrupted run), computed one epoch at a time."""

    def __init__(self, cfg, train_set, start: int, stop: int, per_epoch: int):
        self.cfg, self.train_set, self.start, self.stop, self.per_epoch = cfg, train_set, start, stop, per_epoch

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        batches, epoch = None, None
        for step in range(self.start, self.stop):
            if epoch != step // self.per_epoch:
                epoch = step // self.per_epoch
                batches = epoch_batches(self.cfg, self.train_set, epoch, self.per_epoch)
            yield batches[step % self.per_epoch]


def data_loader(dataset, workers: int, **batching):
    """A DataLoader yielding ``Batch`` objects, images decoded in ``workers`` processes (0: in this one);
    ``batching``: ``batch_sampler=`` or ``batch_size=``."""
    return _Loader(
        _ErrorsAsItems(dataset), num_workers=workers, collate_fn=collate_batch, prefetch_factor=2 if workers else None,
        generator=torch.Generator(), **batching)  # its own generator: the global RNG stays untouched


__all__ = ["Batch", "StepBatches", "collate_batch", "data_loader", "data_workers", "epoch_batches", "steps_per_epoch"]
