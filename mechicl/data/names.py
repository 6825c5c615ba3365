"""Head names: ``L<layer>H<head>``, the one spelling every layer writes and reads.

It lives in ``data`` because that is the layer every other one (``viz`` included) may import.
"""

from __future__ import annotations

import re

from mechicl.errors import ConfigError

HEAD_NAME = re.compile(r"L(\d+)H(\d+)")


def head_name(layer: int, head: int) -> str:
    """``(10, 3)`` -> ``"L10H3"``."""
    return f"L{int(layer)}H{int(head)}"


def parse_head(name: str) -> tuple[int, int]:
    """``"L10H3"`` -> ``(10, 3)``; anything else is a ``ConfigError`` that shows the spelling."""
    m = HEAD_NAME.fullmatch(name.strip())
    if m is None:
        raise ConfigError(f"head {name!r}: write heads as L<layer>H<head>, comma-separated, e.g. L1H1,L0H2")
    return int(m.group(1)), int(m.group(2))


def parse_heads(text: str) -> tuple[tuple[int, int], ...]:
    """``"L1H1,L0H2"`` or ``"L1H1 L0H2"`` -> ``((1, 1), (0, 2))`` (empty items are skipped)."""
    return tuple(parse_head(item) for item in re.split(r"[,\s]+", text) if item)
