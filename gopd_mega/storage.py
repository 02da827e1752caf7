"""How the run writes its files: modes that honour the umask, space checked before a large write,
and a full or read-only disk reported as one line naming the path and the space needed.

* Modes. safetensors writes through a private temporary file and renames it, so its files come
  out 0600 whatever the umask. :func:`save_safetensors` gives them the mode an ordinary file
  gets (0666 & ~umask), so a server running as another user can read an export.
* Space. :func:`require_space` refuses a write of about ``nbytes`` before it starts when the
  file system has less free. :func:`storage_error` turns the OSError of a write that failed
  anyway (ENOSPC, EDQUOT, EROFS, EACCES, also wrapped in torch.distributed.checkpoint's
  CheckpointException) into a :class:`StorageError` with the same kind of message.
* :func:`sha256` of a file, for checkpoint manifests.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

_USER_ERRNOS = {
    errno.ENOSPC: "no space left",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a path component is a file",
    errno.EEXIST: "a file is in the way",
}


class StorageError(OSError):
    """A write failed for a reason the user can fix (no space, read-only, a file in the way);
    the message names the path and, for space, how much is needed and how much is free."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: the only portable way to read it is to set it
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (a file) the mode an ordinary new file gets: 0666 & ~umask."""
    os.chmod(path, 0o666 & ~umask())


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """safetensors ``save_file`` with the file's mode set as for an ordinary file (see the module docstring)."""
    save_file(tensors, str(path), metadata=metadata)
    honour_umask(path)


def _existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def size(nbytes: float) -> str:
    """A byte count for people: KiB, MiB or GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes / 2**10:.1f} KiB"


def require_space(directory: str | os.PathLike, nbytes: int, what: str) -> None:
    """Refuse (StorageError) to write about ``nbytes`` under ``directory`` when its file system has
    less free space; ``what`` names the write, e.g. 'checkpoint step_000040'."""
    where = _existing(Path(directory))
    free = shutil.disk_usage(where).free
    if free < nbytes:
        raise StorageError(
            errno.ENOSPC,
            f"{what}: not enough space in {directory}: it needs about {size(nbytes)}, {size(free)} are free",
        )


def find_os_error(exc: BaseException | None) -> OSError | None:
    """The OSError behind ``exc`` with one of the user-fixable errnos: ``exc`` itself, its cause
    or context, or a rank's failure inside torch.distributed.checkpoint's CheckpointException."""
    seen = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _USER_ERRNOS:
            return e
        failures = getattr(e, "failures", None)  # CheckpointException: {rank: exception or (exception, traceback)}
        if isinstance(failures, dict):
            for f in failures.values():
                todo.append(f[0] if isinstance(f, tuple) else f)
        todo += [e.__cause__, e.__context__]
    return None


def storage_error(
    exc: BaseException, directory: str | os.PathLike, what: str, nbytes: int | None = None
) -> StorageError | None:
    """A StorageError naming ``directory`` (and the space needed, for a full disk) when ``exc``
    comes from a user-fixable OSError; None for anything else."""
    os_err = find_os_error(exc)
    if os_err is None:
        return None
    reason = _USER_ERRNOS[os_err.errno]  # type: ignore[index]  # find_os_error returns one with an errno
    path = os_err.filename or directory
    if os_err.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(_existing(Path(directory))).free
        need = f"it needs about {size(nbytes)}, " if nbytes else ""
        return StorageError(
            os_err.errno, f"{what}: {reason} writing {path}: {need}{size(free)} are free in {directory}"
        )
    return StorageError(os_err.errno, f"{what}: cannot write {path}: {reason}")


def sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
