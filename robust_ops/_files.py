"""Files written so that a crash or an interrupt (a notebook's KeyboardInterrupt) never leaves half of one."""

import contextlib
import errno
import os
import re
import shutil
import stat
import tempfile
import threading
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows: no way to tell a live writer's temporary file, so none is removed
    fcntl = None


def replace_atomically(path, write, binary=False, fsync=False, newline=None):
    """``write(file)`` to a temporary file in ``path``'s folder, then os.replace: ``path`` is either the old file or
    the new one, never a partial file; an error or interrupt on the way removes the temporary file. ``fsync`` also
    flushes the data to disk before the rename (checkpoints). A process killed mid-write (SIGKILL, out of memory)
    cannot remove its temporary file: before the write and once the rename succeeds, :func:`_remove_stale_temps`
    removes ``path``'s earlier ones whose writers are gone. A write that fails (a full disk) is an OSError naming
    ``path``. Returns ``path`` as a string."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:  # it named the temporary file (a folder made read-only): the file being written
        raise OSError(err.errno, err.strerror, str(path)) from None
    lock = None
    try:  # right from mkstemp: a Ctrl-C or SIGTERM while the lock was taken left the file behind
        try:
            started = os.fstat(fd).st_mtime_ns  # the file system's clock, as the stale files' times (NFS: not ours)
            # Held until after the rename, through a second descriptor (closing the file would release it): another
            # writer of this path removes only temporary files whose lock it can take, i.e. whose writer is gone.
            lock = _hold_lock(fd)
            # Before writing too: a killed writer's file (checkpoint-sized) on a disk with room for two checkpoints
            # left none for this one, so every resume failed (No space left on device) until it was found by hand.
            _remove_stale_temps(path, started)
            # closefd=False: ``fd`` has one owner, the finally below, whatever fails (a mount refusing chmod left one
            # open per save); a Ctrl-C between fdopen and ``as f`` closed it twice (EBADF, the file left behind)
            with os.fdopen(fd, "wb" if binary else "w", newline=newline, closefd=False) as f:
                os.fchmod(fd, _mode_for(path))  # mkstemp creates 0600
                write(f)
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        # a failed write (a full disk) named no file: Python's "[Errno 28] No space left on device", or torch.save's
        # zip writer's "unexpected pos 225920 vs 225808", raised while that OSError was handled
        failed = err if isinstance(err, OSError) else err.__context__ if isinstance(err, RuntimeError) else None
        if isinstance(failed, OSError) and failed.errno is not None and failed.filename is None:
            raise OSError(failed.errno, failed.strerror, str(path)) from None
        # Ctrl-C or SIGTERM (a KeyboardInterrupt) inside one of the zip writer's writes (the signal breaks the write
        # syscall) left its record half written, and its end-of-file write then failed on that ("unexpected pos"): the
        # interrupt is what happened, not a RuntimeError (train ended in a traceback and status 1, not 130 / 143)
        if isinstance(err, RuntimeError) and isinstance(err.__context__, (KeyboardInterrupt, SystemExit)):
            raise err.__context__.with_traceback(err.__context__.__traceback__) from None
        raise
    finally:
        if lock is not None:
            os.close(lock)
    _remove_stale_temps(path, started)
    return str(path)


def check_writable(folder):
    """Raise the OSError of creating an entry in ``folder`` (read-only, another user's, /proc); nothing is left behind.
    Checked by writing: os.access says yes to root everywhere."""
    os.rmdir(tempfile.mkdtemp(prefix=".robust-ops-write-check-", dir=folder))


NOT_A_FOLDER = "it exists and is not a folder"


class OutDirProblem(str):
    """out_dir_problem's reason, a str; ``errno``: the number of the OSError that refused a write there, else None."""
    errno = None


def out_dir_problem(out_dir, staged=True):
    """Why ``out_dir`` cannot take a command's results, checked before any work (found when the results were written,
    the work was lost); None where it can. The one rule of the CLI's ``--out`` (cli.check_out) and write_results'
    ``out_dir``: :data:`NOT_A_FOLDER` (a file there), ``"<above> is a file, not a folder"`` (it could never be made),
    ``"cannot write in <folder> (<reason>)"`` (an :class:`OutDirProblem` holding the OSError's errno), a link to a
    folder that does not exist. ``staged``: the results are
    staged beside ``out_dir`` and moved in (AtomicOutput), so the folder above must take files too; else only
    ``out_dir`` (or, not made yet, the folder it would be made in) must."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        return NOT_A_FOLDER
    loop = _link_loop(out)
    if loop is not None:  # pathlib's exists() reads it as missing: "does not exist", or ELOOP once the work was done
        return loop
    if out.is_symlink() and not out.exists():  # mkdir cannot follow it: "File exists" once the work was done
        return f"it is a link to {os.readlink(out)}, which does not exist; make that folder first"
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        return f"{above} is a file, not a folder"
    inside = out if out.is_dir() else None
    places = (above, inside) if staged or inside is None else (inside,)
    for folder in dict.fromkeys(f for f in places if f is not None):
        try:
            check_writable(folder)
        except OSError as err:
            problem = OutDirProblem(f"cannot write in {folder} ({err.strerror or err})")
            problem.errno = err.errno
            return problem
    return None


def _link_loop(path):
    """Words for ``path`` (or a folder above it) being links that lead back to themselves, never to a file or folder
    (out -> out2 -> out): ``"it is a link loop (out -> out2 -> out); ..."``; None where following them ends."""
    if not _loops(path):
        return None
    place = next((p for p in (*reversed(Path(path).parents), Path(path)) if _loops(p)), Path(path))
    chain, seen, link = [str(place)], {os.path.abspath(place)}, place
    while link.is_symlink() and len(chain) <= 40:  # the kernel's own limit on links followed
        target = os.readlink(link)
        chain.append(target)
        link = link.parent / target
        if os.path.abspath(link) in seen:
            break
        seen.add(os.path.abspath(link))
    else:  # a loop through a folder above a link, not link to link: the kernel's words
        chain = [str(place), "..."]
    who = "it is" if place == Path(path) else f"{place} is"
    return f"{who} a link loop ({' -> '.join(chain)}): the links lead back to themselves, not to a folder; " \
           f"point one of them at a folder or remove it"


def _loops(path):
    """Whether following ``path``'s links meets a loop (the kernel's ELOOP)."""
    try:
        os.stat(path)
    except OSError as err:
        return err.errno == errno.ELOOP
    return False


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


def make_staging_folder(out_dir):
    """A new folder ``.<name>.partial-XXXXXXXX`` beside ``out_dir`` to write a set of files into before they are moved
    into ``out_dir`` together (evaluate.AtomicOutput). Returns ``(folder, started, lock)`` for
    :func:`remove_staging_folder`: as a temporary file's, the lock marks its writer alive."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    fd = os.open(stage, os.O_RDONLY)
    try:
        started = os.fstat(fd).st_mtime_ns
        lock = _hold_lock(fd)  # a duplicate descriptor: held after ``fd`` closes
    finally:
        os.close(fd)
    return stage, started, lock


def remove_staging_folder(out_dir, stage, started, lock, moved):
    """Remove ``stage`` and release its lock; once its files were ``moved`` into ``out_dir``, also the staging
    folders of ``out_dir`` that killed writers left (SIGKILL: each holds a partial set of results), as a save removes
    its path's dead temporary files."""
    shutil.rmtree(stage, ignore_errors=True)
    if lock is not None:
        os.close(lock)
    if moved:
        _remove_stale(Path(out_dir).parent, re.escape(f".{Path(out_dir).name}.partial-") + r"[a-z0-9_]{8}", started,
                      folders=True)


def _remove_stale_temps(path, started):
    """Remove the temporary files of ``path`` (mkstemp's ``.<name>.XXXXXXXX.tmp``, nothing else) last written before
    ``started`` whose writer is gone: left by writers killed before their rename (each checkpoint-sized)."""
    _remove_stale(path.parent, re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.tmp", started, folders=False)


def _remove_stale(parent, name_pattern, started, folders):
    """Remove ``parent``'s files (``folders``: folders) named by ``name_pattern`` and last written before ``started``
    whose writer is gone. A live writer holds its entry's lock (released by the kernel when it dies), so its entry
    stays however long ago it last wrote (a benchmark writing the same CSV meanwhile); one that vanished meanwhile,
    or one this user may not open or remove, is left as it is: the write itself has succeeded."""
    if fcntl is None:
        return
    pattern = re.compile(name_pattern)
    for entry in os.scandir(parent):
        if not pattern.fullmatch(entry.name):
            continue
        try:
            is_kind = entry.is_dir(follow_symlinks=False) if folders else entry.is_file(follow_symlinks=False)
            if not is_kind or entry.stat(follow_symlinks=False).st_mtime_ns >= started:
                continue
            fd = os.open(entry.path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError (an OSError): its writer is alive
            if folders:
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            pass
        finally:
            os.close(fd)


class FolderInUse(OSError):
    """Another process holds :func:`exclusive_folder`'s lock on ``path``; ``pid`` is its id (None if unknown)."""

    def __init__(self, path, pid):
        who = f"process {pid}" if pid is not None else "another process"
        super().__init__(f"{path} is in use by {who}, which is writing its files")
        self.path, self.pid = path, pid

    def __reduce__(self):
        # OSError's default rebuilt FolderInUse(message) alone: a TypeError for the missing pid; the instance's
        # __dict__ goes with it, as with a plain exception's pickle: its __notes__ and any attribute set on it
        return type(self), (self.path, self.pid), self.__dict__


@contextlib.contextmanager
def exclusive_folder(path):
    """Hold an exclusive flock on the folder ``path`` (made if missing) while the block runs; a second holder raises
    :class:`FolderInUse` at once. Two processes training into one folder each rewrite its checkpoint and run.json,
    and both end "successfully" leaving one run's checkpoint beside the other's run.json. The folder itself is
    locked: no lock file is left in it, and the kernel releases the lock when its holder dies (no stale lock after
    a kill). Without fcntl, or on a file system refusing flock on folders, nothing is locked (as before).
    Re-entrant within a thread: fit holds its out_dir too, inside robust-ops train's hold of the same RUN_DIR (a flock
    is per open file, so a second one would refuse its own process)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    st = os.fstat(fd)
    key = (threading.get_ident(), st.st_dev, st.st_ino)
    try:
        if key not in _HELD_FOLDERS:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FolderInUse(path, _flock_holder(fd)) from None
            except OSError:
                pass  # no flock on this file system: unlocked
        _HELD_FOLDERS[key] = _HELD_FOLDERS.get(key, 0) + 1
        try:
            yield
        finally:
            _HELD_FOLDERS[key] -= 1
            if not _HELD_FOLDERS[key]:
                del _HELD_FOLDERS[key]
    finally:
        os.close(fd)  # the outermost hold's descriptor holds the flock: closing a nested one's releases nothing


# (thread, st_dev, st_ino) of the folders exclusive_folder holds -> how many holds, outermost first
_HELD_FOLDERS = {}


def folder_in_use(path):
    """The :class:`FolderInUse` naming the process holding :func:`exclusive_folder`'s lock on the existing folder
    ``path``, or None when no process holds it (the lock is taken and released at once)."""
    try:
        with exclusive_folder(path):
            return None
    except FolderInUse as err:
        return err


def _flock_holder(fd):
    """The process id holding a flock on ``fd``'s file, from Linux's /proc/locks; None where it cannot be told."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if "FLOCK" in fields and key in fields and "->" not in fields:  # "->": a waiter, not the holder
                    return int(fields[fields.index(key) - 1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _mode_for(path):
    """The permissions of the file replacing ``path``: the old file's (a checkpoint its owner made private stays so,
    as a file written in place does), else a plain file's under the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _umask():
    """The process's umask, read where Linux shows it (/proc/self/status) rather than by setting it: set to 0 to be
    read, it left every file and folder another thread created meanwhile world-writable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)  # elsewhere (or a kernel before 4.7): the only way Python has
    os.umask(mask)
    return mask
