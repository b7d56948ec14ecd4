"""Evaluation: ten-crop averaging, whole-split counting, and `alexnet-fast eval` on a checkpoint."""
from __future__ import annotations

import json

import pytest
import torch

from alexnet_fast.model import checkpoint as ckpt
from alexnet_fast.model.alexnet import build_model
from alexnet_fast.model.evaluate import class_scores, evaluate
from alexnet_fast.pipeline.loaders import LoaderSpec, make_loader
from alexnet_fast.pipeline.shardset import ShardSet
from alexnet_fast.tools.cli import main, run_command


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("alexnet-owt", 4).eval()


def test_ten_crop_scores_average_the_softmax_of_the_ten_views(model):
    crops = torch.randn(2, 10, 3, 227, 227, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scores = class_scores(model, crops)
        by_hand = torch.stack([model(crops[i]).softmax(dim=1).mean(dim=0) for i in range(2)])
    assert scores.shape == (2, 4)
    assert torch.allclose(scores, by_hand, atol=1e-6)
    assert torch.allclose(scores.sum(dim=1), torch.ones(2))


def test_ten_crop_evaluation_covers_the_val_split_once(model, shard_set):
    total = ShardSet.open(shard_set).num_samples("val")
    ten = make_loader(LoaderSpec(data=str(shard_set), split="val", batch_size=6, ten_crop=True, workers=1))
    first = next(iter(ten))[0]
    assert first.shape == (6, 10, 3, 227, 227)
    result = evaluate(model, ten)
    assert result.images == total
    assert 0.0 <= result.top1 <= result.top5 <= 1.0
    # with 4 classes every label is in the top 5
    assert result.top5 == 1.0


def test_eval_command_reports_the_checkpoint_accuracy_as_json(model, shard_set, tmp_path, capsys):
    """The CLI loads the checkpoint's weights and scores the whole val split: its numbers must be
    those of evaluate() on the same weights, and a model that is wrong on purpose scores 0."""
    shards = ShardSet.open(shard_set)
    ckpt.save_checkpoint({"model": model.state_dict(), "epoch": 1, "step": 10, "arch": "alexnet-owt",
                          "num_classes": 4}, tmp_path)
    with pytest.raises(SystemExit) as done:
        run_command(main, "alexnet-fast", ["eval", "--data", str(shard_set), "--checkpoint", str(tmp_path),
                                           "--json", "--device", "cpu", "--workers", "1"])
    assert done.value.code == 0
    printed = json.loads(capsys.readouterr().out)
    val = make_loader(LoaderSpec(data=str(shard_set), split="val", batch_size=7, workers=1))
    assert printed == evaluate(model, val).as_dict()
    assert printed["images"] == shards.num_samples("val")

    # A model whose output ignores the image and always says "class 0": top-1 = share of class 0.
    fixed = build_model("alexnet-owt", 4)
    with torch.no_grad():
        head = fixed.classifier[6]
        head.weight.zero_()
        head.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))
    labels = [int(label) for _, batch in val for label in batch]
    assert evaluate(fixed, val).top1 == pytest.approx(labels.count(0) / len(labels))
