"""Writing so that a crash never leaves half a file: write beside the target, fsync, then rename over it.

Every file and directory Mini Llama writes goes through here. Temporary names start with '.' and contain
'.tmp', so they are never mistaken for data. Results get the permissions of the user's umask, as a plain open()
would give them (tempfile alone would make them private).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_file_atomically(path: Path, data: bytes | memoryview) -> Path:
    """Write `data` to `path`: readers see the old content or all of the new, never a part."""
    path = Path(path)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as tmp:
        try:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
            os.chmod(tmp.name, 0o666 & ~_umask())
        except BaseException:
            tmp.close()
            os.unlink(tmp.name)
            raise
    os.replace(tmp.name, path)
    return path


def write_directory_atomically(path: Path, fill: Callable[[Path], None]) -> Path:
    """Let `fill` write into a fresh temporary directory, then rename it to `path` (replacing an old one whole)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        fill(tmp)
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(file, 0o666 & ~_umask())
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
