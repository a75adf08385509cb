"""Files written so that a crash or an interrupt (a notebook's KeyboardInterrupt) never leaves half of one."""

import os
import re
import tempfile
from pathlib import Path


def replace_atomically(path, write, binary=False, fsync=False, newline=None):
    """``write(file)`` to a temporary file in ``path``'s folder, then os.replace: ``path`` is either the old file or
    the new one, never a partial file; an error or interrupt on the way removes the temporary file. ``fsync`` also
    flushes the data to disk before the rename (checkpoints). A process killed mid-write (SIGKILL, out of memory)
    cannot remove its temporary file: once the rename succeeds, :func:`_remove_stale_temps` removes ``path``'s
    earlier ones. Returns ``path`` as a string."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    started = os.fstat(fd).st_mtime_ns  # the file system's clock, as the stale files' times (NFS: not ours)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; these get a plain file's permissions
        with os.fdopen(fd, "wb" if binary else "w", newline=newline) as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _remove_stale_temps(path, started)
    return str(path)


def _remove_stale_temps(path, started):
    """Remove the temporary files of ``path`` (mkstemp's ``.<name>.XXXXXXXX.tmp``, nothing else) last written before
    ``started``: left by writers killed before their rename (each checkpoint-sized). A writer of the same path that
    wrote since then keeps its file (two writers of one path race anyway); one that vanished meanwhile, or one this
    user may not remove, is left as it is: the save itself has succeeded."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.tmp")
    for entry in os.scandir(path.parent):
        if not pattern.fullmatch(entry.name):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime_ns < started:
                os.unlink(entry.path)
        except OSError:
            pass


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
