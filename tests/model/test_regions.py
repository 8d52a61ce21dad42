"""Region encoder: missing-region embeddings, padding, present-only backbone runs, and local
pretrained weights."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from model_samples import small_cfg

from dipro.model import build_model
from dipro.model.regions import CropBackbone, RegionEncoder, build_backbone


def test_missing_regions_and_padded_cxrs_get_the_region_embedding() -> None:
    torch.manual_seed(0)
    enc = RegionEncoder(backbone=None, in_dim=5, d_model=4, num_regions=3, dropout=0.1).eval()
    features = torch.randn(2, 2, 3, 5)
    present = torch.ones(2, 2, 3, dtype=torch.bool)
    present[0, 1, 2] = False
    cxr_mask = torch.tensor([[True, True], [True, False]])
    out = enc(present, cxr_mask, features=features)
    assert out.shape == (2, 2, 3, 4)
    torch.testing.assert_close(out[0, 1, 2], enc.missing[2])
    torch.testing.assert_close(out[1, 1], enc.missing)  # a padded CXR: every region
    alone = enc(present[:1, :1], cxr_mask[:1, :1], features=features[:1, :1])
    torch.testing.assert_close(out[0, 0], alone[0, 0])


def test_backbone_runs_only_on_present_crops_of_valid_cxrs() -> None:
    torch.manual_seed(0)
    backbone = CropBackbone(build_backbone("resnet18", None))
    seen: list[int] = []
    backbone.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[0]))
    enc = RegionEncoder(backbone=backbone, in_dim=512, d_model=8, num_regions=3, dropout=0.0)
    crops = torch.randint(0, 256, (2, 3, 3, 32, 32), dtype=torch.uint8)
    present = torch.ones(2, 3, 3, dtype=torch.bool)
    present[0, 0, 1] = False
    cxr_mask = torch.tensor([[True, True, True], [True, True, False]])
    out = enc(present, cxr_mask, crops=crops)
    assert seen == [8 + 6]  # 9 - 1 present regions of sample 0, 2 CXRs x 3 of sample 1
    assert out.shape == (2, 3, 3, 8) and torch.isfinite(out).all()


def test_crop_backbone_normalises_grayscale_to_three_channels() -> None:
    backbone = CropBackbone(torch.nn.Identity())
    crops = torch.full((1, 4, 4), 255, dtype=torch.uint8)
    out = backbone(crops)
    assert out.shape == (1, 3, 4, 4)
    expected = (1.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(out[0, :, 0, 0], expected)


def test_pretrained_weights_load_from_a_local_file(tmp_path: Path) -> None:
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pt"
    torch.save(reference.state_dict(), path)
    net = build_backbone("resnet18", str(path))
    torch.testing.assert_close(net.conv1.weight, reference.conv1.weight)
    cfg = small_cfg("crops")
    cfg["pretrained_weights"] = str(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "random weights" warning when weights are given
        model = build_model(cfg, "mortality")
    torch.testing.assert_close(
        model.regions.backbone.net.layer1[0].conv1.weight, reference.layer1[0].conv1.weight
    )


def test_wrong_weights_path_or_architecture_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        build_backbone("resnet18", str(missing))
    wrong = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(ValueError, match=r"resnet18\.pt does not fit a torchvision resnet50"):
        build_backbone("resnet50", str(wrong))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        build_backbone("resnet18", str(garbage))


def test_builder_warns_without_weights_in_crops_mode_only() -> None:
    with pytest.warns(UserWarning, match="random weights"):
        build_model(small_cfg("crops"), "mortality")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_model(small_cfg("features"), "mortality")
