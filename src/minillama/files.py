"""Writing so that a crash never leaves half a file: write beside the target, fsync, then rename over it.

Every file and directory Mini Llama writes goes through here. Temporary names start with '.' and contain
'.tmp', so they are never mistaken for data. Results get the permissions of the user's umask, as a plain open()
would give them (tempfile alone would make them private).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

from minillama.errors import ArgumentError, MiniLlamaError


def _read_umask() -> int:
    """The process's umask, read once at import: reading it means setting it, which would race with threads (the
    server's) creating files in between."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _read_umask()


LEFTOVER = re.compile(r"\..+\.(tmp-[^/]+|old-\d+|[^.]+\.tmp)")  # what the two writers below leave if killed mid-write


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete what an interrupted atomic write left in `folder` (never data: those names start with '.' and carry
    '.tmp' or '.old-'). Call it only while holding the folder's lock, so no live writer's file is taken."""
    return [_remove(path) for path in Path(folder).glob(".*") if LEFTOVER.fullmatch(path.name)]


def remove_leftovers_of(out: Path) -> list[Path]:
    """Delete what an interrupted write of `out` left beside it, where no lock guards the folder: only the
    temporary names of `out` itself whose writer process (its id is in the name) no longer runs."""
    out = Path(out)
    owner = re.compile(re.escape(f".{out.name}.") + r"(?:tmp-|old-)?(\d+)-?")
    found = [p for p in out.parent.glob(f".{glob.escape(out.name)}.*") if LEFTOVER.fullmatch(p.name)]
    if not out.exists():  # killed between the two renames of a directory replace: the old copy is all there is
        found = [p for p in found if ".old-" not in p.name]
    return [_remove(p) for p in found if (m := owner.match(p.name)) and not _process_exists(int(m.group(1)))]


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _remove(path: Path) -> Path:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    return path


def require_regular_file(path: Path, what: str) -> None:
    """Refuse `path` before opening it if something is there that is not a regular file: a FIFO or a device under
    a checkpoint's file name would block the open, or stream without end."""
    if os.path.exists(path) and not os.path.isfile(path):
        kind = "directory" if os.path.isdir(path) else "FIFO, socket or device"
        raise MiniLlamaError(f"{path} is a {kind}, not a regular file; {what} must be a file")


def require_folder_of(out: Path, what: str) -> None:
    """Refuse to write `what` into a folder that does not exist: exports, plots and reports go where the user has a
    folder, and a mistyped path grows no folders anywhere. (A file where a folder should be fails at the write.)"""
    folder = Path(out).absolute().parent
    try:
        os.stat(folder)
    except FileNotFoundError:
        raise MiniLlamaError(f"{folder} does not exist; create it first (mkdir -p {folder}), or write the {what} into a "
                             "folder that exists") from None
    except NotADirectoryError:
        pass


def write_file_atomically(path: Path, data: bytes | memoryview) -> Path:
    """Write `data` to `path`: readers see the old content or all of the new, never a part."""
    return fill_file_atomically(path, lambda tmp: tmp.write_bytes(data))


def fill_file_atomically(path: Path, fill: Callable[[Path], None]) -> Path:
    """Let `fill` write the file at a temporary path beside `path` (for writers that open files themselves), then
    fsync it and rename it over `path`."""
    path = Path(path)
    tmp = None
    try:
        with _termination_deferred():  # a SIGTERM handler that raises must not strike between creating and naming it
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp")
            os.close(fd)
            tmp = Path(name)
        fill(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise _as_os_error(exc, path) or exc
    return path


def write_directory_atomically(path: Path, fill: Callable[[Path], None]) -> Path:
    """Let `fill` write into a fresh temporary directory, then rename it to `path` (replacing an old one whole)."""
    path = Path(path)
    tmp = temporary_directory(path)
    try:
        fill(tmp)
        commit_directory(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _as_os_error(exc, path) or exc
    return path


def _as_os_error(exc: BaseException, path: Path) -> OSError | None:
    """The OSError that a library reported in its own way while writing `path`, or None: safetensors says
    'os error 28' inside a SafetensorError; numpy (which gguf writes with) raises 'N requested and M written'
    without an errno, for a full disk or a file over the size limit."""
    text = str(exc)
    if isinstance(exc, OSError) and exc.errno is not None and not exc.filename:  # say which file
        return OSError(exc.errno, exc.strerror, str(path))
    if (found := re.search(r"os error (\d+)", text)) and not isinstance(exc, OSError):
        code = int(found.group(1))
    elif isinstance(exc, OSError) and exc.errno is None and re.search(r"\d+ requested and \d+ written", text):
        code = errno.ENOSPC if shutil.disk_usage(Path(path).parent).free == 0 else errno.EFBIG
    else:
        return None
    return OSError(code, os.strerror(code), str(path))  # raised inside the handler: the original stays its context


def temporary_directory(path: Path) -> Path:
    """A fresh directory beside `path` to fill and then `commit_directory` (several processes may fill it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))


@contextlib.contextmanager
def _termination_deferred() -> Iterator[None]:
    """Hold SIGTERM back inside the block; it arrives as the block ends, which must be inside the `try` that
    cleans up what the block made (a temporary file a handler that raises would otherwise leave unnamed)."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def commit_directory(tmp: Path, path: Path) -> None:
    """Flush every file under `tmp` to disk, then rename `tmp` to `path`, replacing an old `path` whole."""
    for item in [*tmp.rglob("*"), tmp]:
        if item.is_dir():
            os.chmod(item, 0o777 & ~UMASK)
            continue
        with open(item, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(item, 0o666 & ~UMASK)
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def claim_output(out: Path, sources: list[Path], what: str, force: bool, is_earlier_output: Callable[[Path], bool],
                 directory: bool, owned: Collection[str] = ()) -> None:
    """Refuse to write `what` (a directory, or a file) at `out` where that would lose something the user did not
    ask to lose: `out` is a symbolic link, or one of the `sources` or inside or around one; or `out` exists (a
    non-empty directory, or a file) and is not an earlier output of the same kind being replaced with `force`,
    or (a directory) holds anything besides the `owned` names its writer writes. Then clear what an interrupted
    earlier write of `out` left beside it."""
    given = Path(out)
    if given.is_symlink():
        raise MiniLlamaError(f"{given} is a symbolic link (to {os.readlink(given)}); give the path it points to, or a new "
                             f"path for the {what}")
    try:
        out = given.resolve()
    except (OSError, RuntimeError) as exc:  # a symbolic link loop above it
        raise MiniLlamaError(f"{given} cannot be resolved ({exc}); give another path for the {what}") from None
    require_folder_of(out, what)
    _check_output(out, sources, what, force, is_earlier_output, directory, owned)
    remove_leftovers_of(out)


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:  # a symbolic link loop
        raise MiniLlamaError(f"{path} cannot be resolved ({exc}); pass the file itself") from None


def _check_output(out: Path, sources: list[Path], what: str, force: bool, is_earlier_output: Callable[[Path], bool],
                  directory: bool, owned: Collection[str]) -> None:
    for source in (_resolved(Path(s)) for s in sources):
        if out == source or source in out.parents or out in source.parents:
            raise MiniLlamaError(f"{out} is or holds the source {source}; write the {what} somewhere else")
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() and not out.is_file():  # a FIFO, socket or device: never an earlier output, and opening it may block
        raise MiniLlamaError(f"{out} is a FIFO, socket or device; give a new path for the {what}")
    if out.is_dir() != directory:
        raise MiniLlamaError(f"{out} is {'a file' if directory else 'a directory'}; give a new {'directory' if directory else 'file'} "
                             f"path for the {what}")
    if directory and not any(out.iterdir()):
        return
    if not force:
        raise ArgumentError("{path} already exists; choose a new path for the {what}, or pass {force} to replace an earlier "
                            "{what} there", path=out, what=what)
    if not is_earlier_output(out):
        raise ArgumentError("{path} exists and is not a {what} ({force} replaces only an earlier {what}); choose a new path",
                            path=out, what=what)
    foreign = sorted(p.name for p in out.iterdir() if p.name not in owned and not LEFTOVER.fullmatch(p.name)) if directory else []
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ArgumentError("{path} holds files that a {what} does not ({listed}); {force} replaces only an earlier {what} and "
                            "nothing else: move them away, or choose a new path", path=out, what=what, listed=listed)


def claim_remade_output(out: Path, what: str, is_earlier_output: Callable[[Path], bool]) -> None:
    """For an output a command makes anew on every call (a report, a plot, harness results): `out` may be new or an
    earlier `what`, which is replaced; anything else there is the user's, and is refused before any work."""
    out = Path(out)
    if out.is_symlink():
        raise MiniLlamaError(f"{out} is a symbolic link (to {os.readlink(out)}); give the path it points to, or a new path "
                             f"for the {what}")
    if out.is_dir():
        raise MiniLlamaError(f"{out} is a directory; give a file name for the {what}")
    if out.exists() and not is_earlier_output(out):
        raise MiniLlamaError(f"{out} exists and is not a {what} Mini Llama wrote; it stays as it is: choose another path")


class DirectoryLock:
    """An OS lock (flock) on DIR/.lock, held while one command owns DIR: a second command on the same folder is
    refused, naming the process that holds it. The OS drops the lock when the holder dies, even by kill -9, so a
    lock is never stale; a .lock file left by a killed holder means nothing by itself. A .lock file the lock
    created is removed on release, and a folder it had to create too if the command left nothing in it."""

    fd: int | None

    def __init__(self, folder: Path, what: str, lock_name: str = ".lock", busy: str | None = None):
        self.folder = folder = Path(folder)
        self.lock_file = folder / lock_name
        self.created = not folder.exists()
        self.created_file = not self.lock_file.exists()
        folder.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o666 & ~UMASK)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise MiniLlamaError((busy or f"{folder} is in use by another {what} (process {{holder}}); wait for it to end, "
                                  "or use another folder").format(holder=holder)) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is None:
            return
        if self.created_file:  # the folder is left as it was found (removed while held: no other command uses it)
            os.unlink(self.lock_file)
            if self.created and not any(self.folder.iterdir()):
                self.folder.rmdir()
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def output_lock(out: Path, what: str) -> DirectoryLock:
    """Held while one command writes `out` (a file or a folder): a second command writing the same path at the same
    time is refused, instead of both succeeding and one silently replacing the other. The lock is .OUT.lock beside it."""
    out = Path(out).absolute()
    return DirectoryLock(out.parent, what, f".{out.name}.lock",
                         busy=f"{out} is being written by another {what} (process {{holder}}); wait for it to end, or choose another path")
