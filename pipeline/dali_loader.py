"""The DALI loader (`LoaderSpec.kind="dali"`, made by loaders.make_loader): a fresh DALI pipeline
per epoch from the shared `EpochPlan`, batches handed to torch on the spec's device.

Resuming mid-epoch (a checkpoint written by `--ckpt-every` or on SIGTERM): `state_dict()` holds the
epoch, the batches handed out, and DALI's own pipeline checkpoint (the train pipeline is built with
`enable_checkpointing`: reader position, shuffle buffer and random-generator states, ~1 KB), taken
between two batches. `resume(epoch, batches_done, state)` rebuilds the pipeline from it, so the
next batch is the one the interrupted run would have produced next, without decoding the batches
before it. Without a usable state (another world size or batch size, an older checkpoint, the
baseline loader) it replays the epoch up to `batches_done` instead: the same batches, slower.

Corrupt samples (a JPEG inside a shard that does not decode): DALI reports only "nvImageCodec
failure" for the batch, not which sample. The DALI loader then replays the reader alone (same
config and seed, so the same order, no decoding) over the failed batch and the prefetched ones,
decodes each candidate with DALI's CPU decoder (on a GPU run, if all of them decode there, with
the GPU decoder too) and names the shard and key in a `CorruptSampleError`. With `on_corrupt="skip"` it instead points that sample at another sample of
the same tar in a patched copy of the .idx (index_patches.py: the sample count and order stay the
same, so rank ranges and shuffles are unchanged), drops that row from its batches, and counts it
in `loader.skipped` / `loader.num_skipped`.

Shards missing parts (found before any reader starts, from a few stat calls): a missing tar stops
the loader in both modes. With `on_corrupt="skip"` the DALI loader carries on past the rest and
says so in `loader.notes`: a missing .idx is rebuilt from the tar's headers; the samples of a tar
cut short are skipped as above (and counted when their rows are dropped). The baseline loader
needs no .idx; it cannot skip the lost samples of a cut-short tar and stops naming it.
"""
from __future__ import annotations

import numpy as np
import torch

from alexnet_fast.pipeline.index_patches import IndexPatches, Row, index_from_tar, read_index, row_fits, row_key
from alexnet_fast.pipeline.loaders import (CorruptSampleError, EpochPlan, LoaderSpec, ShardDamage, color_stats,
                                           release_freed_memory)
from alexnet_fast.pipeline.shardset import ShardFile, ShardSet


class DaliLoader:
    """The DALI pipelines behind the Loader contract (see the module docstring)."""

    def __init__(self, spec: LoaderSpec, shard_set: ShardSet, damaged: list[ShardDamage] = ()):
        self.spec = spec
        self.shard_set = shard_set
        self.stats = color_stats(spec, shard_set)
        self.epoch = 0
        self.skipped: list[str] = []            # "<tar>:<key>" of every sample left out so far on this rank
        self.notes: list[str] = []              # one line per damaged shard worked around (on_corrupt="skip")
        self._patches = IndexPatches()          # index copies that point skipped samples at a donor
        self._drop: set[str] = set()            # names whose rows are dropped: corrupt, lost or excluded samples
        self._drop_rows: dict[str, set[int]] = {}   # tar path -> positions of those samples in it
        self._plan = EpochPlan.make(spec, shard_set, 0)
        for damage in damaged:
            self._work_around(damage)
        self._resume_at: tuple[int, str | None] | None = None   # (first batch, DALI checkpoint or None)
        self._pipe = None                       # the current epoch's pipeline (state_dict checkpoints it)
        self._done = 0                          # batches of the current epoch handed out
        self.with_params = False                # tests: also yield sample names (and train's drawn params)

    # -- the Loader contract ------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        if self.spec.split == "train":
            return self._plan.num_samples
        return self._plan.num_samples - self._dropped_in_range()

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return self._plan.batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._plan = EpochPlan.make(self.spec, self.shard_set, epoch)
        self._resume_at = None

    def resume(self, epoch: int, batches_done: int, state: dict | None = None) -> bool:
        self.set_epoch(epoch)
        if not 0 <= batches_done <= self._plan.batches:
            raise ValueError(f"cannot resume at batch {batches_done}: epoch {epoch} has {self._plan.batches}")
        state = state or {}
        mine = {str(s.tar) for s in self._plan.shards}
        for name in state.get("skipped", []):   # corrupt samples skipped before the stop stay skipped
            if name not in self._drop and name.rsplit(":", 1)[0] in mine:
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
                "shards": [s.tar.name for s in self.shard_set.shards(s.split)]}

    def __iter__(self):
        plan = self._plan
        first, checkpoint = self._resume_at or (0, None)
        self._resume_at, self._pipe, self._done = None, None, first
        release_freed_memory()              # what the previous epoch's pipeline left: see there
        done, pipe = first, None
        while done < plan.batches:
            try:
                if pipe is None:
                    pipe = self._build(plan, checkpoint)
                    # A checkpointed pipeline starts at `first`, a fresh one at batch 0; with the
                    # epoch's seed it yields the same batches again: run it up to `done`.
                    for _ in range(done - (first if checkpoint else 0)):
                        pipe.run()
                outputs = pipe.run()
            except RuntimeError as error:
                pipe = self._pipe = None
                self._locate_corrupt(plan, done, error)      # raises, or records the samples to skip
                continue
            # Kept until the next epoch starts, not dropped when the consumer stops early: a
            # checkpoint written after a stop or at --max-steps needs the pipeline's state.
            self._pipe, self._done = pipe, done + 1
            yield self._to_torch(outputs, plan, done)
            done += 1

    # -- building -----------------------------------------------------------------------------
    def _reader_config(self, plan: EpochPlan):
        from alexnet_fast.pipeline.dali_pipelines import ReaderConfig

        train = self.spec.split == "train"
        return ReaderConfig(
            paths=tuple(str(s.tar) for s in plan.shards),
            index_paths=tuple(str(self._patches.index_of(s.tar, s.index)) for s in plan.shards),
            shard_id=self.spec.rank, num_shards=self.spec.world_size, shuffle=train,
            initial_fill=max(1, min(self.spec.shuffle_buffer, plan.stop - plan.start)), seed=plan.seed)

    def _pipeline_args(self, plan: EpochPlan) -> dict:
        on_gpu = self.spec.device == "cuda"
        return dict(batch_size=self.spec.batch_size, num_threads=self.spec.workers,
                    device_id=self.spec.device_id if on_gpu else None, seed=plan.seed,
                    prefetch_queue_depth=self.spec.prefetch)

    def _build(self, plan: EpochPlan, checkpoint: str | None = None):
        from alexnet_fast.pipeline import dali_pipelines as dp

        decoder = dp.DecodeConfig(on_gpu=self.spec.device == "cuda")
        out = dp.OutputConfig(crop=self.spec.crop, fp16=self.spec.dtype != torch.float32,
                              channels_last=self.spec.channels_last)
        reader = self._reader_config(plan)
        if self.spec.split == "train":
            # enable_checkpointing: DALI tracks the reader's and random operators' states per
            # iteration (no measurable cost on 2 CPU cores), for state_dict() / resume().
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
        device = torch.device(self.spec.device, self.spec.device_id) if self.spec.device == "cuda" else torch.device("cpu")
        x = _dali_to_torch(images, device, borrow=self.spec.borrow_buffers)
        y = _dali_to_torch(labels, device)
        if self.spec.channels_last:        # per-sample HWC -> an NCHW view with channels_last strides
            x = x.permute(0, 1, 4, 2, 3) if x.ndim == 5 else x.permute(0, 3, 1, 2)
        if self.spec.dtype == torch.bfloat16:
            x = x.to(torch.bfloat16)       # DALI has no bfloat16: fp16 out of DALI, cast on the device
        keep = len(y)
        if self.spec.split == "val" and index == plan.batches - 1:
            keep = plan.num_samples - index * self.spec.batch_size   # trim the reader's padding
        rows = None
        if self._drop:                     # only then look at source_info (host strings)
            names = [_source_name(sources.at(i)) for i in range(keep)]
            rows = [i for i, name in enumerate(names) if name not in self._drop]
            if len(rows) == keep:
                rows = None
            else:
                seen = set(self.skipped)
                self.skipped += [n for n in dict.fromkeys(names) if n in self._drop and n not in seen]
        if rows is not None:
            index_t = torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True)
            x, y = x.index_select(0, index_t), y.index_select(0, index_t)
        elif keep < len(y):
            x, y = x[:keep], y[:keep]
        if self.with_params:               # tests: "<tar>:<key>" and (crop_x, crop_y, mirror, alpha) per row
            rows = rows if rows is not None else range(keep)
            params = tuple(np.stack([np.asarray(t.at(i)) for i in rows]) for t in outputs[3:])
            return x, y, [_source_name(sources.at(i)) for i in rows], params
        return x, y

    # -- corrupt samples ----------------------------------------------------------------------
    def _locate_corrupt(self, plan: EpochPlan, failed_batch: int, error: RuntimeError) -> None:
        from alexnet_fast.pipeline import dali_pipelines as dp

        # The failing batch is the one asked for or one the executor had prefetched behind it.
        last = min(plan.batches, failed_batch + self.spec.prefetch + 1)
        replay = dp.replay_reader_pipeline(self._reader_config(plan), batch_size=self.spec.batch_size,
                                           num_threads=1, device_id=None, seed=plan.seed)
        replay.build()
        candidates: dict[str, np.ndarray] = {}
        for batch in range(last):
            jpgs, sources = replay.run()
            if batch >= failed_batch:
                for i in range(len(jpgs)):
                    candidates.setdefault(_source_name(sources.at(i)), np.asarray(jpgs.at(i)))
        del replay
        candidates = {name: data for name, data in candidates.items() if name not in self._drop}
        cpu = DecodeCheck(device_id=None)
        bad = [name for name, data in candidates.items() if not cpu.decodes(data)]
        if not bad and self.spec.device == "cuda":
            # nvJPEG / the hardware decoder may refuse a JPEG libjpeg-turbo accepts: ask the GPU
            # decoder itself. If it refuses every candidate, the fault is not in the data.
            gpu = DecodeCheck(device_id=self.spec.device_id)
            gpu_bad = [name for name, data in candidates.items() if not gpu.decodes(data)]
            bad = gpu_bad if len(gpu_bad) < len(candidates) else []
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
        self.exclude([name])
        self.skipped.append(name)

    def _work_around(self, damage: ShardDamage) -> None:
        """on_corrupt="skip" and a shard missing its .idx or its tail: rebuild the index from the
        tar, point the lost samples at a donor, drop them from batches (see index_patches.py)."""
        shard = damage.shard
        if damage.index_missing:
            rows = index_from_tar(shard.tar)
            if len(rows) > shard.samples or (len(rows) < shard.samples and not damage.cut_short):
                raise CorruptSampleError(f"shard {shard.tar} holds {len(rows)} samples, the manifest says "
                                         f"{shard.samples}: re-make that shard")
            template = rows[0] if rows else ["jpg", "0", "0", "x.jpg"]
            placeholders = [f"lost{n}" for n in range(shard.samples - len(rows))]   # keep the sample count
            rows += [[f for i in range(0, len(template), 4) for f in (template[i], "0", "0", f"{key}.{template[i]}")]
                     for key in placeholders]
            header = f"v1.2 {shard.samples}"
        else:
            header, rows = read_index(shard.index)
            placeholders = []
        lost = {row_key(r) for r in rows if not row_fits(r, damage.tar_size)} | set(placeholders)
        try:        # (no lost sample: only the index was missing, the rebuilt one is written as it is)
            self._leave_out(shard, header, rows, lost)
        except LookupError:
            raise CorruptSampleError(f"{damage.describe()}, with no intact sample left: re-make that shard") from None
        what = "rebuilt from the tar" if damage.index_missing else ""
        self.notes.append(f"{damage.describe()}: " + ", ".join(filter(None, [
            what, f"{len(lost)} lost sample(s) skipped" if lost else ""])))

    def exclude(self, names: list[str]) -> None:
        """Leave these samples ("<tar>:<key>") out from now on, skipped and counted when their rows
        are dropped (the samples `train --verify-shards` found changed since make_shards): each
        points at another sample of its tar in a patched index copy."""
        by_tar: dict[str, set[str]] = {}
        for name in names:
            tar, key = name.rsplit(":", 1)
            by_tar.setdefault(tar, set()).add(key)
        for shard in self.shard_set.shards(self.spec.split):
            keys = by_tar.get(str(shard.tar))
            if keys:
                header, rows = self._patches.rows(shard.tar, shard.index)
                try:
                    self._leave_out(shard, header, rows, keys)
                except LookupError:
                    raise CorruptSampleError(f"every sample of shard {shard.tar} is damaged or corrupt: "
                                             f"re-make that shard") from None

    def _leave_out(self, shard: ShardFile, header: str, rows: list[Row], keys: set[str]) -> None:
        self._patches.redirect(shard.tar, header, rows, keys)
        names = {f"{shard.tar}:{key}" for key in keys}
        self._drop |= names
        self._drop_rows.setdefault(str(shard.tar), set()).update(i for i, r in enumerate(rows) if row_key(r) in keys)

    def _dropped_in_range(self) -> int:
        """Val: how many of the dropped samples fall into this rank's part (manifest order)."""
        count, offset = 0, 0
        for shard in self._plan.shards:
            rows = self._drop_rows.get(str(shard.tar), ())
            count += sum(self._plan.start <= offset + i < self._plan.stop for i in rows)
            offset += shard.samples
        return count


def _source_name(info) -> str:
    """'<tar>:<offset>:<key>.jpg' (DALI source_info) -> '<tar>:<key>'."""
    text = bytes(np.asarray(info)).decode()
    tar, _offset, member = text.rsplit(":", 2)
    return f"{tar}:{member.split('.', 1)[0]}"


class DecodeCheck:
    """Whether DALI decodes given JPEG bytes, one sample at a time: with its CPU decoder, or with
    `device_id` the mixed (GPU) decoder the train pipeline uses. One pipeline serves every sample
    that decodes; a failure leaves it unusable, so the next sample gets a new one."""

    def __init__(self, device_id: int | None) -> None:
        self.device_id = device_id
        self._pipe = None

    def decodes(self, data: np.ndarray) -> bool:
        from alexnet_fast.pipeline.dali_pipelines import decode_check_pipeline

        if self._pipe is None:
            self._pipe = decode_check_pipeline(
                on_gpu=self.device_id is not None, batch_size=1, num_threads=1, device_id=self.device_id,
                prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
            self._pipe.build()
        self._pipe.feed_input("jpg", [data])
        try:
            self._pipe.run()
            return True
        except RuntimeError:
            self._pipe = None
            return False


def _dali_to_torch(batch, device: torch.device, borrow: bool = False) -> torch.Tensor:
    """A dense DALI batch as a torch tensor on `device`: a new tensor (device-to-device copy on the
    GPU), or on the CPU with `borrow` a zero-copy view valid until the pipeline runs again."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    dense = batch.as_tensor()
    if device.type == "cpu":
        if borrow:
            return torch.from_numpy(np.asarray(dense))
        # A zero-copy NumPy view of DALI's buffer (recycled by the next run), then one copy by
        # torch's multi-threaded kernel: ~4x faster than feed_ndarray's single memmove here.
        return torch.from_numpy(np.asarray(dense)).clone()
    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
    return out
