"""A run directory made safe to train in: it is a directory, one run at a time holds it, and
what a killed run left half-written is cleared away.

The guard is an advisory `flock` on `<workdir>/loom.lock`, taken by process 0 for the whole
run. The kernel drops it when the process ends, however it ends (kill -9 included), so a dead
run never leaves the directory stuck; on NFS the server's lease does the same for a host that
died. The file also says who holds it (pid, host, start time), for the error a second run gets.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator

from errors import CheckpointError

LOCK_FILE = "loom.lock"
ORBAX_TMP = ".orbax-checkpoint-tmp"   # orbax's suffix of a step directory not yet committed


def prepare(workdir: str | os.PathLike) -> Path:
    """`workdir` as an existing directory (created if new), or a one-line error naming the
    path component that is in the way."""
    path = Path(workdir).expanduser()
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"--workdir {path} is a file, not a directory; choose another "
                              "--workdir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:   # a parent is a file (NotADirectoryError / FileExistsError), ...
        blocker = next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), None)
        where = f" ({blocker} is a file)" if blocker else ""
        raise CheckpointError(f"cannot create --workdir {path}{where}: {e.strerror or e}; "
                              "choose another --workdir") from e
    return path


@contextlib.contextmanager
def lock(workdir: Path, *, enabled: bool = True) -> Iterator[None]:
    """Holds `<workdir>/loom.lock` while the body runs; a run already holding it is an error.

    `enabled=False` (processes other than 0) takes nothing.
    """
    if not enabled:
        yield
        return
    path = workdir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointError(f"--workdir {workdir} is in use by another run ({_holder(path)}"
                                  f"; lock {path}): wait for it to end, stop it, or use another "
                                  "--workdir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                        time.gmtime())}).encode())
        yield
    finally:
        os.close(fd)   # releases the lock; the file stays (removing it would race a new run)


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet written its pid"


def remove_unfinished_saves(checkpoints: Path) -> list[str]:
    """Deletes the `<step>.orbax-checkpoint-tmp*` directories a killed save left (never a
    committed checkpoint); returns their names. Only safe while holding the lock."""
    if not checkpoints.is_dir():
        return []
    removed = []
    for entry in sorted(checkpoints.iterdir()):
        if ORBAX_TMP in entry.name and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed
