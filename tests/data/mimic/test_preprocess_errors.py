"""``python -m ray_jobs.preprocess`` on damaged raw files: one ``preprocessing error:`` line
naming the file, the record and the field, exit status 2, and nothing already written changed."""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from dipro.data.mimic.raw_tree import RawTree

META = "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv.gz"


def _rewrite_gz(path: Path, edit: Callable[[bytes], bytes]) -> None:
    path.write_bytes(gzip.compress(edit(gzip.decompress(path.read_bytes())), mtime=0))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bad_crc(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF  # the gzip trailer: CRC32 (4 bytes) then the length
    path.write_bytes(bytes(data))


def _latin1(path: Path) -> None:
    _rewrite_gz(path, lambda b: b.replace(b",MARRIED,WHITE,", b",MARRIED,WHITE \xc9TRANGER,", 1))


def _study_date(path: Path) -> None:
    _rewrite_gz(path, lambda b: b.replace(b",21500302,", b",2150-06-1O,", 1))


def _scene_graph_list(tree: RawTree) -> None:
    path = tree.scene_graph_dir / f"{tree.real_cxr}_SceneGraph.json"
    path.write_text(f"[{path.read_text()}]")


CASES = {
    "truncated chartevents": (
        lambda t: _truncate(t.mimic_iv / "icu/chartevents.csv.gz"),
        "icu/chartevents.csv.gz, record line ",
        "truncated or corrupt",
    ),
    "gzip CRC error": (
        lambda t: _bad_crc(t.mimic_iv / "hosp/admissions.csv.gz"),
        "hosp/admissions.csv.gz, record line ",
        "CRC check failed",
    ),
    "Latin-1 bytes": (
        lambda t: _latin1(t.mimic_iv / "hosp/admissions.csv.gz"),
        "hosp/admissions.csv.gz, record line 2 (subject_id=10000037, hadm_id=20000011), "
        "field 'race'",
        "not UTF-8",
    ),
    "StudyDate 2150-06-1O": (
        lambda t: _study_date(t.root / META),
        f"{META}, record line 3 (subject_id=10000037, "
        "dicom_id=d0327a78-a6401c4e-e9aa5979-80edb27f-9b4c7b71), field 'StudyDate'",
        "'2150-06-1O' is not a valid Int64 value",
    ),
    "scene graph as a JSON list": (
        _scene_graph_list,
        "_SceneGraph.json, record a2f281ec-1b01bd17-82938487-a10d3b58-c394ae8f, "
        "field '(top level)'",
        "is a JSON object, this file holds a list",
    ),
}


@pytest.fixture
def damaged(raw_tree: RawTree, tmp_path: Path) -> Callable[[Callable[[RawTree], None]], RawTree]:
    def make(damage: Callable[[RawTree], None]) -> RawTree:
        root = tmp_path / "raw"
        shutil.copytree(raw_tree.root, root)
        tree = RawTree(
            root=root,
            mimic_iv=root / raw_tree.mimic_iv.relative_to(raw_tree.root),
            mimic_cxr=root / raw_tree.mimic_cxr.relative_to(raw_tree.root),
            scene_graph_dir=root / raw_tree.scene_graph_dir.relative_to(raw_tree.root),
            gold_file=root / raw_tree.gold_file.relative_to(raw_tree.root),
            real_cxr=raw_tree.real_cxr,
        )
        damage(tree)
        return tree

    return make


def _args(tree: RawTree, out: Path, *extra: str) -> list[str]:
    return [
        f"raw.mimic_iv={tree.mimic_iv}",
        f"raw.mimic_cxr={tree.mimic_cxr}",
        f"raw.scene_graph_dir={tree.scene_graph_dir}",
        f"raw.gold_file={tree.gold_file}",
        f"output_root={out}",
        "regions.crop_size=32",
        "regions.num_workers=1",
        "ray.num_cpus=2",
        "hospitals.num=2",
        *extra,
    ]


def _earlier_output(out: Path) -> None:
    """What an earlier run left in ``output_root`` (a dataset of another task)."""
    (out / "mortality").mkdir(parents=True)
    (out / "mortality" / "manifest.json").write_text('{"kept": true}')


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_raw_file_is_one_line_naming_file_record_and_field(
    case, damaged, entrypoint, tree_checksums, tmp_path
):
    damage, where, what = CASES[case]
    tree = damaged(damage)
    out = tmp_path / "shards"
    _earlier_output(out)
    raw_before, out_before = tree_checksums(tree.root), tree_checksums(out)

    code, lines = entrypoint(
        "ray_jobs.preprocess", *_args(tree, out, "tasks=[disease_progression]")
    )

    assert code == 2, "\n".join(lines[-12:])
    last = lines[-1]
    assert last.startswith(f"preprocessing error: {tree.root}/"), last
    assert where in last and what in last, last
    assert not any("Traceback" in line for line in lines)
    assert tree_checksums(tree.root) == raw_before
    assert tree_checksums(out) == out_before


def test_bad_setting_is_refused_before_any_raw_file_is_read(
    raw_tree, entrypoint, tree_checksums, tmp_path
):
    out = tmp_path / "shards"
    _earlier_output(out)
    before = tree_checksums(out)
    code, lines = entrypoint("ray_jobs.preprocess", *_args(raw_tree, out, "rows_per_file=0"))
    assert code == 2, "\n".join(lines[-12:])
    assert lines[-1] == "configuration error: rows_per_file=0 must be at least 1"
    assert not any("cohort" in line for line in lines[:-1])  # no pass started
    assert tree_checksums(out) == before


@pytest.mark.ray
def test_empty_jpeg_fails_in_the_ray_data_stage_with_one_line(
    damaged, entrypoint, tree_checksums, ray_session, tmp_path
):
    tree = damaged(lambda t: next(t.mimic_cxr.rglob(f"{t.real_cxr}.jpg")).write_bytes(b""))
    out = tmp_path / "shards"
    _earlier_output(out)
    raw_before, out_before = tree_checksums(tree.root), tree_checksums(out)
    code, lines = entrypoint("ray_jobs.preprocess", *_args(tree, out, "tasks=[length_of_stay]"))
    assert code == 2, "\n".join(lines[-12:])
    assert lines[-1].startswith(f"preprocessing error: {tree.mimic_cxr}/files/"), lines[-1]
    assert f"{tree.real_cxr}.jpg, record dicom_id={tree.real_cxr}, field 'JPEG'" in lines[-1]
    assert "cannot decode or crop the image" in lines[-1]
    assert "Traceback" not in lines[-1]
    assert tree_checksums(tree.root) == raw_before
    assert {k: v for k, v in tree_checksums(out).items() if not k.startswith("_cache")} == (
        out_before
    )
