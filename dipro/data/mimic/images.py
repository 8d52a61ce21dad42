"""Region crops of one full-size CXR.

``crop_regions`` decodes a JPEG once and cuts every region of vocab.REGIONS by its ImaGenome
``original_*`` box (original-image pixels). When the decoded image is smaller or larger than
the metadata's Rows x Columns (a downsampled copy of MIMIC-CXR-JPG), boxes are scaled to it.
Each crop is resized to S x S (bilinear). Shapes: crops [R, S, S] uint8, present [R] bool;
a region without a box, or whose box is empty after clipping to the image, is all zeros with
present False (mask convention: True = present).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from dipro import vocab

Box = tuple[float, float, float, float]


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
