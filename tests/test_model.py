"""The networks: shapes, parameter counts, the paper's and Caffe's LRN, every named init's per-layer
statistics, torchvision's key layout, and that each can fit a small batch."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from alexnet_fast.model.alexnet import AlexNet2012, build_model, count_parameters, resolve_init
from alexnet_fast.model.config import TrainConfig
from alexnet_fast.model.optim import make_optimizer
from alexnet_fast.model.loop import Engine, TrainState, train_one_epoch

# Parameters of the paper's network, layer by layer (weights + biases), for 1000 classes:
PAPER_PARAMS = {
    "conv1": 96 * 3 * 11 * 11 + 96,            # 34,944
    "conv2": 256 * (96 // 2) * 5 * 5 + 256,    # 307,456   (groups=2: each kernel sees 48 maps)
    "conv3": 384 * 256 * 3 * 3 + 384,          # 885,120   (sees both columns)
    "conv4": 384 * (384 // 2) * 3 * 3 + 384,   # 663,936
    "conv5": 256 * (384 // 2) * 3 * 3 + 256,   # 442,624
    "fc6": 4096 * 256 * 6 * 6 + 4096,          # 37,752,832
    "fc7": 4096 * 4096 + 4096,                 # 16,781,312
    "fc8": 1000 * 4096 + 1000,                 # 4,097,000
}

# torchvision.models.alexnet's state_dict (torchvision/models/alexnet.py), for 1000 classes.
TORCHVISION_ALEXNET_STATE = [
    ("features.0.weight", (64, 3, 11, 11)), ("features.0.bias", (64,)),
    ("features.3.weight", (192, 64, 5, 5)), ("features.3.bias", (192,)),
    ("features.6.weight", (384, 192, 3, 3)), ("features.6.bias", (384,)),
    ("features.8.weight", (256, 384, 3, 3)), ("features.8.bias", (256,)),
    ("features.10.weight", (256, 256, 3, 3)), ("features.10.bias", (256,)),
    ("classifier.1.weight", (4096, 9216)), ("classifier.1.bias", (4096,)),
    ("classifier.4.weight", (4096, 4096)), ("classifier.4.bias", (4096,)),
    ("classifier.6.weight", (1000, 4096)), ("classifier.6.bias", (1000,)),
]


def test_paper_network_parameter_count():
    assert sum(PAPER_PARAMS.values()) == 60_965_224
    assert count_parameters(build_model("alexnet2012", 1000)) == 60_965_224
    # a different head changes only fc8
    assert count_parameters(build_model("alexnet2012", 10)) == 60_965_224 - 4_097_000 + (10 * 4096 + 10)


def test_paper_network_feature_map_sizes():
    model = build_model("alexnet2012", 1000).eval()
    x = torch.zeros(1, 3, 227, 227)
    shapes = []
    with torch.no_grad():
        for layer in model.features:
            x = layer(x)
            if isinstance(layer, (nn.Conv2d, nn.MaxPool2d)):
                shapes.append(tuple(x.shape[1:]))
        assert model(torch.zeros(2, 3, 227, 227)).shape == (2, 1000)
    assert shapes == [
        (96, 55, 55),     # conv1
        (96, 27, 27),     # pool1
        (256, 27, 27),    # conv2
        (256, 13, 13),    # pool2
        (384, 13, 13),    # conv3
        (384, 13, 13),    # conv4
        (256, 13, 13),    # conv5
        (256, 6, 6),      # pool5 -> 9216 inputs to fc6
    ]


def test_paper_network_groups_and_layers():
    model = build_model("alexnet2012", 1000)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.groups for c in convs] == [1, 2, 1, 2, 2]
    assert [(c.kernel_size, c.stride, c.padding) for c in convs] == [
        ((11, 11), (4, 4), (0, 0)), ((5, 5), (1, 1), (2, 2)), ((3, 3), (1, 1), (1, 1)),
        ((3, 3), (1, 1), (1, 1)), ((3, 3), (1, 1), (1, 1))]
    pools = [m for m in model.features if isinstance(m, nn.MaxPool2d)]
    assert [(p.kernel_size, p.stride) for p in pools] == [(3, 2)] * 3      # overlapping pooling
    dropouts = [m.p for m in model.classifier if isinstance(m, nn.Dropout)]
    assert dropouts == [0.5, 0.5]
    assert [type(m).__name__ for m in model.classifier] == [
        "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]


def test_lrn_is_the_papers_formula():
    """b_i = a_i / (k + alpha * sum_{j=i-2}^{i+2} a_j^2)^beta with k=2, alpha=1e-4, beta=0.75."""
    model = build_model("alexnet2012", 10)
    lrn = model.features[2]
    assert isinstance(lrn, nn.LocalResponseNorm)
    a = torch.randn(2, 96, 5, 5, dtype=torch.float64) * 30     # large enough that alpha matters
    squares = a.pow(2)
    window_sums = torch.stack([squares[:, max(0, i - 2):min(96, i + 3)].sum(dim=1) for i in range(96)], dim=1)
    expected = a / (2.0 + 1e-4 * window_sums).pow(0.75)
    assert torch.allclose(lrn(a), expected, rtol=1e-10, atol=0)


def test_paper_init():
    torch.manual_seed(0)
    model = AlexNet2012(1000)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    fcs = [m for m in model.classifier if isinstance(m, nn.Linear)]
    for layer in convs + fcs:
        assert layer.weight.mean().abs() < 1e-3
        assert layer.weight.std().item() == pytest.approx(0.01, rel=0.05)
    ones = [convs[1], convs[3], convs[4], fcs[0], fcs[1]]
    zeros = [convs[0], convs[2], fcs[2]]
    assert all(torch.all(layer.bias == 1) for layer in ones)
    assert all(torch.all(layer.bias == 0) for layer in zeros)


def _convs_and_fcs(model):
    return ([m for m in model.modules() if isinstance(m, nn.Conv2d)],
            [m for m in model.modules() if isinstance(m, nn.Linear)])


def _fan_in(layer) -> int:
    return layer.weight[0].numel()          # in_channels/groups * kernel area, or in_features


# Per layer (conv1..conv5, fc6, fc7, fc8): weight std and the constant bias, as each source states.
GAUSSIAN_INITS = {
    # the paper, sec. 5
    "paper": ([0.01] * 8, [0, 1, 0, 1, 1, 1, 1, 0]),
    # BVLC models/bvlc_alexnet/train_val.prototxt weight_filler / bias_filler
    "bvlc": ([0.01] * 5 + [0.005, 0.005, 0.01], [0, 0.1, 0, 0.1, 0.1, 0.1, 0.1, 0]),
}


@pytest.mark.parametrize("arch", ["alexnet2012", "alexnet-owt"])
@pytest.mark.parametrize("init", ["paper", "bvlc"])
def test_gaussian_inits_per_layer(init, arch):
    torch.manual_seed(0)
    convs, fcs = _convs_and_fcs(build_model(arch, 1000, init=init))
    stds, biases = GAUSSIAN_INITS[init]
    for layer, std, bias in zip(convs + fcs, stds, biases):
        tolerance = 6 / math.sqrt(layer.weight.numel())            # ~6 standard errors of the sample std
        assert layer.weight.mean().abs() < 6 * std / math.sqrt(layer.weight.numel())
        assert layer.weight.std().item() == pytest.approx(std, rel=tolerance)
        assert torch.all(layer.bias == bias)


@pytest.mark.parametrize("arch", ["alexnet2012", "alexnet-owt"])
def test_torch_init_per_layer(arch):
    """torch's layer defaults: weight and bias ~ U(-b, b), b = 1/sqrt(fan_in) (kaiming_uniform_ with
    a=sqrt(5)), fan_in counting only the maps a grouped kernel sees."""
    torch.manual_seed(0)
    convs, fcs = _convs_and_fcs(build_model(arch, 1000, init="torch"))
    for layer in convs + fcs:
        bound = 1 / math.sqrt(_fan_in(layer))
        for tensor in (layer.weight, layer.bias):
            assert tensor.abs().max().item() <= bound
            assert tensor.std().item() == pytest.approx(bound / math.sqrt(3), rel=8 / math.sqrt(tensor.numel()))
        assert layer.weight.abs().max().item() > 0.99 * bound     # the whole range is used


@pytest.mark.parametrize("arch", ["alexnet2012", "alexnet-bvlc", "alexnet-owt"])
def test_kaiming_init_per_layer(arch):
    """He-normal std sqrt(2/fan_in), zero biases, an all-zero output layer."""
    torch.manual_seed(0)
    convs, fcs = _convs_and_fcs(build_model(arch, 1000, init="kaiming"))
    for layer in convs + fcs[:2]:
        std = math.sqrt(2 / _fan_in(layer))
        assert layer.weight.std().item() == pytest.approx(std, rel=6 / math.sqrt(layer.weight.numel()))
        assert torch.all(layer.bias == 0)
    assert torch.all(fcs[2].weight == 0) and torch.all(fcs[2].bias == 0)


def test_default_init_is_the_networks_own():
    """init="default" (checkpoints from before the named inits) draws what the named init draws."""
    for arch, own in (("alexnet2012", "paper"), ("alexnet-bvlc", "bvlc"), ("alexnet-owt", "torch")):
        assert resolve_init(arch, "default").value == own
        torch.manual_seed(1)
        by_default = build_model(arch, 10, init="default").state_dict()
        torch.manual_seed(1)
        by_name = build_model(arch, 10, init=own).state_dict()
        assert all(torch.equal(by_default[k], by_name[k]) for k in by_default)
    with pytest.raises(ValueError, match="paper, bvlc, torch, kaiming, default"):
        build_model("alexnet2012", 10, init="xavier")


def test_bvlc_network_is_the_papers_with_caffes_lrn():
    """models/bvlc_alexnet/train_val.prototxt: conv1 relu1 norm1 pool1 conv2 relu2 norm2 pool2 conv3
    relu3 conv4 relu4 conv5 relu5 pool5 fc6 relu6 drop6 fc7 relu7 drop7 fc8: the paper's order,
    kernels and groups, so the same parameter count; only the LRN constants differ."""
    bvlc, paper = build_model("alexnet-bvlc", 1000), build_model("alexnet2012", 1000)
    assert count_parameters(bvlc) == 60_965_224
    assert [type(m).__name__ for m in bvlc.features] == [
        "Conv2d", "ReLU", "LocalResponseNorm", "MaxPool2d", "Conv2d", "ReLU", "LocalResponseNorm", "MaxPool2d",
        "Conv2d", "ReLU", "Conv2d", "ReLU", "Conv2d", "ReLU", "MaxPool2d"]
    assert [type(m).__name__ for m in bvlc.classifier] == [type(m).__name__ for m in paper.classifier]
    assert [(tuple(v.shape)) for v in bvlc.state_dict().values()] == \
        [(tuple(v.shape)) for v in paper.state_dict().values()]
    # Caffe (src/caffe/layers/lrn_layer.cpp): b = a / (k + alpha/n * sum a^2)^beta, k = 1 by default
    a = torch.randn(2, 96, 5, 5, dtype=torch.float64) * 100
    squares = a.pow(2)
    window_sums = torch.stack([squares[:, max(0, i - 2):min(96, i + 3)].sum(dim=1) for i in range(96)], dim=1)
    for lrn in (bvlc.features[2], bvlc.features[6]):
        assert torch.allclose(lrn(a), a / (1.0 + 1e-4 / 5 * window_sums).pow(0.75), rtol=1e-10, atol=0)
    assert not torch.allclose(bvlc.features[2](a), paper.features[2](a))


def test_owt_matches_torchvision_state_dict():
    model = build_model("alexnet-owt", 1000)
    state = model.state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == TORCHVISION_ALEXNET_STATE
    assert count_parameters(model) == 61_100_840
    # a torchvision-layout state dict loads strictly, and ours round-trips into a fresh model
    fresh = build_model("alexnet-owt", 1000)
    fresh.load_state_dict({k: torch.full(shape, 0.5) for k, shape in TORCHVISION_ALEXNET_STATE}, strict=True)
    assert torch.all(fresh.classifier[6].bias == 0.5)
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, 3, 224, 224)), model(torch.zeros(1, 3, 227, 227))
    assert [tuple(o.shape) for o in out] == [(1, 1000), (1, 1000)]


def test_build_model_rejects_unknown_arch_and_bad_class_count():
    with pytest.raises(ValueError, match="alexnet2012, alexnet-owt"):
        build_model("resnet50", 10)
    with pytest.raises(ValueError):
        build_model("alexnet2012", 0)


@pytest.mark.slow
@pytest.mark.parametrize("arch,lr", [("alexnet-owt", 0.0005), ("alexnet2012", 0.002)])
def test_loss_falls_overfitting_a_small_batch(arch, lr):
    """Both architectures (LRN, grouped convs, pooling, dropout-free FC) pass gradients well enough
    to memorize four random images. The weights are re-drawn He-normal first: the paper's init
    (N(0, 0.01), bias 1) was tuned for mean-subtracted 0..255 pixels, and on unit-variance input the
    bias-1 layers drown the image signal, so in a test's few steps that net learns only the label
    prior (loss -> log 4) — as does torch's default init behind LRN. test_paper_init pins the init.
    The output layer starts at zero (loss exactly log 4) so a momentum-SGD overshoot on a 4-image
    batch does not swamp the first steps; owt, without LRN, needs the smaller lr."""
    torch.manual_seed(0)
    model = build_model(arch, 4, dropout=0.0, init="kaiming")
    assert torch.all(model.classifier[-1].weight == 0)
    images = torch.randn(4, 3, 227, 227, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(4)
    cfg = TrainConfig(arch=arch, lr=lr, weight_decay=0.0)
    engine = Engine(model, make_optimizer(cfg, model), torch.amp.GradScaler("cpu", enabled=False), None,
                    torch.device("cpu"))
    result = train_one_epoch(engine, [(images, labels)] * 20, TrainState(), log_every=1)
    # Well below log(4) = 1.386: the network tells the four images apart, not just the prior.
    assert result.losses[0] == pytest.approx(math.log(4), abs=1e-4)
    assert min(result.losses[-3:]) < 0.5, result.losses


def test_paper_init_needs_the_papers_raw_scale_input(shard_set):
    """Why --normalize auto picks the paper's centred raw RGB for alexnet2012 with its own init: on
    unit-variance input the image signal drowns in the bias-1 layers (the images' differences reach
    the penultimate layer at ~1e-4 of what they share); on raw-scale input far more of it survives.
    He init, made for unit variance, does not care. Real val images through the real loader."""
    from alexnet_fast.model.config import input_scaled_by_std
    from alexnet_fast.pipeline.loaders import LoaderSpec, make_loader

    def spread(init, scale_by_std):
        images, _ = next(iter(make_loader(LoaderSpec(data=str(shard_set), split="val", batch_size=16, workers=1,
                                                     scale_by_std=scale_by_std))))
        torch.manual_seed(0)
        net = build_model("alexnet2012", 4, dropout=0.0, init=init).eval()
        with torch.no_grad():
            h = net.classifier[:-1](net.features(images).flatten(1))
        return float((h - h.mean(0)).norm(dim=1).mean() / h.mean(0).norm())

    assert spread("default", False) > 20 * spread("default", True)
    assert spread("kaiming", True) > 0.05
    assert input_scaled_by_std("alexnet2012", "default", "auto") is False
    assert input_scaled_by_std("alexnet2012", "kaiming", "auto") is True
    assert input_scaled_by_std("alexnet-owt", "default", "auto") is True
    assert input_scaled_by_std("alexnet2012", "default", "mean-std") is True
    # the named inits: paper's and BVLC's were made for the raw scale, on any network
    assert [input_scaled_by_std(arch, init, "auto") for arch, init in (
        ("alexnet-owt", "paper"), ("alexnet2012", "bvlc"), ("alexnet-bvlc", "default"), ("alexnet2012", "torch"))] \
        == [False, False, False, True]
