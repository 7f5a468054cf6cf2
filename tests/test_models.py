"""Backbone registry (parametrised over every entry, tiny inputs), heads and name checks."""

import pytest
import torch

from ressl.models import BACKBONES, Predictor, ProjectionHead, build_backbone, build_model, check_backbone_name
from ressl.splitbn import SplitBatchNorm2d, bn_splits, convert_split_batchnorm


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_registry_backbone_is_headless_with_discovered_width(name):
    torch.manual_seed(0)
    net, feat = build_backbone(name)
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, feat)
    assert feat == {"resnet18_cifar": 512, "resnet50_cifar": 2048, "resnet18": 512, "resnet50": 2048,
                    "resnet18_w32": 256, "efficientnet_b0": 1280, "mobilenet_v3_large": 960}[name]
    assert not any(isinstance(m, torch.nn.Dropout) for m in net.modules())  # classifier dropout removed too
    full = build_model(name)
    assert set(net.state_dict()) <= set(full.state_dict())


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_registry_backbone_takes_split_batchnorm_with_the_plain_state_dict(name):
    """Every BatchNorm becomes a split layer, the torchvision-built model loads the result (strict), and a
    training forward with 2 splits equals plain forwards of the two groups (rows 0, 2, ... and 1, 3, ...)."""
    torch.manual_seed(0)
    full = build_model(name)
    shapes = {k: v.shape for k, v in full.state_dict().items()}
    convert_split_batchnorm(full)
    assert not any(type(m) in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d) for m in full.modules())
    assert {k: v.shape for k, v in full.state_dict().items()} == shapes
    build_model(name).load_state_dict(full.state_dict())
    net, _ = build_backbone(name)
    convert_split_batchnorm(net).double()  # float64: BN over 4 images at 1x1 is ill-conditioned in float32
    net.eval()  # stochastic depth off; BatchNorm alone in training mode
    for m in net.modules():
        if isinstance(m, SplitBatchNorm2d):
            m.train()
    a, b = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.randn(4, 3, 16, 16, dtype=torch.float64) * 2 + 1
    with torch.no_grad():
        with bn_splits(net, 2):
            y = net(torch.stack([a, b], dim=1).flatten(0, 1))
        torch.testing.assert_close(y[0::2], net(a), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(y[1::2], net(b), rtol=1e-9, atol=1e-9)


def test_cifar_stem_keeps_resolution():
    net, _ = build_backbone("resnet18_cifar")
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)
    stem = net.relu(net.bn1(net.conv1(torch.randn(1, 3, 32, 32))))
    assert net.layer1(net.maxpool(stem)).shape[-1] == 32


def test_narrow_resnet18_widths_stem_and_init():
    torch.manual_seed(0)
    net, feat = build_backbone("resnet18_w32")
    widths = [net.conv1.out_channels] + [getattr(net, f"layer{i}")[-1].conv2.out_channels for i in range(1, 5)]
    assert widths == [32, 32, 64, 128, 256] and feat == 256
    assert net.conv1.stride == (2, 2) and isinstance(net.maxpool, torch.nn.Identity)
    stem = net.relu(net.bn1(net.conv1(torch.randn(1, 3, 32, 32))))
    assert net.layer1(stem).shape[-2:] == (16, 16)  # twice the ImageNet stem's 8 x 8 at 32 px
    assert 2.7e6 < sum(p.numel() for p in net.parameters()) < 2.9e6  # resnet18: 11.2 M without fc
    # torchvision's ResNet init (kaiming fan_out), not PyTorch's default uniform conv init
    w = net.layer4[0].conv1.weight
    assert abs(w.std().item() - (2 / (w.shape[0] * 9)) ** 0.5) < 0.1 * (2 / (w.shape[0] * 9)) ** 0.5


def test_any_torchvision_classifier_name_is_accepted():
    check_backbone_name("regnet_x_400mf")
    net, feat = build_backbone("regnet_x_400mf")
    assert net.eval()(torch.randn(1, 3, 32, 32)).shape == (1, feat)


@pytest.mark.parametrize("bad", ["resnet_999", "squeezenet1_0", ""])
def test_unknown_name_is_a_clear_key_error(bad):
    with pytest.raises(KeyError, match="unknown backbone"):
        check_backbone_name(bad)
    with pytest.raises(KeyError, match="registered"):
        build_backbone(bad)


def test_heads():
    head = ProjectionHead(16, 32, 8)
    assert head(torch.randn(4, 16)).shape == (4, 8)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in head.modules())
    pred = Predictor(8, 12)
    assert pred(torch.randn(4, 8)).shape == (4, 8)
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in pred.modules())
