"""Writing result folders and tensor files without losing the old ones on failure."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cxr_fast.errors import CxrFastError


def check_folder_path(folder: str | Path, flag: str | None) -> None:
    """Refuse, before any slow work, a folder path that runs into a file (the path itself, or a folder on the way to
    it) or into a folder that cannot be written: creating it would fail only after the work was done. `flag` names
    the option that chose the path; None for a folder the command chose (a run's eval/ or interpret/)."""
    folder = Path(folder).absolute()
    choose = f"; choose another {flag}" if flag else ""
    try:
        existing = next(p for p in (folder, *folder.parents) if p.exists())
    except OSError as e:  # a name over 255 bytes, a path over the system's limit: the path, not a traceback
        raise CxrFastError(f"{folder}: {e.strerror or e}{choose}") from None
    # every part, not only those to be made: Windows takes "C:\\x\\nul" for the device NUL, which exists
    if os.name == "nt" and (reserved := [part for part in folder.parts[1:] if WINDOWS_RESERVED.fullmatch(part)]):
        raise CxrFastError(f"{folder}: {reserved[0]!r} is a name Windows keeps for a device{choose}")
    if not existing.is_dir():
        raise CxrFastError(f"{existing}: exists and is not a folder ("
                           + (f"choose another {flag})" if flag else "move it away)"))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CxrFastError(f"{existing}: cannot be written (read-only or not yours"
                           + (f"; choose another {flag})" if flag else ")"))


def clear_run_folder(run_dir: Path, keep: bool) -> None:
    """Remove a run folder that holds nothing finished; one the user made (`keep`) is emptied instead."""
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for child in run_dir.iterdir():
        shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)


def _marked(folder: Path) -> Path:
    """The path locks and reader marks are named after: resolved, so that a folder reached through a link and by its
    own path is one folder to every process (a training run reading `data -> /srv/xrays/v2` and a `prepare --force`
    of /srv/xrays/v2 see each other)."""
    return Path(folder).resolve()


def lock_path(folder: Path) -> Path:
    """`.NAME.lock` beside `folder`: there, holding its pid and host, while a cxrfast process writes `folder`."""
    folder = _marked(folder)
    return folder.with_name(f".{folder.name}.lock")


_held: dict[Path, int] = {}  # the locks this process holds, and how many `writing` blocks hold each


@contextmanager
def writing(folder: Path) -> Iterator[None]:
    """Hold `folder`'s lock (`lock_path`) while this process writes it: another cxrfast process that is to write the
    same folder refuses in one line instead of deleting or mixing with this one's work, and `settle_move` and
    `settle_replacement` leave this one's work folders alone. A lock whose process is gone (a kill -9) is stale and
    taken over. Nested blocks on one folder share the lock. A folder with nowhere to put a lock (the parent cannot be
    written, as above a mount point) is written unlocked, as before locks existed."""
    if not _marked(folder).name:  # a file system's root has nothing beside it to hold a lock
        yield
        return
    lock = lock_path(folder)
    made = [p for p in lock.parents if not p.exists()]  # folders the lock needs made: removed with it if left empty
    held = lock in _held or _claim(lock, folder)
    if held:
        _held[lock] = _held.get(lock, 0) + 1
    try:
        yield
    finally:
        if held:
            _held[lock] -= 1
            if not _held[lock]:
                del _held[lock]
                lock.unlink(missing_ok=True)
        for parent in made:  # the deepest first
            try:
                parent.rmdir()
            except OSError:  # the command's results are in it
                break


def _claim(lock: Path, folder: Path) -> bool:
    """Create `lock` (exclusively: of two processes, one succeeds), or refuse when a live process holds it. False when
    it cannot be created at all (see `writing`)."""
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # a path through a file, a read-only folder: the command's own checks say so
        return False
    for _ in range(3):  # a stale lock removed, or one that vanished while it was read: try again
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = busy(folder)
            if holder is not None:
                raise CxrFastError(holder) from None
            continue
        except OSError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        return True
    raise CxrFastError(f"{folder}: cannot take its lock {lock}; if no cxrfast process is writing it, delete that file")


def busy(folder: Path) -> str | None:
    """Why `folder` must be left alone, in one line, when another live cxrfast process is writing it (holds its
    lock); None when none is. A stale lock (its process gone, or this one's pid on a lock it does not hold: a reused
    pid) is removed here."""
    if not _marked(folder).name:
        return None
    lock = lock_path(folder)
    if lock in _held or (holder := _holder(lock)) is None:
        return None
    return (f"{folder}: is being written by another cxrfast process ({holder}); wait for it to finish (if none is "
            f"running, delete {lock})")


def _holder(lock: Path) -> str | None:
    """The live process that `lock` (a `writing` lock or a `reading` marker, holding "pid host") names, as "pid N" or
    "pid N on HOST"; None when there is no such file, or when its process is gone (a kill -9) or is this one (a reused
    pid: the callers skip what this process holds): then the stale file is removed."""
    try:
        text = lock.read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        text = ""
    pid, _, host = text.strip().partition(" ")
    if pid.isdigit() and host == socket.gethostname() and (int(pid) == os.getpid() or not _alive(int(pid))):
        with contextlib.suppress(OSError):
            if lock.read_text(encoding="utf-8", errors="replace") == text:  # not taken over meanwhile by a process that found it stale too
                lock.unlink()
        return None
    # Empty while its process is about to fill it; another machine's process cannot be checked from here
    return f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "") if pid else "a process"


def _reader_prefix(folder: Path) -> str:
    return f".{_marked(folder).name}.reader-"


def reader_path(folder: Path) -> Path:
    """`.NAME.reader-PID-HOST.lock` beside `folder`: there, holding its pid and host, while this process reads the
    data in `folder` (`reading`)."""
    folder = _marked(folder)
    host = UNPORTABLE_CHARACTERS.sub("_", socket.gethostname())
    return folder.with_name(f"{_reader_prefix(folder)}{os.getpid()}-{host}.lock")


_reading: dict[Path, int] = {}  # the reader marks this process holds, and how many `reading` blocks hold each


@contextmanager
def reading(folder: Path) -> Iterator[None]:
    """Mark `folder` as read by this process (`reader_path`) while the block runs: a process that is to replace what
    is in it (`prepare --force` of a dataset a training run reads) asks `readers` and refuses in one line instead of
    changing the data under this one. Refuses in one line itself while another process is writing `folder` (`busy`).
    Marks of many readers live side by side; nested blocks of one process share one. Where nothing can be written
    beside `folder` (a read-only shared dataset) it is read unmarked, as `writing` writes unlocked there; a mark
    whose process is gone is stale and removed by the next look."""
    folder = Path(folder).absolute()
    if not _marked(folder).name:
        yield
        return
    marker = reader_path(folder)
    if marker not in _reading:
        try:
            marker.write_text(f"{os.getpid()} {socket.gethostname()}\n", encoding="utf-8")
        except OSError:
            with contextlib.suppress(OSError):
                marker.unlink(missing_ok=True)  # a half-written mark would read as a live reader
            marker = None
    if marker is not None:
        _reading[marker] = _reading.get(marker, 0) + 1
    try:
        if (holder := busy(folder)) is not None:  # checked after the mark is made: of a reader and a writer
            raise CxrFastError(holder)  # starting at once, one of them refuses (or both), never neither
        yield
    finally:
        if marker is not None:
            _reading[marker] -= 1
            if not _reading[marker]:
                del _reading[marker]
                marker.unlink(missing_ok=True)


def readers(folder: Path) -> str | None:
    """Why `folder`'s contents must not be replaced now, in one line, when another live cxrfast process reads it
    (`reading`); None when none does. Stale marks are removed here."""
    prefix = _reader_prefix(folder)
    try:
        marks = sorted(p for p in _marked(folder).parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(".lock"))
    except OSError:
        return None
    for mark in marks:
        if mark not in _reading and (holder := _holder(mark)) is not None:
            return (f"{folder}: is being read by another cxrfast process ({holder}: a train, evaluate, interpret or "
                    f"ensemble); wait for it to finish (if none is running, delete {mark})")
    return None


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (on this machine). Windows has no signal 0 (os.kill would end the process), so a
    lock there is taken as held until its process removes it, or the user does."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def _scratch(folder: Path, final: Path) -> Iterator[Path]:
    """`folder`, made fresh, and removed again if the block fails or is interrupted. A storage error that names no
    file (a full disk met inside PIL, pandas or matplotlib) is given `final`, the folder being written, to name."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        yield folder
    except BaseException as e:
        shutil.rmtree(folder, ignore_errors=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(final)
        raise


@contextmanager
def replacing_folder(out_dir: Path, *, force: bool, what: str) -> Iterator[Path]:
    """Yield a fresh sibling folder to write into; only when the block succeeds does it replace `out_dir`.

    Without `force` an existing `out_dir` is an error. With it, the old results stay untouched until the new
    ones are complete, so a crash or Ctrl-C halfway never leaves the user with neither.
    """
    out_dir = Path(out_dir).absolute()  # "." has no name to put beside
    with writing(out_dir):  # another process's work folder is never taken for a killed one's and started afresh
        settle_replacement(out_dir)
        if out_dir.exists() and not force:
            raise CxrFastError(f"{out_dir}: {what} is already there; add --force to redo it")
        old, partial = _beside(out_dir)
        with _scratch(partial, out_dir):
            yield partial
        # The old results are moved aside before the new ones take their name and deleted only after: a kill at any
        # point leaves one of them whole (in `out_dir`, or beside it, where the next call's settle_replacement looks).
        shutil.rmtree(old, ignore_errors=True)
        if out_dir.exists():
            out_dir.rename(old)
        partial.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)


def _beside(out_dir: Path) -> tuple[Path, Path]:
    """`replacing_folder`'s two hidden siblings of `out_dir`: the old results set aside, and the new ones in the making."""
    return out_dir.with_name(f".{out_dir.name}.old"), out_dir.with_name(f".{out_dir.name}.partial")


def settle_replacement(out_dir: Path) -> None:
    """Finish a `replacing_folder` that a kill stopped between its two renames (`.NAME.old` there, `out_dir` not): the
    new results in `.NAME.partial`, complete since only complete ones reach the renames, take the name; without
    them the old results come back. Called before anything checks whether `out_dir` exists. A replacement that
    another process is making (`busy`) is not a killed one: it is left to finish."""
    out_dir = Path(out_dir).absolute()
    old, partial = _beside(out_dir)
    if old.exists() and not out_dir.exists() and busy(out_dir) is None:
        (partial if partial.exists() else old).rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def new_folder(out_dir: Path) -> Iterator[Path]:
    """Yield a folder to write into that becomes `out_dir` only when the block succeeds, so a crash or Ctrl-C halfway
    leaves no half-written `out_dir` to block the rerun. `out_dir` must be absent or empty; an empty one (the current
    folder, a mount point) is kept and filled, not replaced."""
    out_dir = Path(out_dir).absolute()
    with writing(out_dir):  # another process's work folder is never taken for a killed one's and started afresh
        existed = out_dir.exists()
        if existed and any(p.name != PARTIAL_INSIDE for p in out_dir.iterdir()):  # filled since the caller's check
            raise CxrFastError(f"{out_dir}: already holds results (another process's?); choose another folder")
        partial = out_dir / PARTIAL_INSIDE if existed else out_dir.with_name(f".{out_dir.name}.partial")
        with _scratch(partial, out_dir):
            yield partial
        if existed:
            for child in partial.iterdir():
                child.rename(out_dir / child.name)
            partial.rmdir()
        else:
            partial.rename(out_dir)


PARTIAL_INSIDE = ".partial"  # new_folder's work folder inside an existing --out; a killed run's one does not count


def settle_move(out_dir: Path) -> None:
    """Finish a `new_folder` into an existing folder that a kill stopped while it moved the results in: some are in
    `out_dir`, the rest still in its work folder, complete since only complete results are moved. (A work folder
    alone is a block that never finished: `new_folder` starts it afresh.) Called before a command judges `out_dir`. A
    move that another process is making (`busy`) is not a killed one: it is left to finish."""
    partial = Path(out_dir) / PARTIAL_INSIDE
    if not partial.is_dir() or not any(p.name != PARTIAL_INSIDE for p in Path(out_dir).iterdir()) or busy(out_dir):
        return
    for child in partial.iterdir():
        child.rename(Path(out_dir) / child.name)
    partial.rmdir()


@contextmanager
def work_folder_inside(out_dir: Path) -> Iterator[Path]:
    """A fresh work folder inside the existing `out_dir`, removed again if the block fails or is interrupted: for
    results that the block itself moves in beside files of `out_dir` that must stay. Inside, not beside, so that the
    moves are renames even when `out_dir` is a mount point."""
    out_dir = Path(out_dir).absolute()
    with writing(out_dir), _scratch(out_dir / PARTIAL_INSIDE, out_dir) as work:
        yield work


def printable(name: str) -> str:
    """A file name as text any file or console takes: bytes that are not UTF-8 (which Python keeps in a name as
    surrogates, and a UTF-8 writer refuses) written as \\x escapes."""
    return str(name).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# Names Windows keeps for devices, with any extension and in any folder ("nul.txt" is the device NUL): a folder so
# named cannot be made there, or a file written into the device. Linux takes them; refused on Windows only.
WINDOWS_RESERVED = re.compile(r"(CON|PRN|AUX|NUL|COM[1-9¹²³]|LPT[1-9¹²³])[ .]*(\..*)?", re.IGNORECASE)

# Characters Windows, and the FAT and exFAT file systems of USB sticks, refuse in a file name (Linux takes them all).
UNPORTABLE_CHARACTERS = re.compile(r'[<>:"/\\|?*\x00-\x1f]')


def short_stem(stem: str, max_bytes: int = 200) -> str:
    """`stem` as printable text (bytes of a name that is not UTF-8 as \\x escapes), cut to `max_bytes` of UTF-8, so
    that an output name built from an input's name (plus a prefix or a suffix) is one any file system, web page or
    zip takes, within the 255 bytes file systems allow. A character Windows or a USB stick refuses (a PACS export's
    time stamp 12:30:01) becomes "_": a run folder must copy there whole."""
    return UNPORTABLE_CHARACTERS.sub("_", printable(stem)).encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def csv_text(frame) -> str:
    """A DataFrame as CSV text for `write_text`, rows ended by "\\n" as text files are: pandas ends them with
    os.linesep, which on Windows the text writer then turned into "\\r\\r\\n" (a blank row after each in Excel)."""
    return frame.to_csv(index=False, lineterminator="\n")


def write_text(path: Path, text: str) -> None:
    """A text file written whole, then renamed over `path`: a replaced file is never left half-written."""
    write_texts({path: text})


def partial_path(path: Path) -> Path:
    """Where a file is written before it is renamed over `path` (hidden, and named so that the code recognising a
    killed write's leftovers — train's first-epoch check, export's folder check — has one name to know)."""
    return path.with_name(f".{path.name}.partial")


def write_texts(texts: dict[Path, str]) -> None:
    """Text files that belong together (a manifest and its report), each written whole beside its place, and only
    then all renamed over their paths, in the order given: a full disk or Ctrl-C while writing leaves every old file
    as it was, never some new files beside old ones. (Renames need no space; only a kill in the moment between two
    of them could still split the set.)"""
    partials = {path: partial_path(path) for path in texts}
    try:
        for path, partial in partials.items():
            _written(partial, path, functools.partial(partial.write_text, texts[path], encoding="utf-8"))
    except BaseException:
        for partial in partials.values():  # the ones already written whole, too
            partial.unlink(missing_ok=True)
        raise
    for path, partial in partials.items():
        partial.replace(path)


def write_bytes(path: Path, data: bytes) -> None:
    """`write_text` for bytes (a figure's PNG): written whole, then renamed over `path`."""
    partial = partial_path(path)
    _written(partial, path, lambda: partial.write_bytes(data))
    partial.replace(path)


def write_tensors(tensors: dict, path: Path) -> None:
    """A safetensors file, written then renamed, so a kill during the write leaves the previous file whole, never
    half of a new one. Written as bytes, so it gets the usual permissions (safetensors' own writer makes files only
    their owner can read, which locks colleagues out of a shared model folder)."""
    from safetensors.torch import save

    partial = partial_path(path)
    _written(partial, path, lambda: partial.write_bytes(save({k: v.contiguous() for k, v in tensors.items()})))
    partial.replace(path)


def _written(tmp: Path, path: Path, write) -> None:
    """Run `write` into `tmp`, removing what it left when it fails (a full disk): a stray half file helps no one.
    The error names `path`, which a failed write() alone does not."""
    try:
        write()
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)
        raise
