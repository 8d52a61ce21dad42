"""Local paths and filesystem URIs resolve to the same files; writes are all-or-nothing."""

from __future__ import annotations

import errno
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from dipro import storage


def test_plain_path_and_file_uri_name_the_same_file(tmp_path: Path) -> None:
    target = tmp_path / "runs" / "r1" / "metrics.json"
    storage.write_bytes_atomic(str(target), b'{"epoch": 1}')

    fs, path = storage.resolve_filesystem(target.as_uri())
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == str(target)
    assert storage.read_bytes(target.as_uri()) == b'{"epoch": 1}'
    assert storage.exists(target.as_uri()) and storage.exists(str(target))


def test_relative_path_resolves_against_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    fs, path = storage.resolve_filesystem("outputs/runs")
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == str(tmp_path / "outputs" / "runs")


def test_join_keeps_scheme_host_and_query() -> None:
    assert storage.join("s3://bucket/dipro?region=eu-west-1", "mortality", "split=train") == (
        "s3://bucket/dipro/mortality/split=train?region=eu-west-1"
    )
    assert storage.join("gs://bucket", "runs") == "gs://bucket/runs"
    assert storage.join("/data/dipro", "mortality") == "/data/dipro/mortality"


def test_remote_means_another_machine() -> None:
    assert storage.is_remote("s3://bucket/runs")
    assert storage.is_remote("GS://bucket/runs")
    assert storage.is_remote("hdfs://namenode:8020/runs")
    assert not storage.is_remote("file:///mnt/nfs/runs")
    assert not storage.is_remote("/mnt/nfs/runs")
    assert not storage.is_remote("outputs/runs")


def test_cluster_runs_refuse_local_paths_by_name() -> None:
    storage.require_remote("s3://bucket/runs", "storage_path")
    with pytest.raises(ValueError, match=r"storage_path='outputs/runs' is a path on this machine"):
        storage.require_remote("outputs/runs", "storage_path")


def test_unknown_scheme_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="nosuchfs://bucket/x"):
        storage.resolve_filesystem("nosuchfs://bucket/x")


def test_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "absent.json"
    with pytest.raises(FileNotFoundError, match="absent.json"):
        storage.read_bytes(str(missing))
    assert not storage.exists(str(missing))


def test_atomic_write_through_a_subtree_filesystem(tmp_path: Path) -> None:
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    assert storage.has_atomic_rename(fs)
    storage.write_bytes_atomic("runs/r1/metrics.json", b"v1", filesystem=fs)
    storage.write_bytes_atomic("runs/r1/metrics.json", b"v2", filesystem=fs)

    assert (tmp_path / "runs" / "r1" / "metrics.json").read_bytes() == b"v2"
    assert storage.read_bytes("runs/r1/metrics.json", filesystem=fs) == b"v2"
    assert [p.name for p in (tmp_path / "runs" / "r1").iterdir()] == ["metrics.json"]


def test_failed_write_keeps_previous_content_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    storage.write_bytes_atomic(str(target), b"complete")

    with pytest.raises(RuntimeError, match="disk full"), storage.atomic_write(str(target)) as out:
        out.write(b"half")
        raise RuntimeError("disk full")

    assert target.read_bytes() == b"complete"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


class _NoRenameFileSystem(pafs.FileSystemHandler):
    """A local directory seen through an object-store-like handler: ``move`` is refused."""

    def __init__(self, root: Path) -> None:
        self._fs = pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem())

    def get_type_name(self) -> str:
        return "objectstore"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _NoRenameFileSystem) and other._fs.equals(self._fs)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def normalize_path(self, path: str) -> str:
        return path

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self._fs.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self._fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self._fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self._fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        self._fs.delete_dir_contents("", accept_root_dir=True)

    def delete_file(self, path: str) -> None:
        self._fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        raise OSError("object stores have no rename")

    def copy_file(self, src: str, dest: str) -> None:
        self._fs.copy_file(src, dest)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self._fs.open_input_stream(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self._fs.open_input_file(path)

    def open_output_stream(self, path: str, metadata: dict[str, str]) -> pa.NativeFile:
        return self._fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata: dict[str, str]) -> pa.NativeFile:
        return self._fs.open_append_stream(path, metadata=metadata)


def test_without_rename_the_write_is_copied_then_the_temporary_deleted(tmp_path: Path) -> None:
    fs = pafs.PyFileSystem(_NoRenameFileSystem(tmp_path))
    assert not storage.has_atomic_rename(fs)
    storage.write_bytes_atomic("metrics.json", b"done", filesystem=fs)

    assert (tmp_path / "metrics.json").read_bytes() == b"done"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_refused_writes_are_one_line_naming_the_path(tmp_path: Path) -> None:
    target = str(tmp_path / "run" / "checkpoint_1")
    full = storage.unwritable(target, OSError(errno.ENOSPC, "No space left on device"), 1048576)
    assert isinstance(full, storage.StorageUnwritable)
    assert str(full).startswith(
        f"cannot write {target}: no space left on the device (the write needs 1048576 bytes "
        "(1.0 MiB); "
    )
    assert str(full).endswith(" free)") and "\n" not in str(full)
    read_only = storage.unwritable(target, OSError(errno.EROFS, "Read-only file system"))
    assert str(read_only) == f"cannot write {target}: the file system is read-only"
    assert storage.unwritable(target, OSError(errno.EACCES, "Permission denied")) is None
    assert storage.free_bytes("s3://bucket/runs") is None


def test_a_directory_is_published_whole_or_not_at_all(tmp_path: Path) -> None:
    source = tmp_path / "local"
    source.mkdir()
    (source / "model.pt").write_bytes(b"w" * 1000)
    (source / "config.json").write_text("{}")
    runs = tmp_path / "runs"
    storage.publish_directory(source, str(runs / "checkpoint_1"))
    assert sorted(p.name for p in (runs / "checkpoint_1").iterdir()) == ["config.json", "model.pt"]

    with pytest.raises(storage.StorageUnwritable) as refused:  # it would leave too little free
        storage.publish_directory(source, str(runs / "checkpoint_2"), keep_free=2**62)
    assert str(refused.value).startswith(
        f"cannot write {runs / 'checkpoint_2'}: no space left on the device (the write needs "
        "1002 bytes"
    )
    assert sorted(p.name for p in runs.iterdir()) == ["checkpoint_1"]  # no partial copy
