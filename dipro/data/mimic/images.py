"""Region crops of one full-size CXR, and the optional frozen feature extractor.

``crop_regions`` decodes a JPEG once and cuts every region of vocab.REGIONS by its ImaGenome
``original_*`` box (original-image pixels). When the decoded image is smaller or larger than
the metadata's Rows x Columns (a downsampled copy of MIMIC-CXR-JPG), boxes are scaled to it.
Each crop is resized to S x S (bilinear). Shapes: crops [R, S, S] uint8, present [R] bool;
a region without a box, or whose box is empty after clipping to the image, is all zeros with
present False (mask convention: True = present).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from dipro import vocab

Box = tuple[float, float, float, float]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def crop_regions(
    jpeg: bytes,
    boxes: dict[str, Box],
    size: int,
    rows: int | None = None,
    columns: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``jpeg`` (8-bit grayscale) once and return (crops [R, S, S] uint8, present [R])."""
    with Image.open(io.BytesIO(jpeg)) as img:
        image = img.convert("L")
    width, height = image.size
    sx = width / columns if columns else 1.0
    sy = height / rows if rows else 1.0
    crops = np.zeros((vocab.NUM_REGIONS, size, size), np.uint8)
    present = np.zeros(vocab.NUM_REGIONS, bool)
    for r, region in enumerate(vocab.REGIONS):
        box = boxes.get(region)
        if box is None:
            continue
        x1, y1 = max(0, int(round(box[0] * sx))), max(0, int(round(box[1] * sy)))
        x2, y2 = min(width, int(round(box[2] * sx))), min(height, int(round(box[3] * sy)))
        if x2 - x1 < 1 or y2 - y1 < 1:
            continue
        crop = image.crop((x1, y1, x2, y2)).resize((size, size), Image.Resampling.BILINEAR)
        crops[r] = np.asarray(crop, dtype=np.uint8)
        present[r] = True
    return crops, present


def build_backbone(name: str, weights_path: str | Path | None) -> tuple[torch.nn.Module, int]:
    """A frozen torchvision ResNet without its classifier, and its feature size F.

    Weights come from ``weights_path`` (a state dict saved with torch.save, loaded strictly with
    weights_only=True); without it the backbone keeps its seeded random initialisation, which
    is only good for tests. Nothing is downloaded.
    """
    if name not in ("resnet18", "resnet34", "resnet50", "resnet101"):
        raise ValueError(f"unknown backbone {name!r}; expected a torchvision resnet")
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    if weights_path is not None:
        state = torch.load(Path(weights_path), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    dim = model.fc.in_features
    model.fc = torch.nn.Identity()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, dim


class RegionFeatureExtractor:
    """Frozen backbone over region crops: [N, R, S, S] uint8 -> [N, R, F] float32.

    Grayscale is repeated to 3 channels and normalised with the ImageNet statistics; absent
    regions (present False) get zero features.
    """

    def __init__(
        self,
        backbone: str,
        weights_path: str | None = None,
        device: str | None = None,
        chunk: int = 64,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.dim = build_backbone(backbone, weights_path)
        self.model.to(self.device)
        self.chunk = chunk
        self.mean = torch.tensor(_IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(_IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, crops: np.ndarray, present: np.ndarray) -> np.ndarray:
        n, r, s, _ = crops.shape
        flat = torch.from_numpy(np.ascontiguousarray(crops).reshape(n * r, 1, s, s))
        out = []
        for start in range(0, n * r, self.chunk):
            x = flat[start : start + self.chunk].to(self.device).float().div_(255.0)
            x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
            out.append(self.model(x).float().cpu())
        feats = torch.cat(out).numpy().reshape(n, r, self.dim)
        feats[~present.astype(bool)] = 0.0
        return feats.astype(np.float32)
