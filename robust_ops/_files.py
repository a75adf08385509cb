"""Files written so that a crash or an interrupt (a notebook's KeyboardInterrupt) never leaves half of one."""

import os
import re
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows: no way to tell a live writer's temporary file, so none is removed
    fcntl = None


def replace_atomically(path, write, binary=False, fsync=False, newline=None):
    """``write(file)`` to a temporary file in ``path``'s folder, then os.replace: ``path`` is either the old file or
    the new one, never a partial file; an error or interrupt on the way removes the temporary file. ``fsync`` also
    flushes the data to disk before the rename (checkpoints). A process killed mid-write (SIGKILL, out of memory)
    cannot remove its temporary file: once the rename succeeds, :func:`_remove_stale_temps` removes ``path``'s
    earlier ones whose writers are gone. Returns ``path`` as a string."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    started = os.fstat(fd).st_mtime_ns  # the file system's clock, as the stale files' times (NFS: not ours)
    # Held until after the rename, through a second descriptor (closing the file would release it): another writer
    # of this path removes only temporary files whose lock it can take, i.e. whose writer is gone.
    lock = _hold_lock(fd)
    try:
        # the file object first: it closes ``fd`` whatever fails (a mount refusing chmod left one open per save)
        with os.fdopen(fd, "wb" if binary else "w", newline=newline) as f:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; these get a plain file's permissions
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        if lock is not None:
            os.close(lock)
    _remove_stale_temps(path, started)
    return str(path)


def _hold_lock(fd):
    """An exclusive flock on ``fd``'s file through a duplicate descriptor (returned; None without fcntl)."""
    if fcntl is None:
        return None
    lock = os.dup(fd)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
    except OSError:  # a file system without flock: the file is then never taken for a dead writer's either
        os.close(lock)
        return None
    return lock


def _remove_stale_temps(path, started):
    """Remove the temporary files of ``path`` (mkstemp's ``.<name>.XXXXXXXX.tmp``, nothing else) last written before
    ``started`` whose writer is gone: left by writers killed before their rename (each checkpoint-sized). A live
    writer holds its file's lock (released by the kernel when it dies), so its file stays however long ago it last
    wrote (a benchmark writing the same CSV meanwhile); one that vanished meanwhile, or one this user may not open or
    remove, is left as it is: the save itself has succeeded."""
    if fcntl is None:
        return
    pattern = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.tmp")
    for entry in os.scandir(path.parent):
        if not pattern.fullmatch(entry.name):
            continue
        try:
            if not entry.is_file(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_mtime_ns >= started:
                continue
            fd = os.open(entry.path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError (an OSError): its writer is alive
            os.unlink(entry.path)
        except OSError:
            pass
        finally:
            os.close(fd)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
