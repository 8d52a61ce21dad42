"""The X-ray renderer of the synthetic cohort: full CXRs and their region crops.

Each CXR: the patient's static anatomy (lung fields, heart, ribs and a smooth texture; it
dominates the pixels) plus, inside each region's box, one spatial pattern per finding scaled by
its intensity at that time; the hospital's contrast and brightness; exposure and pixel noise.
Region crops are cut from the full image by boxes jittered per image and resized to ``S x S``
(``torchvision.ops.roi_align``); a few boxes are missing.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import torch
from torchvision.ops import roi_align

from dipro import vocab
from dipro.data.synthetic.cohort import SyntheticConfig

_PROFILE_GRID: Final[int] = 24  # finding patterns are drawn on this grid in box coordinates

# Canonical region boxes as fractions of the image (x1, y1, x2, y2), in vocab.REGIONS order.
# Radiological convention: the patient's left is on the image's right.
CANONICAL_BOXES: Final[np.ndarray] = np.array(
    [
        (0.52, 0.12, 0.92, 0.86),  # left lung
        (0.08, 0.12, 0.48, 0.86),  # right lung
        (0.52, 0.56, 0.92, 0.86),  # left lower lung zone
        (0.08, 0.56, 0.48, 0.86),  # right lower lung zone
        (0.54, 0.34, 0.70, 0.56),  # left hilar structures
        (0.30, 0.34, 0.46, 0.56),  # right hilar structures
        (0.78, 0.76, 0.95, 0.93),  # left costophrenic angle
        (0.05, 0.76, 0.22, 0.93),  # right costophrenic angle
        (0.40, 0.48, 0.76, 0.82),  # cardiac silhouette
        (0.38, 0.08, 0.62, 0.52),  # mediastinum
    ],
    dtype=np.float64,
)

# Pixel amplitude of each finding's pattern at intensity 1 (image scale 0..1).
_FINDING_AMPLITUDE: Final[np.ndarray] = np.array([0.45, 0.45, 0.60, 0.40, 0.45, 0.60, 0.50])


def render_cxrs(
    cfg: SyntheticConfig,
    cxr_subject: np.ndarray,
    hospital: np.ndarray,
    site: dict[str, np.ndarray],
    intensities: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Full images [M, W, W] uint8, crop boxes [M, R, 4], region presence [M, R] and crops."""
    N, M, R, W, S = (
        hospital.shape[0],
        cxr_subject.shape[0],
        vocab.NUM_REGIONS,
        cfg.image_size,
        cfg.crop_size,
    )
    centre = np.array([0.5, 0.5, 0.5, 0.5])
    scale = rng.normal(1.0, 0.04, (N, 1, 1))
    shift = np.repeat(rng.normal(0.0, 0.02, (N, 1, 2)), 2, axis=2)
    patient_boxes = ((CANONICAL_BOXES - centre) * scale + centre + shift).clip(0.0, 1.0) * W
    anatomy = _anatomy(cfg, patient_boxes, rng)
    patterns = _finding_patterns(N, rng)

    # Finding layers on the box grid, then pasted into each patient box by separable bilinear
    # interpolation: image += Ay @ layer @ Ax^T, summed over regions in one matmul.
    coef = (intensities * _FINDING_AMPLITUDE).astype(np.float32)  # [M, R, K]
    g = _PROFILE_GRID
    Ax, Ay = (
        _paste_weights(patient_boxes[..., 0], patient_boxes[..., 2], W),
        _paste_weights(patient_boxes[..., 1], patient_boxes[..., 3], W),
    )  # [N, R, W, g]
    findings = np.empty((M, W, W), np.float32)
    chunk = 128
    for start in range(0, M, chunk):
        sub = cxr_subject[start : start + chunk]
        layers = np.einsum("mrk,mrkuv->mruv", coef[start : start + chunk], patterns[sub])
        right = np.matmul(layers, Ax[sub].transpose(0, 1, 3, 2))  # [m, R, g, W]
        left = Ay[sub].transpose(0, 2, 1, 3).reshape(len(sub), W, R * g)  # [m, W, R*g]
        findings[start : start + chunk] = np.matmul(left, right.reshape(len(sub), R * g, W))

    h = hospital[cxr_subject]
    exposure = rng.normal(0.0, 0.006, (M, 1, 1)).astype(np.float32)
    gain = site["contrast"][h][:, None, None].astype(np.float32)
    offset = site["brightness"][h][:, None, None].astype(np.float32)
    noise = rng.standard_normal((M, W, W), dtype=np.float32) * np.float32(0.015)
    image = gain * (anatomy[cxr_subject] + findings - 0.5) + 0.5 + offset + exposure + noise
    images = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)

    jitter = rng.normal(0.0, cfg.box_jitter * W, (M, R, 4))
    boxes = patient_boxes[cxr_subject] + jitter
    boxes[..., 2:] = np.maximum(boxes[..., 2:], boxes[..., :2] + 2.0)
    boxes = boxes.clip(0.0, float(W))
    present = rng.random((M, R)) >= cfg.missing_box_rate

    chunk = 64
    rois = torch.cat(
        [
            torch.from_numpy(np.repeat(np.arange(M), R)[:, None]).double(),
            torch.from_numpy(boxes.reshape(M * R, 4)),
        ],
        1,
    ).float()
    crops = torch.empty((M * R, 1, S, S))
    for start in range(0, M, chunk):
        stop = min(start + chunk, M)
        sel = rois[start * R : stop * R].clone()
        sel[:, 0] -= start
        src = torch.from_numpy(images[start:stop, None].astype(np.float32))
        crops[start * R : stop * R] = roi_align(
            src, sel, output_size=S, spatial_scale=1.0, sampling_ratio=2, aligned=True
        )
    crops_u8 = crops.round().clamp(0, 255).to(torch.uint8).numpy().reshape(M, R, S, S)
    crops_u8[~present] = 0
    return images, boxes, present, crops_u8


def _anatomy(cfg: SyntheticConfig, boxes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Static anatomy per patient [N, W, W] in 0..1 from the patient's region boxes [N, R, 4]."""
    N, W = boxes.shape[0], cfg.image_size
    grid = ((np.arange(W) + 0.5) / W).astype(np.float32)
    y, x = grid[None, :, None], grid[None, None, :]

    def ellipse(box: np.ndarray, softness: float) -> np.ndarray:
        cx, cy = (box[:, 0] + box[:, 2]) / 2 / W, (box[:, 1] + box[:, 3]) / 2 / W
        rx, ry = (box[:, 2] - box[:, 0]) / 2 / W, (box[:, 3] - box[:, 1]) / 2 / W
        d = np.sqrt(
            ((x - cx[:, None, None]) / rx[:, None, None]) ** 2
            + ((y - cy[:, None, None]) / ry[:, None, None]) ** 2
        )
        return 1.0 / (1.0 + np.exp((d - 1.0) / softness))

    lungs = ellipse(boxes[:, 0], 0.08) + ellipse(boxes[:, 1], 0.08)
    heart = ellipse(boxes[:, 8], 0.1)
    spine = np.exp(-(((x - 0.5 - rng.normal(0, 0.01, (N, 1, 1))) / 0.06) ** 2))
    body = 0.42 + rng.uniform(-0.12, 0.12, (N, 1, 1)) - 0.25 * ((x - 0.5) ** 2 + (y - 0.5) ** 2)
    rib_period = rng.uniform(0.07, 0.1, (N, 1, 1))
    ribs = (
        rng.uniform(0.04, 0.09, (N, 1, 1))
        * np.cos(
            2 * np.pi * (y + 0.15 * np.abs(x - 0.5)) / rib_period
            + rng.uniform(0, 2 * np.pi, (N, 1, 1))
        )
        ** 8
    )
    texture = np.zeros((N, W, W))
    for _ in range(6):
        fx, fy = rng.uniform(0.5, 4.0, (2, N, 1, 1))
        phase = rng.uniform(0, 2 * np.pi, (N, 1, 1))
        texture += rng.normal(0.0, 0.06, (N, 1, 1)) * np.cos(2 * np.pi * (fx * x + fy * y) + phase)
    anatomy = (
        body
        - rng.uniform(0.15, 0.4, (N, 1, 1)) * lungs
        + rng.uniform(0.1, 0.25, (N, 1, 1)) * heart
        + rng.uniform(0.05, 0.15, (N, 1, 1)) * spine
        + ribs * lungs
        + texture
    )
    return anatomy.astype(np.float32)


def _finding_patterns(N: int, rng: np.random.Generator) -> np.ndarray:
    """One spatial pattern per patient, region and finding on a box grid: [N, R, K, g, g]."""
    R, g = vocab.NUM_REGIONS, _PROFILE_GRID
    c = (np.arange(g) + 0.5) / g
    v, u = c[:, None], c[None, :]
    shape = (N, R, 1, 1)
    window = np.sqrt(np.sin(np.pi * u) * np.sin(np.pi * v))

    def blob(sigma: float) -> np.ndarray:
        cu, cv = rng.uniform(0.3, 0.7, (2, *shape))
        return np.exp(-((u - cu) ** 2 + (v - cv) ** 2) / (2 * sigma**2))

    d = np.sqrt((u - 0.5) ** 2 + (v - 0.5) ** 2)
    band_v = rng.uniform(0.55, 0.8, shape)
    fu, fv = rng.uniform(3.0, 6.0, (2, *shape))
    patchy = 0.6 + 0.4 * np.cos(2 * np.pi * (fu * u + fv * v) + rng.uniform(0, 2 * np.pi, shape))
    patterns = [
        np.exp(-(((v - band_v) / 0.08) ** 2)) * window,  # atelectasis: a linear band
        np.broadcast_to(np.exp(-(((d - 0.34) / 0.1) ** 2)) * window, (N, R, g, g)),  # big heart
        blob(0.13) * window,  # consolidation: a dense focal blob
        np.broadcast_to(np.exp(-(d**2) / 0.18) * window, (N, R, g, g)),  # edema: diffuse haze
        blob(0.22) * window,  # lung opacity: a wide blob
        np.broadcast_to(np.clip((v - 0.45) / 0.4, 0, 1) * window, (N, R, g, g)),  # effusion: the
        # bottom of the box
        blob(0.18) * patchy * window,  # pneumonia: a patchy blob
    ]
    return np.stack(patterns, axis=2).astype(np.float32)


def _paste_weights(lo: np.ndarray, hi: np.ndarray, W: int) -> np.ndarray:
    """Bilinear weights [..., W, g] that map a g-cell box grid onto image pixels between lo and hi
    (continuous pixel coordinates); zero outside the box."""
    g = _PROFILE_GRID
    pixel = np.arange(W, dtype=np.float32) + 0.5
    # Position of each pixel centre in grid-cell units, relative to cell centres.
    pos = (pixel - lo[..., None]) / (hi - lo)[..., None] * g - 0.5  # [..., W]
    cells = np.arange(g, dtype=np.float32)
    weights = np.maximum(0.0, 1.0 - np.abs(pos[..., None] - cells))
    inside = (pos > -0.5) & (pos < g - 0.5)
    return (weights * inside[..., None]).astype(np.float32)
