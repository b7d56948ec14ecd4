"""The DALI loader (`LoaderSpec.kind="dali"`, made by loaders.make_loader): a fresh DALI pipeline
per epoch from the shared `EpochPlan`, batches handed to torch on the spec's device.

Resuming mid-epoch (a checkpoint written by `--ckpt-every` or on SIGTERM): `state_dict()` holds the
epoch, the batches handed out, and DALI's own pipeline checkpoint (the train pipeline is built with
`enable_checkpointing`: reader position, shuffle buffer and random-generator states, ~1 KB), taken
between two batches. `resume(epoch, batches_done, state)` rebuilds the pipeline from it, so the
next batch is the one the interrupted run would have produced next, without decoding the batches
before it. Without a usable state (another world size or batch size, an older checkpoint, the
baseline loader) it replays the epoch up to `batches_done` instead: the same batches, slower.

Samples left out (`on_corrupt="skip"`, or `exclude`): a corrupt JPEG found while reading
(corrupt_samples.py names it; with `on_corrupt="error"` the loader stops with a
`CorruptSampleError` naming the shard and key), the samples a damaged shard lost (shard_damage.py),
the samples `train --verify-shards` found changed. Each points at another sample of its tar in a
patched copy of the .idx, so the sample count and order stay the same, and its rows are dropped
from the batches and counted in `loader.skipped` / `loader.num_skipped` (left_out.py). A damaged
shard worked around is one line in `loader.notes`.

On a GPU the batch reaches torch in stream order, not host order: see `_run`.
"""
from __future__ import annotations

import threading

import numpy as np
import torch

from alexnet_fast.pipeline import dali_pipelines as dp
from alexnet_fast.pipeline.corrupt_samples import find_corrupt, source_name
from alexnet_fast.pipeline.epoch_plan import EpochPlan
from alexnet_fast.pipeline.host import release_freed_memory
from alexnet_fast.pipeline.left_out import LeftOutSamples
from alexnet_fast.pipeline.loader_spec import CorruptSampleError, LoaderSpec, color_stats
from alexnet_fast.pipeline.shard_damage import ShardDamage
from alexnet_fast.pipeline.shardset import ShardSet


class DaliLoader:
    """The DALI pipelines behind the Loader contract (see the module docstring)."""

    def __init__(self, spec: LoaderSpec, shard_set: ShardSet, damaged: list[ShardDamage] = ()):
        self.spec = spec
        self.shard_set = shard_set
        self.stats = color_stats(spec, shard_set)
        self.epoch = 0
        self.skipped: list[str] = []            # "<tar>:<key>" of every sample left out so far on this rank
        self.notes: list[str] = []              # one line per damaged shard worked around (on_corrupt="skip")
        # corrupt, lost or excluded samples: their rows are dropped, their indices patched
        self._left_out = LeftOutSamples(shard_set.shards(spec.split))
        self._device = torch.device("cuda", spec.device_id) if spec.device == "cuda" else torch.device("cpu")
        self._plan = EpochPlan.make(spec, shard_set, 0)
        for damage in damaged:
            self.notes.append(self._left_out.work_around(damage))
        self._resume_at: tuple[int, str | None] | None = None   # (first batch, DALI checkpoint or None)
        self._pipe = None                       # the current epoch's pipeline (state_dict checkpoints it)
        self._prepared: _PreparedEpoch | None = None   # the next epoch started early (prepare)
        self._done = 0                          # batches of the current epoch handed out
        self.with_params = False                # tests: also yield sample names (and train's drawn params)

    # -- the Loader contract ------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        if self.spec.split == "train":
            return self._plan.num_samples
        return self._plan.num_samples - self._left_out.in_range(self._plan)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return self._plan.batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._plan = EpochPlan.make(self.spec, self.shard_set, epoch)
        self._resume_at = None      # (a prepared epoch stays: __iter__ uses it if the plan is the same)

    def prepare(self, epoch: int) -> None:
        """Start epoch `epoch` now, off the critical path: on a thread of its own, free what the
        ended epoch's pipeline left, build the new one and decode its first batch, while the
        trainer evaluates and checkpoints. The next iteration then starts with that batch in hand.
        The order and augmentation are those of `set_epoch(epoch)` (the same plan and seeds: it is
        the same pipeline, built earlier). The ended epoch's pipeline is let go: an epoch-end
        checkpoint resumes at the next epoch's start and needs no reader state. It is torn down on
        that thread too: a DALI pipeline's teardown (joining its threads, freeing its buffers)
        measured ~0.2 s on the 2-core CPU VM, all of it on the critical path when done here."""
        self.set_epoch(epoch)
        ended = [self._pipe] if self._pipe is not None else []
        self._pipe, self._done = None, 0
        self._prepared = _PreparedEpoch(self._plan, self._start_epoch, ended)

    def resume(self, epoch: int, batches_done: int, state: dict | None = None) -> bool:
        self.set_epoch(epoch)
        if not 0 <= batches_done <= self._plan.batches:
            raise ValueError(f"cannot resume at batch {batches_done}: epoch {epoch} has {self._plan.batches}")
        state = state or {}
        mine = {str(s.tar) for s in self._plan.shards}
        for name in state.get("skipped", []):   # corrupt samples skipped before the stop stay skipped
            if name not in self._left_out and name.rsplit(":", 1)[0] in mine:
                self._skip(name)
        checkpoint = state.get("dali")
        usable = (bool(checkpoint) and state.get("fingerprint") == self._fingerprint()
                  and (state.get("epoch"), state.get("batches")) == (epoch, batches_done))
        self._resume_at = (batches_done, checkpoint if usable else None)
        return usable

    def state_dict(self) -> dict:
        return {"kind": "dali", "fingerprint": self._fingerprint(), "epoch": self.epoch, "batches": self._done,
                "dali": self._pipe.checkpoint() if self._pipe is not None and self.spec.split == "train" else None,
                "skipped": list(self.skipped)}

    def _fingerprint(self) -> dict:
        """What a DALI checkpoint depends on besides the epoch: restored into a pipeline that differs
        in any of these, it would yield other samples than the interrupted run."""
        s = self.spec
        return {"split": s.split, "batch_size": s.batch_size, "rank": s.rank, "world_size": s.world_size,
                "seed": s.seed, "crop": s.crop, "lighting_std": s.lighting_std, "shuffle_buffer": s.shuffle_buffer,
                "decode_roi": s.decode_roi,     # another graph: its checkpoint would not fit
                "gpu_decoder": s.decodes_on_gpu,   # another decoder: other pixels
                "fast_idct": s.fast_idct and not s.decodes_on_gpu,     # another IDCT: other pixels
                "shards": [s.tar.name for s in self.shard_set.shards(s.split)]}

    def __iter__(self):
        plan = self._plan
        first, checkpoint = self._resume_at or (0, None)
        prepared, self._prepared = self._prepared, None
        ready = prepared.take() if prepared is not None and self._resume_at is None and prepared.plan == plan else None
        self._resume_at, self._pipe, self._done = None, None, first
        if ready is None:
            release_freed_memory()          # what the previous epoch's pipeline left: see there
        done, pipe = first, None
        while done < plan.batches:
            try:
                if ready is not None:       # prepare() built it and decoded batch 0 already
                    (pipe, outputs), ready = ready, None
                elif pipe is None:
                    pipe = self._build(plan, checkpoint)
                    # A checkpointed pipeline starts at `first`, a fresh one at batch 0; with the
                    # epoch's seed it yields the same batches again: run it up to `done`.
                    for _ in range(done - (first if checkpoint else 0)):
                        pipe.run()
                    outputs = self._run(pipe)
                else:
                    outputs = self._run(pipe)
            except RuntimeError as error:
                pipe = self._pipe = None
                self._locate_corrupt(plan, done, error)      # raises, or records the samples to skip
                continue
            # Kept until the next epoch starts, not dropped when the consumer stops early: a
            # checkpoint written after a stop or at --max-steps needs the pipeline's state.
            self._pipe, self._done = pipe, done + 1
            yield self._to_torch(outputs, plan, done)
            done += 1

    def _run(self, pipe):
        """The next batch's outputs. On the CPU, host memory ready to read. On a GPU, bound to
        torch's current stream: DALI makes that stream wait for the batch's kernels on the device
        (an event, not a host wait) and `_dali_to_torch` enqueues the copies into torch's tensors on
        the same stream, so the copies and the train step behind them are ordered after DALI's work
        while the host goes straight on to launch them. Without a stream, `run()` would block the
        host until the batch is finished on the device, every batch (issue 11). Needs DALI's
        dynamic executor, the default for the async pipelined pipelines built here."""
        if self._device.type == "cuda":
            return pipe.run(torch.cuda.current_stream(self._device))
        return pipe.run()

    def _start_epoch(self, plan: EpochPlan):
        """What prepare() runs off the critical path: (the plan's pipeline, its first batch)."""
        release_freed_memory()
        pipe = self._build(plan)
        return pipe, self._run(pipe)

    # -- building -----------------------------------------------------------------------------
    def _reader_config(self, plan: EpochPlan) -> dp.ReaderConfig:
        train = self.spec.split == "train"
        return dp.ReaderConfig(
            paths=tuple(str(s.tar) for s in plan.shards),
            index_paths=tuple(str(self._left_out.index_of(s)) for s in plan.shards),
            shard_id=self.spec.rank, num_shards=self.spec.world_size, shuffle=train,
            initial_fill=max(1, min(self.spec.shuffle_buffer, plan.stop - plan.start)), seed=plan.seed)

    def _pipeline_args(self, plan: EpochPlan) -> dict:
        on_gpu = self.spec.device == "cuda"
        return dict(batch_size=self.spec.batch_size, num_threads=self.spec.workers,
                    device_id=self.spec.device_id if on_gpu else None, seed=plan.seed,
                    prefetch_queue_depth=self.spec.prefetch)

    def _build(self, plan: EpochPlan, checkpoint: str | None = None):
        decoder = decode_config(self.spec)
        out = dp.OutputConfig(crop=self.spec.crop, fp16=self.spec.dtype != torch.float32,
                              channels_last=self.spec.channels_last)
        reader = self._reader_config(plan)
        if self.spec.split == "train":
            # enable_checkpointing: DALI tracks the reader's and random operators' states per
            # iteration, for state_dict() / resume(). Its price on the 2-core CPU VM: a median 7%
            # fewer img/s over six A/B pairs, ranging from 14% fewer to 7% more (benchmarks/RESULTS.md,
            # issue 17): the cost of resuming mid-epoch without replaying the epoch's batches.
            pipe = dp.train_pipeline(reader, decoder, out, self.stats, lighting_std=self.spec.lighting_std,
                                     with_params=self.with_params, enable_checkpointing=True,
                                     checkpoint=checkpoint, **self._pipeline_args(plan))
        else:
            pipe = dp.val_pipeline(reader, decoder, out, self.stats, ten_crop=self.spec.ten_crop,
                                   **self._pipeline_args(plan))
        pipe.build()
        return pipe

    # -- output -------------------------------------------------------------------------------
    def _to_torch(self, outputs, plan: EpochPlan, index: int):
        images, labels, sources = outputs[:3]
        device = self._device
        x = _dali_to_torch(images, device, borrow=self.spec.borrow_buffers)
        y = _dali_to_torch(labels, device)
        keep = len(y)
        if self.spec.split == "val" and index == plan.batches - 1:
            keep = plan.num_samples - index * self.spec.batch_size   # trim the reader's padding
        rows = None
        if self._left_out:                 # only then look at source_info (host strings)
            names = [source_name(sources.at(i)) for i in range(keep)]
            rows = [i for i, name in enumerate(names) if name not in self._left_out]
            if len(rows) == keep:
                rows = None
            else:
                seen = set(self.skipped)
                self.skipped += [n for n in dict.fromkeys(names) if n in self._left_out and n not in seen]
        if rows is not None:
            # on DALI's dense layout (NHWC for channels_last, NCHW otherwise), before the permute
            # below: index_select makes a contiguous tensor, which for the permuted view would be
            # NCHW, not channels_last
            index_t = torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True)
            x, y = x.index_select(0, index_t), y.index_select(0, index_t)
        elif keep < len(y):
            x, y = x[:keep], y[:keep]
        if self.spec.channels_last:        # per-sample HWC -> an NCHW view with channels_last strides
            x = x.permute(0, 1, 4, 2, 3) if x.ndim == 5 else x.permute(0, 3, 1, 2)
        if self.spec.dtype == torch.bfloat16:
            x = x.to(torch.bfloat16)       # DALI has no bfloat16: fp16 out of DALI, cast on the device
        if self.with_params:               # tests: "<tar>:<key>" and (crop_x, crop_y, mirror, alpha) per row
            rows = rows if rows is not None else range(keep)
            params = tuple(np.stack([np.asarray(t.at(i)) for i in rows]) for t in outputs[3:])
            return x, y, [source_name(sources.at(i)) for i in rows], params
        return x, y

    # -- corrupt samples ----------------------------------------------------------------------
    def _locate_corrupt(self, plan: EpochPlan, failed_batch: int, error: RuntimeError) -> None:
        # The failing batch is the one asked for or one the executor had prefetched behind it.
        bad = find_corrupt(self._reader_config(plan), batch_size=self.spec.batch_size, seed=plan.seed,
                           first=failed_batch, stop=min(plan.batches, failed_batch + self.spec.prefetch + 1),
                           known=self._left_out, device_id=self.spec.device_id if self.spec.decodes_on_gpu else None)
        where = f"rank {self.spec.rank}, {self.spec.split} epoch {self.epoch}, batch {failed_batch}"
        if not bad:
            first_line = next((ln for ln in str(error).splitlines() if "failure" in ln or "rror" in ln), str(error))
            raise RuntimeError(f"DALI failed at {where} ({first_line.strip()}), but every sample of that batch "
                               f"decodes on its own; see the DALI error above") from error
        if self.spec.on_corrupt == "error":
            names = ", ".join(f"shard {tar}, key {key}" for tar, key in (n.rsplit(":", 1) for n in bad))
            raise CorruptSampleError(f"corrupt JPEG ({names}) at {where}: re-make that shard, or pass "
                                     f"--on-corrupt skip to skip and count corrupt samples") from None
        for name in bad:
            self._skip(name)

    def _skip(self, name: str) -> None:
        """Leave out a corrupt sample found while reading, counted at once (its batch is re-run)."""
        self._left_out.exclude([name])
        self.skipped.append(name)

    def exclude(self, names: list[str]) -> None:
        """Leave these samples ("<tar>:<key>") out from now on, skipped and counted when their rows
        are dropped (the samples `train --verify-shards` found changed since make_shards)."""
        self._left_out.exclude(names)


class _PreparedEpoch:
    """An epoch's pipeline being built, with its first batch, on a thread of its own."""

    def __init__(self, plan: EpochPlan, start, ended: list) -> None:
        self.plan = plan
        self._result = None
        # `ended` holds the only reference to the ended epoch's pipeline: emptied on the thread,
        # so its teardown runs there
        self._thread = threading.Thread(target=self._run, args=(start, ended), name="dali-prepare", daemon=True)
        self._thread.start()

    def _run(self, start, ended: list) -> None:
        ended.clear()
        try:
            self._result = start(self.plan)
        except Exception:       # a corrupt first batch, say: the normal path meets it again and names it
            self._result = None

    def take(self):
        """(pipeline, first batch's outputs), or None if building it failed."""
        self._thread.join()
        return self._result


def decode_config(spec: LoaderSpec) -> dp.DecodeConfig:
    """The decode stage `spec` asks for: where it decodes (decode="cpu" on a GPU run: the CPU
    decoder, then the augmentation on the GPU), ROI or whole image, exact or fast IDCT."""
    on_gpu = spec.device == "cuda"
    return dp.DecodeConfig(on_gpu=on_gpu, cpu_decoder=on_gpu and not spec.decodes_on_gpu, roi=spec.decode_roi,
                           fast_idct=spec.fast_idct)


def _dali_to_torch(batch, device: torch.device, borrow: bool = False) -> torch.Tensor:
    """A dense DALI batch as a torch tensor on `device`, the same code on both devices: with
    `borrow` DALI's own output buffer, shared through DLPack (no copy); else a copy of its own.

    Lifetime: the pipelines run DALI's dynamic executor, under which an output buffer is not
    reused while anything refers to it (DALI 2.4's `TensorGPU.__dlpack__` documentation: only
    the legacy executor overwrites outputs after `release_outputs`); the DLPack capsule holds
    such a reference, handed to the torch tensor, so a borrowed batch stays valid for as long as
    the tensor (or a view of it) lives, not just until the next batch. On a GPU the buffer is bound
    to torch's current stream (`_run` passes it to `pipe.run`) and `torch.from_dlpack` hands that
    stream to `__dlpack__`, which makes it wait for the batch's ready event (no host wait); the
    buffer's release is then ordered on that stream, after the kernels that read it. Consumers
    that keep batches (tests, `list(loader)`) take copies so as not to hold DALI's pool."""
    shared = torch.from_dlpack(batch.as_tensor())
    if borrow:
        return shared
    # torch's multi-threaded copy: on the CPU ~4x faster than DALI's feed_ndarray (one memmove)
    return shared.clone()
