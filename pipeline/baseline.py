"""The loader a user would write instead of DALI: webdataset reads the tars, PIL decodes, the
NumPy reference augmentation (augment.py) runs in `torch.utils.data.DataLoader` worker processes.

It follows the same `EpochPlan` as the DALI loader (shard order, rank ranges), so both loaders see
the same samples on each rank. Each worker takes a contiguous part of its rank's range, shuffles
through its own buffer (seeded by seed, epoch, rank, worker), and batches on its own, as
DataLoader does with per-worker batching; train keeps full batches only, and every rank runs the
same number of them (the smallest rank's count).
"""
from __future__ import annotations

import io
import itertools
import random
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from alexnet_fast.pipeline.augment import ColorStats, centre_params, draw_params, reference_augment, reference_ten_crop
from alexnet_fast.pipeline.epoch_plan import EpochPlan, derive_seed, rank_range
from alexnet_fast.pipeline.loader_spec import CorruptSampleError, LoaderSpec, color_stats
from alexnet_fast.pipeline.shard_damage import ShardDamage
from alexnet_fast.pipeline.shardset import ShardSet


def worker_ranges(start: int, stop: int, workers: int) -> list[tuple[int, int]]:
    """Split [start, stop) into `workers` contiguous parts (as even as integer division allows)."""
    n = stop - start
    return [(start + n * w // workers, start + n * (w + 1) // workers) for w in range(workers)]


def decode_rgb(data: bytes) -> np.ndarray:
    """JPEG bytes -> HWC uint8 RGB (raises on a file PIL cannot decode fully)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


@dataclass
class _EpochSamples(torch.utils.data.IterableDataset):
    """One rank's epoch, read by DataLoader workers; yields (images, labels, skipped) batches or
    ("corrupt", message) so the main process raises one clean error."""
    spec: LoaderSpec
    plan: EpochPlan
    stats: ColorStats
    excluded: frozenset[str] = frozenset()

    def __post_init__(self):
        super().__init__()

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        torch.set_num_threads(1)
        start, stop = worker_ranges(self.plan.start, self.plan.stop, workers)[worker]
        rng = np.random.default_rng(derive_seed(self.plan.seed, worker))
        train = self.spec.split == "train"
        batch, labels, skipped = [], [], []
        samples = self._samples(start, stop, rng, train)
        if train:   # a skipped corrupt sample is replaced from a second pass, so batch counts never change
            full, samples = (stop - start) // self.spec.batch_size, itertools.chain(samples, self._samples(start, stop, rng, train))
            if full == 0:
                return
        for sample in samples:
            name = f"{sample['__url__']}:{sample['__key__']}"
            if name in self.excluded:
                skipped.append(name)
                continue
            try:
                pixels = decode_rgb(sample["jpg"])
            except Exception as e:  # noqa: BLE001 -- PIL raises several types for a broken file
                if self.spec.on_corrupt == "error":
                    yield ("corrupt", f"corrupt JPEG (shard {sample['__url__']}, key {sample['__key__']}): {e}")
                    return
                skipped.append(name)
                continue
            batch.append(self._augment(pixels, rng, train))
            labels.append(int(sample["cls"]))
            if len(batch) == self.spec.batch_size:
                yield self._collate(batch, labels, skipped)
                batch, labels, skipped = [], [], []
                if train:
                    full -= 1
                    if full == 0:
                        return
        if batch and not train:             # val: the partial last batch; train keeps full batches only
            yield self._collate(batch, labels, skipped)
        elif skipped:
            yield self._collate([], [], skipped)

    def _samples(self, start: int, stop: int, rng: np.random.Generator, train: bool):
        """Raw samples of [start, stop) of the epoch's concatenated shard order (shuffled for train)."""
        urls, offset = [], 0
        local = []                          # (url, first, last) sample positions inside each tar
        for shard in self.plan.shards:
            lo, hi = max(start, offset), min(stop, offset + shard.samples)
            if lo < hi:
                local.append((str(shard.tar), lo - offset, hi - offset))
                urls.append(str(shard.tar))
            offset += shard.samples
        samples = self._in_ranges(local)
        if train:
            shuffle = wds.filters.shuffle(bufsize=self.spec.shuffle_buffer, initial=self.spec.shuffle_buffer,
                                          rng=random.Random(int(rng.integers(2**31))))
            samples = shuffle(samples)
        return samples

    @staticmethod
    def _in_ranges(local):
        for url, first, last in local:
            for i, sample in enumerate(wds.tarfile_to_samples()([{"url": url}])):
                if i >= last:
                    break
                if i >= first:
                    yield sample

    def _augment(self, pixels: np.ndarray, rng: np.random.Generator, train: bool) -> np.ndarray:
        if train:
            return reference_augment(pixels, draw_params(rng, self.spec.lighting_std), self.stats, self.spec.crop)
        if self.spec.ten_crop:
            return reference_ten_crop(pixels, self.stats, self.spec.crop)
        return reference_augment(pixels, centre_params(), self.stats, self.spec.crop)

    def _collate(self, batch, labels, skipped):
        shape = (0, 10 if self.spec.ten_crop else 3)
        images = torch.from_numpy(np.stack(batch)) if batch else torch.empty(shape)
        return images, torch.tensor(labels, dtype=torch.int64), skipped


class BaselineLoader:
    def __init__(self, spec: LoaderSpec, shard_set: ShardSet, damaged: list[ShardDamage] = ()):
        # webdataset reads the tars without the .idx, so a missing index does not matter here; the
        # samples a cut-short tar lost would end its reader early and unevenly across workers.
        for damage in damaged:
            if damage.cut_short:
                raise CorruptSampleError(f"{damage.describe()}: the baseline loader cannot skip them; use the "
                                         f"DALI loader, or re-make that shard")
        self.notes = [f"{d.describe()}: the baseline loader does not use it" for d in damaged]
        self.spec = spec
        self.shard_set = shard_set
        self.stats = color_stats(spec, shard_set)
        self.skipped: list[str] = []
        self._excluded: frozenset[str] = frozenset()   # "<tar>:<key>" left out (exclude)
        self._first = 0                 # the batch the next iteration starts at (resume)
        self._done = 0                  # batches of the current epoch handed out
        self.set_epoch(0)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    @property
    def num_samples(self) -> int:
        if self.spec.split == "val":
            return self._plan.num_samples - len(self.skipped)
        return self._batches * self.spec.batch_size

    def __len__(self) -> int:
        return self._batches

    def prepare(self, epoch: int) -> None:
        """The Loader contract's early start: the DataLoader's worker processes start when it is
        iterated, so here it is just set_epoch."""
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._first = epoch, 0
        self._plan = EpochPlan.make(self.spec, self.shard_set, epoch)
        b, w = self.spec.batch_size, self.spec.workers
        if self.spec.split == "train":     # every rank: the smallest rank's count of full per-worker batches
            total = sum(s.samples for s in self._plan.shards)
            self._batches = min(sum((hi - lo) // b for lo, hi in worker_ranges(*rank_range(total, r, self.spec.world_size), w))
                                for r in range(self.spec.world_size))
        else:
            self._batches = sum(-(-(hi - lo) // b) for lo, hi in worker_ranges(self._plan.start, self._plan.stop, w))

    def resume(self, epoch: int, batches_done: int, state: dict | None = None) -> bool:
        """DataLoader workers have no resumable state: the epoch is replayed (decoded, then dropped)
        up to `batches_done`; the same seed gives the same batches."""
        self.set_epoch(epoch)
        if not 0 <= batches_done <= self._batches:
            raise ValueError(f"cannot resume at batch {batches_done}: epoch {epoch} has {self._batches}")
        self._first = batches_done
        return False

    def state_dict(self) -> dict:
        return {"kind": "baseline", "epoch": self.epoch, "batches": self._done}

    def exclude(self, names: list[str]) -> None:
        self._excluded = self._excluded | frozenset(names)

    def __iter__(self):
        on_gpu = self.spec.device == "cuda"
        device = torch.device("cuda", self.spec.device_id) if on_gpu else torch.device("cpu")
        loader = torch.utils.data.DataLoader(
            _EpochSamples(self.spec, self._plan, self.stats, self._excluded), batch_size=None, num_workers=self.spec.workers,
            pin_memory=on_gpu, prefetch_factor=self.spec.prefetch, persistent_workers=False)
        done, first = 0, self._first
        self._first = self._done = 0
        for item in loader:
            if isinstance(item[0], str):         # ("corrupt", message) from a worker
                raise CorruptSampleError(item[1] + " -- re-make that shard, or pass --on-corrupt skip")
            images, labels, skipped = item
            self.skipped.extend(skipped)
            if len(labels) == 0:
                continue
            done += 1
            if done > first:                     # before `first`: trained on before a resume
                images = images.to(device, non_blocking=True).to(self.spec.dtype)
                if self.spec.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last) if images.ndim == 4 else images
                self._done = done
                yield images, labels.to(device, non_blocking=True)
            if self.spec.split == "train" and done == self._batches:
                return
