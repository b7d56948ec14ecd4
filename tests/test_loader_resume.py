"""Resuming a loader mid-epoch (what `train --resume` does after a mid-epoch checkpoint): the
batches after the resume point equal the uninterrupted epoch's, bit for bit, whether the DALI
loader restores its pipeline checkpoint or replays the epoch, and for the baseline loader."""
from __future__ import annotations

import pickle

import pytest
import torch

from alexnet_fast.pipeline.loaders import LoaderSpec, make_loader

EPOCH, STOP_AFTER = 1, 3          # stop after 3 of the epoch's 8 batches of 8 (68 train samples)


def _loader(shard_set, **kw):
    return make_loader(LoaderSpec(data=str(shard_set), split="train", batch_size=8, seed=5, workers=1, **kw))


def _batches(loader, count=None):
    out = []
    for images, labels in loader:
        out.append((images.clone(), labels.clone()))
        if count is not None and len(out) == count:
            break
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb)
        assert torch.equal(xa, xb)


@pytest.fixture(scope="module")
def interrupted(shard_set):
    """The uninterrupted epoch's batches, and the DALI state_dict taken after STOP_AFTER of them
    (pickled and back, as a checkpoint file would carry it)."""
    loader = _loader(shard_set)
    loader.set_epoch(EPOCH)
    full = _batches(loader)
    stopped = _loader(shard_set)
    stopped.set_epoch(EPOCH)
    head = _batches(stopped, STOP_AFTER)          # the consumer stops here (SIGTERM, --ckpt-every)
    _assert_same(head, full[:STOP_AFTER])
    state = pickle.loads(pickle.dumps(stopped.state_dict()))
    return full, state


def test_dali_state_dict_holds_the_position_and_a_pipeline_checkpoint(interrupted):
    _, state = interrupted
    assert (state["kind"], state["epoch"], state["batches"]) == ("dali", EPOCH, STOP_AFTER)
    assert state["dali"]                          # DALI's serialized pipeline state


def test_dali_resume_from_its_checkpoint_continues_with_the_same_batches(shard_set, interrupted):
    full, state = interrupted
    resumed = _loader(shard_set)
    assert resumed.resume(EPOCH, STOP_AFTER, state) is True
    assert len(resumed) == len(full)
    _assert_same(_batches(resumed), full[STOP_AFTER:])
    resumed.set_epoch(EPOCH)                      # the next set_epoch starts the epoch from its first batch again
    _assert_same(_batches(resumed, 2), full[:2])


def test_dali_resume_without_a_usable_state_replays_to_the_same_batches(shard_set, interrupted):
    full, state = interrupted
    other_world = {**state, "fingerprint": {**state["fingerprint"], "world_size": 2}}
    for given in (None, other_world, {**state, "batches": STOP_AFTER - 1}):
        resumed = _loader(shard_set)
        assert resumed.resume(EPOCH, STOP_AFTER, given) is False
        _assert_same(_batches(resumed), full[STOP_AFTER:])


def test_baseline_resume_replays_to_the_same_batches(shard_set):
    loader = _loader(shard_set, kind="baseline")
    loader.set_epoch(EPOCH)
    full = _batches(loader)
    assert loader.state_dict() == {"kind": "baseline", "epoch": EPOCH, "batches": len(full)}
    assert loader.resume(EPOCH, STOP_AFTER) is False
    _assert_same(_batches(loader), full[STOP_AFTER:])


def test_resume_past_the_end_of_the_epoch_is_refused(shard_set):
    loader = _loader(shard_set)
    with pytest.raises(ValueError, match="cannot resume at batch 99"):
        loader.resume(0, 99)
