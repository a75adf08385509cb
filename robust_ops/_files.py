"""Files written so that a crash or an interrupt (a notebook's KeyboardInterrupt) never leaves half of one."""

import os
import tempfile
from pathlib import Path


def replace_atomically(path, write, binary=False, fsync=False, newline=None):
    """``write(file)`` to a temporary file in ``path``'s folder, then os.replace: ``path`` is either the old file or
    the new one, never a partial file; an error or interrupt on the way removes the temporary file. ``fsync`` also
    flushes the data to disk before the rename (checkpoints). Returns ``path`` as a string."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
    return str(path)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
