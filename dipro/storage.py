"""Paths that work on one machine and across a cluster: local paths and filesystem URIs.

Every place that names a file or directory (shard roots, Ray Train's ``storage_path``, metric
files) accepts either a local path (``outputs/runs``, ``/mnt/nfs/dipro``) or a URI that
:func:`pyarrow.fs.FileSystem.from_uri` understands (``file:///...``, ``s3://bucket/prefix``,
``gs://bucket/prefix``, ``abfs://container@account.dfs.core.windows.net/prefix``,
``hdfs://namenode:8020/prefix``). Credentials come from the environment of the process (IAM
instance profile, ``AWS_*`` / ``GOOGLE_APPLICATION_CREDENTIALS`` variables), never from config.

Atomic writes. A reader must never see a half-written file. On a local or HDFS filesystem a
file is written under a temporary name in the same directory and renamed over the target, which
is atomic. Object stores (S3, GCS, Azure Blob) have no rename: a "move" is a server-side copy
followed by a delete. There an atomic write means: upload to a temporary key, copy it to the
final key once the upload has completed (an object becomes visible whole or not at all), then
delete the temporary key; a writer that fails part-way deletes its temporary key and leaves the
final key untouched. Temporary names start with ``.`` and end with ``.tmp`` so that Parquet
readers (which skip hidden files and read ``*.parquet`` only) never pick them up.

Outputs made of several files (a directory of shards) cannot be published atomically on an
object store at all: write every file, then write a small marker file last, and let readers
treat a directory without its marker as incomplete. A directory written in one piece (a
checkpoint, ``publish_directory``) is copied under a temporary name and renamed into place
where renames are atomic, so that a copy that fails part-way never appears under its name.

Full or read-only storage. A write that storage refuses (no space left, a quota exceeded, a
read-only file system) raises ``StorageUnwritable``: one line naming the path and, for a full
device, the bytes the write needed and the bytes free where that is known. The temporary file
or directory of the failed write is deleted, so the space it took is free again and the target
keeps its previous content.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

# Filesystems whose rename replaces the target atomically (pyarrow ``type_name`` values).
_ATOMIC_RENAME = frozenset({"local", "hdfs"})
_LOCAL_SCHEMES = frozenset({"", "file", "local"})
# What a write failed with, when storage refused it (``StorageUnwritable``).
_REFUSED = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
}
_COPY_CHUNK = 64 * 1024 * 1024  # pyarrow's copy_files chunk, as Ray Train uploads checkpoints


class StorageUnwritable(OSError):
    """Storage refused a write: the device is full, a quota is exceeded, or the file system is
    read-only. The message is one line naming the path (``unwritable``)."""


def _scheme(uri: str) -> str:
    """URI scheme in lower case; ``""`` for a plain path (Windows drive letters included)."""
    if "://" not in uri:
        return ""
    return urlsplit(uri).scheme.lower()


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """True when ``uri`` names another machine's storage (``s3://``, ``gs://``, ``hdfs://``...).

    A local path is not remote even when it lies on an NFS mount: only the user knows that the
    same path exists on every node.
    """
    return _scheme(os.fspath(uri)) not in _LOCAL_SCHEMES


def require_remote(uri: str | os.PathLike[str], what: str) -> None:
    """Raise unless ``uri`` is on storage that other nodes reach (checked before a cluster run).

    Args:
        uri: the configured location.
        what: the config key it came from, named in the error (``"storage_path"``).

    Raises:
        ValueError: ``uri`` is a path on this machine.
    """
    if not is_remote(uri):
        raise ValueError(
            f"{what}={os.fspath(uri)!r} is a path on this machine, which the other nodes of a "
            "cluster cannot see: use a URI of shared storage (s3://, gs://, abfs://, hdfs://), "
            "or an NFS path mounted on every node with scaling.require_remote_storage=false"
        )


def resolve_filesystem(
    uri: str | os.PathLike[str], filesystem: pafs.FileSystem | None = None
) -> tuple[pafs.FileSystem, str]:
    """Return the pyarrow filesystem that holds ``uri`` and the path of ``uri`` inside it.

    With ``filesystem`` given, ``uri`` is taken as a path inside it (the convention of pyarrow
    and of Ray's ``storage_filesystem``). Otherwise a plain path resolves to the local
    filesystem with an absolute path, and a URI to the filesystem its scheme names.

    Raises:
        ValueError: the URI's scheme is not one pyarrow supports, or its bucket is missing.
    """
    text = os.fspath(uri)
    if not text:
        raise ValueError("empty path: give a local path or a URI such as s3://bucket/prefix")
    if filesystem is not None:
        return filesystem, text
    if _scheme(text) == "":
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text))
    try:
        return pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise ValueError(f"cannot open storage URI {text!r}: {err}") from err


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """Join path components onto a local path or a URI, keeping scheme, host and query.

    ``join("s3://b/runs?region=eu-west-1", "r1", "metrics.json")`` gives
    ``"s3://b/runs/r1/metrics.json?region=eu-west-1"``.
    """
    text = os.fspath(base)
    if _scheme(text) == "":
        return os.path.join(text, *parts)
    split = urlsplit(text)
    path = posixpath.join(split.path or "/", *parts)
    return urlunsplit((split.scheme, split.netloc, path, split.query, split.fragment))


def exists(uri: str | os.PathLike[str], filesystem: pafs.FileSystem | None = None) -> bool:
    """True when a file or directory exists at ``uri``."""
    fs, path = resolve_filesystem(uri, filesystem)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def open_read(
    uri: str | os.PathLike[str], filesystem: pafs.FileSystem | None = None
) -> pa.NativeFile:
    """Open ``uri`` for random-access reading (use as a context manager).

    Raises:
        FileNotFoundError: nothing exists at ``uri`` (the message names it).
    """
    fs, path = resolve_filesystem(uri, filesystem)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"no file at {os.fspath(uri)!r}")
    return fs.open_input_file(path)


def read_bytes(uri: str | os.PathLike[str], filesystem: pafs.FileSystem | None = None) -> bytes:
    """The whole content of the file at ``uri``."""
    with open_read(uri, filesystem) as f:
        return f.read()


def _size(n: int) -> str:
    return f"{n} bytes ({n / 2**20:.1f} MiB)"


def _base(filesystem: pafs.FileSystem) -> pafs.FileSystem:
    while isinstance(filesystem, pafs.SubTreeFileSystem):
        filesystem = filesystem.base_fs
    return filesystem


def free_bytes(
    uri: str | os.PathLike[str], filesystem: pafs.FileSystem | None = None
) -> int | None:
    """Bytes free on the local file system that holds (or would hold) ``uri``; None on remote
    storage, which does not say."""
    if filesystem is None and is_remote(uri):
        return None
    fs, path = resolve_filesystem(uri, filesystem)
    if _base(fs).type_name != "local" or isinstance(fs, pafs.SubTreeFileSystem):
        return None
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def unwritable(
    uri: str | os.PathLike[str],
    err: OSError,
    needed: int | None = None,
    filesystem: pafs.FileSystem | None = None,
) -> StorageUnwritable | None:
    """The ``StorageUnwritable`` of a write of ``needed`` bytes (when known) to ``uri`` that
    failed with ``err``, or None when ``err`` is not storage refusing the write::

        cannot write /mnt/runs/r/checkpoint_2026-01-02_10-11-12.123456: no space left on the
        device (the write needs 138724493 bytes (132.3 MiB); 61231104 bytes (58.4 MiB) free)
    """
    if isinstance(err, StorageUnwritable):
        return err
    reason = _REFUSED.get(err.errno) if err.errno is not None else None
    if reason is None:
        return None
    sizes = []
    if err.errno != errno.EROFS:
        free = free_bytes(uri, filesystem)
        if needed is not None:
            sizes.append(f"the write needs {_size(needed)}")
        if free is not None:
            sizes.append(f"{_size(free)} free")
    detail = f" ({'; '.join(sizes)})" if sizes else ""
    return StorageUnwritable(f"cannot write {os.fspath(uri)}: {reason}{detail}")


def has_atomic_rename(filesystem: pafs.FileSystem) -> bool:
    """True when renaming a file on ``filesystem`` atomically replaces the target."""
    return _base(filesystem).type_name in _ATOMIC_RENAME


@contextmanager
def atomic_write(
    uri: str | os.PathLike[str],
    filesystem: pafs.FileSystem | None = None,
    needed: int | None = None,
) -> Iterator[pa.NativeFile]:
    """Yield a stream whose bytes appear at ``uri`` only once the block exits without error.

    The stream writes a temporary file beside the target. On success it is renamed over the
    target where the filesystem renames atomically, or copied to it and deleted on an object
    store (module docstring). On error the temporary file is deleted and the target keeps its
    previous content. Parent directories are created on filesystems that have them.

    Raises:
        StorageUnwritable: storage refused the write (full, over quota, read-only), naming
            ``uri`` and the ``needed`` bytes when given.
    """
    fs, path = resolve_filesystem(uri, filesystem)
    parent, name = posixpath.split(path)
    if not name:
        raise ValueError(f"{os.fspath(uri)!r} names a directory, not a file")
    tmp = posixpath.join(parent, f".{name}.{uuid.uuid4().hex}.tmp")
    atomic_rename = has_atomic_rename(fs)
    if atomic_rename and parent:
        fs.create_dir(parent, recursive=True)
    try:
        with fs.open_output_stream(tmp) as stream:
            yield stream
        if atomic_rename:
            fs.move(tmp, path)
        else:
            fs.copy_file(tmp, path)
    except OSError as err:
        refused = unwritable(uri, err, needed)
        if refused is None:
            raise
        raise refused from err
    finally:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)


def write_bytes_atomic(
    uri: str | os.PathLike[str], data: bytes, filesystem: pafs.FileSystem | None = None
) -> None:
    """Write ``data`` to ``uri`` atomically (see :func:`atomic_write`)."""
    with atomic_write(uri, filesystem, needed=len(data)) as stream:
        stream.write(data)


def publish_directory(
    source: str | os.PathLike[str],
    uri: str | os.PathLike[str],
    filesystem: pafs.FileSystem | None = None,
    keep_free: int = 0,
) -> None:
    """Copy the local directory ``source`` to ``uri``, whole or not at all where the filesystem
    renames atomically: into a hidden sibling ``.{name}.{hex}.tmp``, renamed to ``uri`` once
    every file is there. On an object store the files are copied into place one by one (each
    object appears whole). A copy that fails is deleted, and so is one that leaves less than
    ``keep_free`` bytes free on a local file system (room for the small files written after
    it, which a full device would leave empty).

    Raises:
        StorageUnwritable: storage refused the copy (full, over quota, read-only), naming
            ``uri`` and the bytes of ``source``.
    """
    fs, path = resolve_filesystem(uri, filesystem)
    parent, name = posixpath.split(path.rstrip("/"))
    atomic_rename = has_atomic_rename(fs)
    target = posixpath.join(parent, f".{name}.{uuid.uuid4().hex}.tmp") if atomic_rename else path
    needed = sum(p.stat().st_size for p in Path(source).rglob("*") if p.is_file())
    try:
        fs.create_dir(target, recursive=True)
        pafs.copy_files(
            os.fspath(source),
            target,
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=fs,
            chunk_size=_COPY_CHUNK,
            use_threads=atomic_rename,  # pyarrow's threaded upload to S3 is unsafe
        )
        left = free_bytes(path, fs)
        if left is not None and left < keep_free:
            raise StorageUnwritable(
                f"cannot write {os.fspath(uri)}: no space left on the device (the write needs "
                f"{_size(needed)}; {_size(left + needed)} free, of which {_size(keep_free)} "
                "are kept for the files written after it)"
            )
        if atomic_rename:
            fs.move(target, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            fs.delete_dir(target)
        refused = unwritable(uri, err, needed, filesystem)
        if refused is None:
            raise
        raise refused from err
