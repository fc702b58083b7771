"""Classifiers: registry, conv-large as paper Table 1 / vat_tf cnn.py, init, BatchNorm behaviour."""

import math

import pytest
import torch
from torch import nn

from lvat.models import CLASSIFIERS, ConvLarge, ConvSmall, build_classifier, register_classifier
from lvat.models.classifiers import CONV_SMALL_WIDTHS

pytestmark = pytest.mark.numerics


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_registry_has_paper_and_cpu_models() -> None:
    assert {"conv-large", "conv-small"} <= set(CLASSIFIERS)
    assert isinstance(build_classifier("conv-large", 3, 10), ConvLarge)
    assert isinstance(build_classifier("conv-small", 1, 10), ConvSmall)


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 29, 31)])
@pytest.mark.parametrize("train", [True, False])
def test_every_classifier_gives_logits(name: str, shape: tuple[int, int, int], train: bool) -> None:
    c = shape[0]
    model = build_classifier(name, in_channels=c, num_classes=7, top_bn=True).train(train)
    logits = model(torch.rand(3, *shape))
    assert logits.shape == (3, 7)
    assert torch.isfinite(logits).all()


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="conv-large.*conv-small"):
        build_classifier("resnet-9000", 3, 10)


def test_register_classifier_adds_and_refuses_duplicates() -> None:
    name = "test-tiny"
    try:

        @register_classifier(name)
        def tiny(in_channels: int, num_classes: int) -> nn.Module:
            return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

        assert build_classifier(name, 1, 4)(torch.rand(2, 1, 28, 28)).shape == (2, 4)
        with pytest.raises(ValueError, match="already registered"):
            register_classifier(name)(tiny)
    finally:
        CLASSIFIERS.pop(name, None)


def test_conv_large_layers_match_table_1() -> None:
    model = ConvLarge(in_channels=3, num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    got = [(m.in_channels, m.out_channels, m.kernel_size, m.padding) for m in convs]
    same3, valid3, one = (3, 3), (0, 0), (1, 1)
    assert got == [
        (3, 128, same3, (1, 1)),
        (128, 128, same3, (1, 1)),
        (128, 128, same3, (1, 1)),
        (128, 256, same3, (1, 1)),
        (256, 256, same3, (1, 1)),
        (256, 256, same3, (1, 1)),
        (256, 512, same3, valid3),
        (512, 256, one, (0, 0)),
        (256, 128, one, (0, 0)),
    ]
    assert all(m.bias is None and m.stride == (1, 1) for m in convs)

    # Order of layer kinds: conv, BN, lReLU triples; pool + dropout after blocks 1 and 2.
    kinds = [type(m).__name__ for m in model.features]
    block = ["Conv2d", "BatchNorm2d", "LeakyReLU"]
    pool = ["MaxPool2d", "Dropout"]
    assert kinds == block * 3 + pool + block * 3 + pool + block * 3 + [
        "AdaptiveAvgPool2d",
        "Flatten",
    ]
    assert all(m.negative_slope == 0.1 for m in model.modules() if isinstance(m, nn.LeakyReLU))
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert all(m.kernel_size == 2 and m.stride == 2 for m in pools)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert [d.p for d in drops] == [0.5, 0.5]

    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    assert len(bns) == 9
    assert all(b.eps == 1e-6 and b.momentum == 0.01 and b.affine for b in bns)

    fcs = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(fcs) == 1 and (fcs[0].in_features, fcs[0].out_features) == (128, 10)
    assert fcs[0].bias is not None
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.modules())


def test_top_bn_is_batchnorm1d_on_logits_only_when_asked() -> None:
    model = ConvLarge(in_channels=3, num_classes=10, top_bn=True)
    last = list(model.modules())[-1]
    assert isinstance(last, nn.BatchNorm1d) and last.num_features == 10
    assert (last.eps, last.momentum) == (1e-6, 0.01)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 1
    assert isinstance(list(ConvLarge(top_bn=False).modules())[-1], nn.Linear)


def test_conv_small_is_same_topology_narrower() -> None:
    small, large = ConvSmall(1, 10), ConvLarge(1, 10)
    assert [type(m) for m in small.modules()][1:] == [type(m) for m in large.modules()][1:]
    outs = [m.out_channels for m in small.modules() if isinstance(m, nn.Conv2d)]
    w1, w2, w3, w4, w5 = CONV_SMALL_WIDTHS
    assert outs == [w1, w1, w1, w2, w2, w2, w3, w4, w5]


def test_conv_large_parameter_count() -> None:
    convs = (
        3 * 128 * 9  # c1, 3x3, no bias
        + 2 * 128 * 128 * 9  # c2, c3
        + 128 * 256 * 9  # c4
        + 2 * 256 * 256 * 9  # c5, c6
        + 256 * 512 * 9  # c7 (valid)
        + 512 * 256  # c8, 1x1
        + 256 * 128  # c9, 1x1
    )
    bns = 2 * (3 * 128 + 3 * 256 + 512 + 256 + 128)  # gamma + beta per channel
    fc = 128 * 10 + 10
    assert convs + bns + fc == 3_121_802
    model = ConvLarge(in_channels=3, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == convs + bns + fc
    with_top = ConvLarge(in_channels=3, num_classes=10, top_bn=True)
    assert sum(p.numel() for p in with_top.parameters()) == convs + bns + fc + 2 * 10


def test_conv_large_forward_is_1_45_gflop_per_32x32_image() -> None:
    """docs/method.md §3.1: 2 x multiply-adds of convs + fc for one 32x32x3 image."""
    model = ConvLarge(in_channels=3, num_classes=10).eval()
    macs: list[int] = []

    def count(m: nn.Module, inputs: tuple[torch.Tensor], out: torch.Tensor) -> None:
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            macs.append(out.numel() * (m.in_channels // m.groups) * kh * kw)
        else:
            macs.append(out.numel() * m.in_features)

    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            m.register_forward_hook(count)
    with torch.no_grad():
        model(torch.rand(1, 3, 32, 32))
    assert len(macs) == 10
    assert 2 * sum(macs) == pytest.approx(1.45e9, rel=0.05)


def test_he_truncated_normal_init() -> None:
    model = ConvLarge(in_channels=3, num_classes=10, top_bn=True)
    conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][4]  # c5: 256 -> 256, 3x3
    fan_in = 256 * 9
    he_std = math.sqrt(2.0 / fan_in)
    w = conv.weight.detach()
    assert w.mean().abs() < 0.05 * he_std
    assert w.std().item() == pytest.approx(he_std, rel=0.10)
    assert w.abs().max() <= 2 * math.sqrt(1.3 * 2.0 / fan_in) + 1e-7  # truncated at 2 TF-stds
    # A few draws really reach beyond 1.9 TF-stds, so the cut is at 2, not lower.
    assert w.abs().max() > 1.9 * math.sqrt(1.3 * 2.0 / fan_in)

    fc = model.head[0]
    assert fc.weight.std().item() == pytest.approx(math.sqrt(2.0 / 128), rel=0.15)
    assert torch.all(fc.bias == 0)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_batchnorm_running_stats_update_in_train_and_are_used_in_eval() -> None:
    model = ConvSmall(in_channels=1, num_classes=10, top_bn=True)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    x = torch.rand(8, 1, 28, 28)

    model.eval()
    before = model(x[:1]).detach()
    assert all(torch.all(b.running_mean == 0) and torch.all(b.running_var == 1) for b in bns)

    model.train()
    model(x)
    assert all(b.num_batches_tracked.item() == 1 for b in bns)
    assert all(not torch.all(b.running_mean == 0) for b in bns)
    assert all(not torch.all(b.running_var == 1) for b in bns)

    model.eval()
    after = model(x[:1])
    assert not torch.allclose(after, before)  # eval normalises with the updated running stats
    # ... and not with batch statistics: sample 0's logits ignore the rest of the batch.
    # Other batch shapes may take other conv kernels (another summation order): float32
    # rounding, ~1e-6 of the logits after 9 layers; batch statistics would move them by O(1).
    others = torch.cat([x[:1], torch.rand(5, 1, 28, 28) * 3])
    torch.testing.assert_close(model(others)[:1], after, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model(x)[:1], after, rtol=1e-4, atol=1e-4)
