"""Receptive fields: hand-computed chains and the perturbation check on real backbones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from delf_es.model.receptive_field import ConvSpec, compose, level_size, spec_of, tf_same_pad_before
from delf_es.model.registry import get_preset


def test_compose_matches_hand_computed_chain():
    # 3x3 s1 p1 -> 2x2 s2 p0 -> 3x3 s1 p1: size 1+2+1+2*2 = 8, jump 2, start (0) + (0.5)*1 + 0 = 0.5
    rf = compose([ConvSpec(3, 1, 1), ConvSpec(2, 2, 0), ConvSpec(3, 1, 1)])
    assert (rf.size, rf.jump, rf.start) == (8, 2, 0.5)


def test_tf_same_padding_is_asymmetric_for_stride_two():
    assert tf_same_pad_before(3, 2) == 0
    assert tf_same_pad_before(5, 2) == 1
    assert tf_same_pad_before(5, 1) == 2


def test_pointwise_layers_do_not_move_the_window():
    assert spec_of(nn.Conv2d(4, 4, 1)) is None
    assert spec_of(nn.Conv2d(4, 4, 3, stride=2, padding=1)) == ConvSpec(3, 2, 1)


def test_level_size_is_a_positive_multiple():
    assert level_size(100, 32) == 96
    assert level_size(5, 32) == 32
    assert level_size(1000, 16) == 1008


def _perturbation_extent(backbone, size=384, pixel=(250, 170)):
    torch.manual_seed(0)
    image = torch.randn(1, 3, size, size)
    with torch.no_grad():
        before = backbone(image, with_global=False).local
        changed = image.clone()
        changed[0, :, pixel[1], pixel[0]] += 5.0
        after = backbone(changed, with_global=False).local
    moved = (after - before).abs().amax(dim=1)[0] > 0
    rows, cols = torch.nonzero(moved, as_tuple=True)
    return (int(cols.min()), int(cols.max())), (int(rows.min()), int(rows.max())), before.shape[-1]


def _predicted_extent(rf, pixel_coord, cells):
    half = (rf.size - 1) / 2
    inside = [i for i in range(cells) if abs(rf.start + i * rf.jump - pixel_coord) <= half]
    return min(inside), max(inside)


@pytest.mark.parametrize(
    "name,layer",
    [("efficientnet-lite2", "expand"), ("efficientnet-lite2", "block"), ("efficientnet-lite0", "depthwise"), ("mobilenetv2", "expand")],
)
def test_single_pixel_change_reaches_exactly_the_cells_whose_field_contains_it(name, layer):
    preset = get_preset(name)
    backbone = preset.build(preset.weights_path(None), layer).eval()
    rf = backbone.receptive_field()
    assert rf.jump == 16
    pixel = (250, 170)
    (x0, x1), (y0, y1), cells = _perturbation_extent(backbone, pixel=pixel)
    assert (x0, x1) == _predicted_extent(rf, pixel[0], cells)
    assert (y0, y1) == _predicted_extent(rf, pixel[1], cells)


def test_resnet50_receptive_field_is_computed_from_its_layers(tmp_path):
    from torchvision.models import resnet50

    path = tmp_path / "r50.pth"
    torch.save(resnet50(weights=None).state_dict(), path)
    preset = get_preset("resnet50")
    backbone = preset.build(path, "layer3").eval()
    rf = backbone.receptive_field()
    # torchvision layout (stride on the 3x3 conv): 267 px; the perturbation check below confirms it
    assert (rf.jump, rf.size, rf.start) == (16, 267, 0.0)
    pixel = (250, 170)
    (x0, x1), _, cells = _perturbation_extent(backbone, pixel=pixel)
    assert (x0, x1) == _predicted_extent(rf, pixel[0], cells)


def test_folding_batchnorm_keeps_outputs():
    preset = get_preset("efficientnet-lite0")
    plain = preset.build(preset.weights_path(None), "expand").eval()
    folded = preset.build(preset.weights_path(None), "expand").eval().fold_for_inference()
    image = torch.randn(1, 3, 256, 320)
    with torch.no_grad():
        a, b = plain(image), folded(image)
    assert torch.allclose(a.local, b.local, atol=1e-3)
    assert torch.allclose(a.global_, b.global_, atol=1e-3)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
