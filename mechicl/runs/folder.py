"""The one writer of run folders: CSV tables, markdown, JSON configs, and paths for plots and pages.

Every command writes through a ``RunFolder`` and formats tables with ``md_table``; ``Clock`` times
its stages. Nothing else in mechicl writes files (``models.organism`` writes checkpoints).

Atomic run folders: ``with staged(out, ...) as tmp:`` hands out a hidden sibling folder
(``.<name>.partial-XXXX``) that the command writes into (``RunFolder(tmp)``); only when the block
ends without an exception does it write ``manifest.json`` (command, config, versions, every file's
sha256 and size, wall time) and rename the folder to ``out``. An error or Ctrl-C removes the
partial folder, so ``out`` is either absent, the previous complete folder, or complete per its
manifest (``verify_manifest``). ``check_out`` refuses a file, an unwritable place, a system folder,
a dangling symlink or an existing non-empty folder (unless ``overwrite``) before any compute; a
symlink to a folder is followed (the run replaces the folder it points to; the link stays).

Exclusive: ``staged`` holds an exclusive lock (``.<name>.lock`` beside ``out``, ``fcntl.flock``)
from its start (before compute) to the publish, so a second run on the same ``out`` fails at once
with ``OutputError``; holding it, it removes the ``.<name>.partial-*`` / ``.<name>.old-*`` folders
that killed runs left behind. SIGTERM is handled like Ctrl-C (``Terminated``: the partial folder
is removed; the CLI exits 143 with one line).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from mechicl.errors import OutputError
from mechicl.runs.args import Terminated


def safe_name(s: str) -> str:
    """``s`` as one plain file-name part: characters other than letters, digits, ``-_.`` become ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def default_out(kind: str, model: str, task: str) -> Path:
    """``runs/<time>-<kind>-<model>-<task>`` with unsafe characters replaced."""
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{safe_name(model)}-{safe_name(task)}"


SYSTEM_DIRS = ("/proc", "/sys", "/dev")
MANIFEST = "manifest.json"


def _missing_ancestor(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet, or None."""
    first = None
    for p in [path, *path.parents]:
        if p.exists():
            return first
        first = p
    return first


def check_out(out: Path | str, overwrite: bool = False) -> Path:
    """``out`` as an absolute path if a run folder can be written there; else ``OutputError`` naming the fix."""
    out = _follow_link(Path(out).expanduser().absolute())
    if any(out == Path(d) or Path(d) in out.parents for d in SYSTEM_DIRS):
        raise OutputError(f"--out {out} is under a system folder ({', '.join(SYSTEM_DIRS)}); pick a folder of your own")
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise OutputError(f"--out {out} is an existing file, not a folder; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"--out {out} exists and is not empty; pass --overwrite to replace it, or another --out")
    base = next(p for p in [out.parent, *out.parent.parents] if p.exists())
    if not base.is_dir():
        raise OutputError(f"cannot create --out {out}: {base} is a file")
    if not os.access(base, os.W_OK | os.X_OK) or (out.exists() and not os.access(out.parent, os.W_OK | os.X_OK)):
        raise OutputError(f"cannot write to {base} (permission denied); pass an --out folder you can write to")
    return out


def _follow_link(out: Path) -> Path:
    """``out`` itself, or the folder a symlink ``out`` points to; ``OutputError`` for a dangling link or one to a file."""
    if not out.is_symlink():
        return out
    target = out.resolve()
    if not target.exists():
        raise OutputError(
            f"--out {out} is a symlink to {target}, which does not exist; create {target} or pass another --out"
        )
    if not target.is_dir():
        raise OutputError(f"--out {out} is a symlink to the file {target}, not a folder; pass a folder path")
    return target


@contextmanager
def exclusive(out: Path, busy: str = "") -> Iterator[None]:
    """Hold the lock file ``.<name>.lock`` beside ``out`` (created, then removed at the end), so only one run writes
    ``out`` at a time; another holder makes it raise ``OutputError`` at once (it does not wait), with ``busy``
    (``{pid}`` = the holder's) as the message if given."""
    path = out.with_name(f".{out.name}.lock")
    for _ in range(5):  # the holder removes the file as it leaves: retry when we locked a file just removed
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = (path.read_text(encoding="utf-8", errors="replace").strip() if path.exists() else "") or "?"
            busy = (
                busy
                or "another mechicl run (pid {pid}) is writing {out} right now; wait for it to finish, or pass another --out"
            )
            raise OutputError(busy.replace("{pid}", holder).replace("{out}", str(out))) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise OutputError(f"could not lock {path}: other runs keep replacing it; retry, or pass another --out")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held: a waiting opener sees another inode and retries
        os.close(fd)


def remove_stale(out: Path) -> list[Path]:
    """Remove the ``.<name>.partial-*`` and ``.<name>.old-*`` folders beside ``out`` that killed runs left
    (call it holding ``exclusive(out)``: no live run owns them then). Returns what was removed."""
    if not out.parent.is_dir():
        return []
    stale = [
        out.parent / n for n in os.listdir(out.parent) if n.startswith((f".{out.name}.partial-", f".{out.name}.old-"))
    ]
    for p in stale:
        if p.is_symlink() or p.is_file():
            p.unlink(missing_ok=True)
        else:
            shutil.rmtree(p, ignore_errors=True)
    return stale


def versions() -> dict[str, str]:
    """Python, platform and the installed versions of the packages a run's numbers depend on."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("mechicl", "torch", "transformer-lens", "transformers", "numpy", "pandas", "scipy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, command: list[str], config: Any, wall_s: float) -> dict:
    """manifest.json: command, config, versions, wall time and each file's sha256 and size (itself excluded)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {
        "command": command,
        "config": config,
        "versions": versions(),
        "wall_time_s": round(wall_s, 3),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": {str(p.relative_to(folder)): {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
    return manifest


def verify_manifest(folder: Path | str) -> list[str]:
    """Problems with a run folder against its manifest (missing, extra or changed files); [] if complete."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        return [f"{folder} has no {MANIFEST}"]
    listed = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
    have = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    problems = [f"missing {n}" for n in sorted(set(listed) - have)]
    problems += [f"not in manifest: {n}" for n in sorted(have - set(listed))]
    problems += [f"changed: {n}" for n in sorted(set(listed) & have) if _sha256(folder / n) != listed[n]["sha256"]]
    return problems


@contextmanager
def _no_interrupt() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back (delivered afterwards) so that the renames that publish a folder are not split."""
    main = sys.platform != "win32" and hasattr(signal, "pthread_sigmask")
    if main:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        if main:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextmanager
def _remember_ctrl_c() -> Iterator[list[bool]]:
    """While running, note every SIGINT (then raise KeyboardInterrupt as usual). A Ctrl-C that lands in a
    finalizer (a weakref callback, ``__del__``) is swallowed by Python ("Exception ignored in ..."); the
    note lets ``staged`` refuse to publish anyway, and such reports are not printed."""
    seen = [False]
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def on_sigint(signum: int, frame: Any) -> None:
        seen[0] = True
        raise KeyboardInterrupt

    def on_sigterm(signum: int, frame: Any) -> None:  # like Ctrl-C: `kill`, a scheduler's time limit
        seen[0] = True
        raise Terminated

    def unraisable(u: Any) -> None:
        if not isinstance(u.exc_value, KeyboardInterrupt):
            hook(u)

    old, hook = signal.signal(signal.SIGINT, on_sigint), sys.unraisablehook
    old_term = signal.signal(signal.SIGTERM, on_sigterm)
    sys.unraisablehook = unraisable
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, old)
        signal.signal(signal.SIGTERM, old_term)
        sys.unraisablehook = hook


@contextmanager
def staged(
    out: Path | str, *, overwrite: bool = False, command: list[str] | None = None, config: Any = None
) -> Iterator[Path]:
    """A hidden sibling folder to write a run into; renamed to ``out`` with a manifest only on success.

    On any exception (Ctrl-C or SIGTERM included, even one Python swallowed in a finalizer) the partial
    folder, and any parent folders created for it, are removed and ``out`` is left as it was. Checks
    ``out`` first (``check_out``), then holds ``exclusive(out)`` throughout and removes stale partials.
    """
    out = check_out(out, overwrite)
    created = _missing_ancestor(out.parent)
    t0 = time.perf_counter()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create a run folder next to {out}: {e.strerror or e}; pass another --out") from e
    try:
        with exclusive(out):
            remove_stale(out)
            check_out(out, overwrite)  # again, holding the lock: a run that just finished may have published it
            with _staged_in(out, command, config, t0) as tmp:
                yield tmp
    except BaseException:
        if created is not None:
            _remove_empty(out.parent, created)
        raise


def _remove_empty(folder: Path, top: Path) -> None:
    """Remove ``folder`` and its parents up to ``top`` while they are empty (those a failed run created;
    a folder another run is writing into is not empty and stays)."""
    for p in [folder, *folder.parents]:
        try:
            p.rmdir()
        except OSError:
            return
        if p == top:
            return


@contextmanager
def _staged_in(out: Path, command: list[str] | None, config: Any, t0: float) -> Iterator[Path]:
    """``staged``'s body, holding the lock: the partial folder, removed on any exception, published on success."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise OutputError(f"cannot create a run folder next to {out}: {e.strerror or e}; pass another --out") from e
    try:
        with _remember_ctrl_c() as ctrl_c:
            yield tmp
            if ctrl_c[0]:
                raise KeyboardInterrupt
            write_manifest(tmp, list(command if command is not None else sys.argv), config, time.perf_counter() - t0)
            _publish(tmp, out)
    except BaseException:
        if tmp.exists():  # not published (a Ctrl-C held back until after the rename finds it gone)
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; a previous ``out`` is moved aside first and deleted after (restored on failure)."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    with _no_interrupt():
        moved = out.exists()
        if moved:
            out.rename(old)
        try:
            tmp.rename(out)
        except OSError as e:
            if moved:
                old.rename(out)
            raise OutputError(f"could not move the finished run into {out}: {e.strerror or e}") from e
    if moved:
        shutil.rmtree(old, ignore_errors=True)


class RunFolder:
    """A command's output folder; ``files`` lists what it wrote, in order.

    It writes straight into ``path``; commands pass the partial folder from ``staged``, which
    publishes it atomically (see the module docstring).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.files: list[Path] = []

    def __truediv__(self, name: str) -> Path:
        """The path of file ``name`` for a writer that takes a path (plots, HTML); recorded as written."""
        p = self.path / name
        self.files.append(p)
        return p

    def csv(self, name: str, df: pd.DataFrame) -> Path:
        p = self / name
        df.to_csv(p, index=False)
        return p

    def text(self, name: str, text: str) -> Path:
        p = self / name
        p.write_text(text, encoding="utf-8")
        return p

    def json(self, name: str, obj: Any) -> Path:
        """A dataclass (or a dict) as indented JSON, e.g. the exact configuration of the run."""
        return self.text(name, json.dumps(asdict(obj) if is_dataclass(obj) else obj, indent=2))

    def names(self) -> str:
        return ", ".join(dict.fromkeys(p.name for p in self.files))


class Clock:
    """Wall and process-CPU seconds per stage (CPU time is what a busy shared machine does not inflate)."""

    def __init__(self) -> None:
        self.t0 = self.t = time.perf_counter()
        self.c0 = time.process_time()
        self.laps: list[tuple[str, float]] = []

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps.append((name, now - self.t))
        self.t = now

    def line(self) -> str:
        stages = ", ".join(f"{n} {s:.0f} s" for n, s in self.laps)
        return (
            f"Wall time {time.perf_counter() - self.t0:.0f} s, process CPU time {time.process_time() - self.c0:.0f} s "
            f"(model load excluded; stages: {stages})."
        )
