"""Which sample of a failed DALI batch is the corrupt JPEG.

DALI reports only "nvImageCodec failure" for a batch, not which sample. `find_corrupt` replays the
reader alone (same config and seed, so the same order, no decoding) over the failed batch and the
ones prefetched behind it, and decodes each candidate on its own with DALI's CPU decoder -- on a
GPU run, if all of them decode there, with the GPU decoder too (nvJPEG / the hardware decoder may
refuse a JPEG libjpeg-turbo accepts). What to do with the names (stop, or leave them out) is the
loader's call.
"""
from __future__ import annotations

from typing import Container

import numpy as np

from alexnet_fast.pipeline import dali_pipelines as dp


def source_name(info) -> str:
    """'<tar>:<offset>:<key>.jpg' (DALI source_info) -> '<tar>:<key>'."""
    text = bytes(np.asarray(info)).decode()
    tar, _offset, member = text.rsplit(":", 2)
    return f"{tar}:{member.split('.', 1)[0]}"


def find_corrupt(reader: dp.ReaderConfig, *, batch_size: int, seed: int, first: int, stop: int,
                 known: Container[str] = (), device_id: int | None = None) -> list[str]:
    """"<tar>:<key>" of the samples in batches [first, stop) of `reader` that do not decode, leaving
    aside those in `known` (already left out). On the CPU decoder; if every candidate decodes there
    and `device_id` is given, on that GPU's decoder, unless it refuses every candidate (then the
    fault is not in the data). Empty: no sample is to blame."""
    replay = dp.replay_reader_pipeline(reader, batch_size=batch_size, num_threads=1, device_id=None, seed=seed)
    replay.build()
    candidates: dict[str, np.ndarray] = {}
    for batch in range(stop):
        jpgs, sources = replay.run()
        if batch >= first:
            for i in range(len(jpgs)):
                candidates.setdefault(source_name(sources.at(i)), np.asarray(jpgs.at(i)))
    del replay
    candidates = {name: data for name, data in candidates.items() if name not in known}
    cpu = DecodeCheck(device_id=None)
    bad = [name for name, data in candidates.items() if not cpu.decodes(data)]
    if not bad and device_id is not None:
        gpu = DecodeCheck(device_id=device_id)
        gpu_bad = [name for name, data in candidates.items() if not gpu.decodes(data)]
        bad = gpu_bad if len(gpu_bad) < len(candidates) else []
    return bad


class DecodeCheck:
    """Whether DALI decodes given JPEG bytes, one sample at a time: with its CPU decoder, or with
    `device_id` the mixed (GPU) decoder the train pipeline uses. One pipeline serves every sample
    that decodes; a failure leaves it unusable, so the next sample gets a new one."""

    def __init__(self, device_id: int | None) -> None:
        self.device_id = device_id
        self._pipe = None

    def decodes(self, data: np.ndarray) -> bool:
        if self._pipe is None:
            self._pipe = dp.decode_check_pipeline(
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
