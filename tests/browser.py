"""Open a local HTML page in headless Chromium (Debian's ``chromium``) and record what a reader's browser would see.

One browser, driven over the DevTools protocol on ``--remote-debugging-pipe`` (fd 3 in, fd 4 out, messages
ending in NUL): the page is loaded from ``file://``; every request the page makes (``Network.requestWillBeSent``),
every console error, uncaught exception and error log entry (``Runtime.consoleAPICalled``,
``Runtime.exceptionThrown``, ``Log.entryAdded``) is kept; the child counts of the circuitsvis mount nodes are read
once they are non-zero or the wait runs out; the page's own layout is measured (``LAYOUT``: horizontal overflow,
figure widths; at a 1280-px-wide viewport by default); and a screenshot of the viewport is taken. Cost: about
2-4 s a page.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
)
MOUNTS = "Array.from(document.querySelectorAll('div[id^=\"circuits-vis-\"]')).map(e => e.childElementCount)"
LOCAL = ("file:", "data:")  # schemes a self-contained page may load from
# The page's own layout once it has loaded: how wide the document is against the viewport; every element whose
# right edge passes the content column's (the <main> element's content box, else <body>'s) unless a box between
# it and the column scrolls or clips it (a table in its own scroll box is fine); and each figure image's rendered
# width as a share of its <section>'s content width.
LAYOUT = """(() => {
  const col = document.querySelector('main') || document.body;
  const inner = e => { const s = getComputedStyle(e), r = e.getBoundingClientRect();
    return [r.left + parseFloat(s.paddingLeft), r.right - parseFloat(s.paddingRight)]; };
  const edge = inner(col)[1];
  const boxed = e => { for (let p = e.parentElement; p && p !== col; p = p.parentElement) {
    if (['auto', 'scroll', 'hidden', 'clip'].includes(getComputedStyle(p).overflowX)) return true; } return false; };
  const over = [];
  for (const e of col.querySelectorAll('*')) {
    const r = e.getBoundingClientRect();
    if (r.width > 0 && r.right > edge + 1 && !boxed(e))
      over.push(`${e.tagName.toLowerCase()}${e.id ? '#' + e.id : ''}${e.className && e.className.baseVal === undefined
        ? '.' + e.className : ''} ends at ${Math.round(r.right)} px (column ${Math.round(edge)} px)`);
  }
  const figures = Array.from(col.querySelectorAll('figure img')).map(img => {
    const [l, r] = inner(img.closest('section') || col);
    return [img.alt, img.getBoundingClientRect().width / (r - l)];
  });
  return {scroll_width: document.documentElement.scrollWidth, viewport: window.innerWidth,
          overflowing: over, figures: figures};
})()"""


@dataclass
class PageCheck:
    """What the page did: request URLs, console errors, circuitsvis mount child counts, the screenshot (RGB 0..1)."""

    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    mounts: list[int] = field(default_factory=list)
    screenshot: Any = None
    layout: dict = field(default_factory=dict)  # what ``LAYOUT`` measured

    def layout_problems(self, fill: float = 0.9) -> list[str]:
        """Where the page is wider than the viewport, an element passes the content column's edge outside a
        scroll box, or a figure is narrower than ``fill`` of its section's content width (empty: none)."""
        lay = self.layout
        out = [f"page {lay['scroll_width']} px wide in a {lay['viewport']} px viewport"] * (
            lay["scroll_width"] > lay["viewport"]
        )
        out += [f"overflows: {e}" for e in lay["overflowing"]]
        return out + [
            f"figure {name} fills {share:.0%} of its section" for name, share in lay["figures"] if share < fill
        ]

    @property
    def external(self) -> list[str]:
        return [u for u in self.requests if not u.startswith(LOCAL)]

    @property
    def blank(self) -> bool:
        """No screenshot, or fewer than 1% of its pixels differ from the top-left pixel's colour."""
        if self.screenshot is None:
            return True
        img = np.asarray(self.screenshot)[..., :3]
        return float((np.abs(img - img[0, 0]).sum(-1) > 0.1).mean()) < 0.01


class _Pipe:
    """The DevTools protocol over a pair of pipes: numbered commands, replies matched by id, events kept in order."""

    def __init__(self, write_fd: int, read_fd: int, deadline: float):
        self.w, self.r, self.deadline, self.buf, self.events, self.n = write_fd, read_fd, deadline, b"", [], 0

    def _read_one(self) -> dict:
        while b"\0" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.r], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self.r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, session: str | None = None, **params: Any) -> dict:
        self.n += 1
        msg = {"id": self.n, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        while True:
            m = self._read_one()
            if m.get("id") == self.n:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_for(self, method: str, timeout: float) -> bool:
        end = min(self.deadline, time.monotonic() + timeout)
        while not any(e.get("method") == method for e in self.events):
            saved, self.deadline = self.deadline, end
            try:
                self.events.append(self._read_one())
            except TimeoutError:
                return False
            finally:
                self.deadline = saved
        return True


def _fds_3_4(read_end: int, write_end: int) -> None:
    """In the child: the DevTools pipe's ends on fds 3 (commands in) and 4 (replies out), via fds >= 10 so
    neither end is overwritten by the other's dup2."""
    hi = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (read_end, write_end)]
    for target, fd in zip((3, 4), hi):
        os.dup2(fd, target)
        os.close(fd)


def _record(events: list[dict], out: PageCheck) -> None:
    for e in events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Network.requestWillBeSent":
            out.requests.append(p["request"]["url"])
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.errors.append(
                "console."
                + p["type"]
                + ": "
                + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            )
        elif m == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            out.errors.append("exception: " + str(d.get("exception", {}).get("description", d.get("text"))))
        elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
            out.errors.append(f"log ({p['entry'].get('source')}): {p['entry'].get('text')} {p['entry'].get('url', '')}")


def check_page(
    path: Path, width: int = 1280, height: int = 1300, mount_wait: float = 10.0, timeout: float = 60.0
) -> PageCheck:
    """Load ``path`` in a fresh headless Chromium profile and return what it requested, logged and drew."""
    if CHROMIUM is None:
        raise RuntimeError("headless checks need Debian's chromium package (apt-get install chromium)")
    out, url = PageCheck(), Path(path).resolve().as_uri()
    to_child, from_us = os.pipe()
    to_us, from_child = os.pipe()
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=False,
            preexec_fn=lambda: _fds_3_4(to_child, from_child),
        )
        os.close(to_child), os.close(from_child)
        cdp = _Pipe(from_us, to_us, time.monotonic() + timeout)
        try:
            page = next(t for t in cdp.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
            s = cdp.send("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
            for domain in ("Runtime", "Log", "Network", "Page"):
                cdp.send(f"{domain}.enable", s)
            cdp.send(
                "Emulation.setDeviceMetricsOverride", s, width=width, height=height, deviceScaleFactor=1, mobile=False
            )
            cdp.events.clear()
            cdp.send("Page.navigate", s, url=url)
            if not cdp.wait_for("Page.loadEventFired", timeout):
                raise TimeoutError(f"{url} did not finish loading")
            end = time.monotonic() + mount_wait
            while True:
                out.mounts = cdp.send("Runtime.evaluate", s, expression=MOUNTS, returnByValue=True)["result"]["value"]
                if all(out.mounts) or time.monotonic() > end:
                    break
                time.sleep(0.2)
            out.layout = cdp.send("Runtime.evaluate", s, expression=LAYOUT, returnByValue=True)["result"]["value"]
            png = base64.b64decode(cdp.send("Page.captureScreenshot", s, format="png")["data"])
            out.screenshot = image.imread(io.BytesIO(png), format="png")
            _record(cdp.events, out)
            try:
                cdp.send("Browser.close")
            except (RuntimeError, TimeoutError):
                pass
        finally:
            os.close(from_us), os.close(to_us)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return out
