"""Region crops of one CXR, the real pydicom-data radiograph, the frozen feature extractor."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from PIL import Image

from dipro import vocab
from dipro.data.features import RegionFeatureExtractor
from dipro.data.mimic.images import crop_regions
from dipro.data.mimic.raw_tree import real_cxr_path, real_cxr_pixels
from dipro.data.mimic.readers import image_path, read_cxr_metadata


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")  # lossless: exact pixel checks
    return buffer.getvalue()


def test_crop_cuts_the_box_and_marks_absent_regions() -> None:
    pixels = np.zeros((100, 200), np.uint8)
    pixels[10:30, 40:80] = 200
    boxes = {"left lung": (40, 10, 80, 30), "mediastinum": (150, 50, 150, 90)}
    crops, present = crop_regions(_jpeg(pixels), boxes, size=8)
    assert crops.shape == (vocab.NUM_REGIONS, 8, 8) and crops.dtype == np.uint8
    assert present.tolist() == [r == "left lung" for r in vocab.REGIONS]  # empty box: absent
    assert np.all(crops[vocab.REGIONS.index("left lung")] == 200)
    assert np.all(crops[~present] == 0)


def test_boxes_scale_to_a_downsampled_image() -> None:
    pixels = np.zeros((50, 100), np.uint8)
    pixels[5:15, 20:40] = 255  # the full-size box (40, 10, 80, 30) at half size
    crops, present = crop_regions(
        _jpeg(pixels), {"left lung": (40, 10, 80, 30)}, size=4, rows=100, columns=200
    )
    assert present[vocab.REGIONS.index("left lung")]
    assert np.all(crops[vocab.REGIONS.index("left lung")] == 255)


def test_real_radiograph_comes_from_the_installed_package(raw_tree) -> None:
    path = real_cxr_path()
    assert "data_store" in path.parts  # inside pydicom-data, not a download cache
    raw = pydicom.dcmread(path).pixel_array.astype(np.float64)
    pixels = real_cxr_pixels()
    assert pixels.shape == (1955, 1841) and pixels.dtype == np.uint8
    assert np.corrcoef(raw.ravel(), pixels.ravel().astype(np.float64))[0, 1] < -0.9  # inverted
    meta = read_cxr_metadata(raw_tree.mimic_cxr).set_index("dicom_id").loc[raw_tree.real_cxr]
    jpeg = image_path(raw_tree.mimic_cxr, meta["subject_id"], meta["study_id"], raw_tree.real_cxr)
    with Image.open(jpeg) as img:
        assert (img.mode, img.size) == ("L", (1841, 1955))
    assert (meta["Rows"], meta["Columns"]) == (1955, 1841)


def test_feature_extractor_shapes_and_absent_regions_zero() -> None:
    extractor = RegionFeatureExtractor("resnet18", device="cpu")
    crops = np.random.default_rng(0).integers(0, 255, (2, vocab.NUM_REGIONS, 32, 32), np.uint8)
    present = np.ones((2, vocab.NUM_REGIONS), bool)
    present[1, 3] = False
    feats = extractor(crops, present)
    assert feats.shape == (2, vocab.NUM_REGIONS, 512) and feats.dtype == np.float32
    assert np.all(feats[1, 3] == 0) and np.all(np.isfinite(feats))
    assert np.abs(feats[0, 3]).sum() > 0
