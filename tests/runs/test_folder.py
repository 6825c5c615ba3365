"""Publishing a run folder is exclusive and survives kills: one writer per --out (a lock taken before compute),
stale partial folders of killed runs removed, SIGTERM handled like Ctrl-C, symlinked --out followed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

from mechicl.errors import OutputError
from mechicl.runs.folder import MANIFEST, check_out, staged, verify_manifest
from mechicl.runs.markdown import md_table


def test_a_second_run_on_the_same_out_fails_at_once_and_the_first_publishes(tmp_path):
    out = tmp_path / "run"
    with staged(out) as tmp:
        (tmp / "a.txt").write_text("first")
        with pytest.raises(OutputError, match=f"another mechicl run \\(pid {os.getpid()}\\) is writing"):
            with staged(out, overwrite=True):
                pytest.fail("the second run must not start")  # pragma: no cover
    assert (out / "a.txt").read_text() == "first" and verify_manifest(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no lock file, no partial folder left


def test_stale_partial_folders_of_killed_runs_are_removed_by_the_next_run(tmp_path):
    for name in (".run.partial-k1ll", ".run.old-4242", ".other.partial-keep"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.csv").write_text("1\n")
    with staged(tmp_path / "run") as tmp:
        (tmp / "b.txt").write_text("b")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-keep", "run"]


def test_a_symlinked_out_is_followed_and_stays_a_link(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "old.txt").write_text("old")
    link = tmp_path / "link"
    link.symlink_to(real)
    with staged(link, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert link.is_symlink() and link.resolve() == real
    assert sorted(p.name for p in real.iterdir()) == [MANIFEST, "new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no .link.old-PID left behind


def test_a_dangling_or_file_symlink_is_refused_before_compute(tmp_path):
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="symlink to .*nowhere, which does not exist; create"):
        check_out(dangling)
    (tmp_path / "f.txt").write_text("x")
    to_file = tmp_path / "to_file"
    to_file.symlink_to(tmp_path / "f.txt")
    with pytest.raises(OutputError, match="symlink to the file"):
        check_out(to_file)


SCRIPT = """
import sys, time
from mechicl.runs.args import run_command
from mechicl.runs.folder import staged

def work(_):
    with staged(sys.argv[1]) as tmp:
        (tmp / "half.csv").write_text("1\\n")
        print("ready", flush=True)
        time.sleep(60)
    return 0

sys.exit(run_command(work, None))
"""


def test_sigterm_removes_the_partial_folder_and_exits_143_with_one_line(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert err.strip().splitlines() == ["mechicl: terminated (SIGTERM); no partial run folder was left"]
    assert list(tmp_path.iterdir()) == []  # no partial folder, no lock file


def test_markdown_tables_escape_user_text():
    """A task row or label word cannot break a summary table or open an HTML tag in a viewer that renders inline
    HTML (issue 30): '|' is escaped, a newline becomes a space, '<' before a tag name is '&lt;'."""
    evil = "</script><script>alert(1)</script> a|b\nc <!-- x"
    table = md_table(pd.DataFrame({"text": [evil, "p <= 0.01"], "n": [1.0, 2.0]}))
    rows = table.splitlines()
    assert len(rows) == 4  # header, rule, two rows: the newline did not start a row
    assert all(r.count(" | ") - r.count("\\| ") == 1 for r in rows[2:])  # two columns in every row
    assert "<script" not in table and "</" not in table and "<!--" not in table
    assert "&lt;/script>&lt;script>alert(1)&lt;/script> a\\|b c &lt;!-- x" in rows[2]
    assert "p <= 0.01" in rows[3]  # comparisons stay readable
