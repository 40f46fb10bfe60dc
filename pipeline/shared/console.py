"""Notices, dead letters and acks as lines a person reads: `cityops run`'s console, `cityops tail`.

Columns are aligned by display width, not by characters: a Chinese character takes two
columns of a terminal (Unicode East Asian Width W/F), so padding 春熙路街道 to 10 characters
would push everything after it five columns right.
"""

from __future__ import annotations

import threading
import unicodedata
from collections.abc import Callable
from typing import Any

from pipeline.core.notices import tier_cn

# what `cityops tail` shows: the seven tiers' notices, dead letters, acknowledgements
TIERS = ("city", "district", "street", "dept", "grid", "owner", "community")
SHOWN = (*TIERS, "dead", "acks")
SEVERITY_CN = {"blue": "蓝", "yellow": "黄", "orange": "橙", "red": "红"}


def width(text: str) -> int:
    """Terminal columns ``text`` takes."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF"
               else 1 for c in text)


def pad(text: str, cols: int) -> str:
    """``text`` cut to ``cols`` columns (with …) or filled with spaces to exactly ``cols``."""
    if width(text) > cols:
        out, used = "", 0
        for c in text:
            if used + width(c) > cols - 1:
                break
            out += c
            used += width(c)
        text = out + "…"
    return text + " " * (cols - width(text))


def recipient(n: dict[str, Any]) -> str:
    """Who a notice went to, by name: the worker, the street or district, the department."""
    tier = n.get("tier")
    if tier == "grid":
        return n.get("worker_name") or n.get("target") or ""
    if tier == "street":
        return n.get("street_name") or n.get("target") or ""
    if tier == "district":
        return n.get("district_name") or n.get("target") or ""
    if tier == "community":
        return n.get("community_name") or n.get("target") or ""
    return n.get("target") or ""


def notice_line(n: dict[str, Any]) -> str:
    ts = str(n.get("ts") or "")[11:19]
    sev = n.get("severity") or ""
    return (f"{ts:8}  {pad(tier_cn(n.get('tier', '')), 6)} {pad(recipient(n), 14)} "
            f"{pad(n.get('state') or '', 12)} {pad(SEVERITY_CN.get(sev, sev), 2)}  "
            f"{n.get('title', '')}")


def dead_letter_line(d: dict[str, Any]) -> str:
    return f"{'':8}  {pad('死信', 6)} {pad(d.get('reason') or '', 14)} {d.get('detail', '')}"


def ack_line(a: dict[str, Any]) -> str:
    by = a.get("by") or ""
    return f"{'':8}  {pad('确认', 6)} {pad(by, 14)} {pad(a.get('tier') or '', 12)} " \
           f"{a.get('alert_id', '')}"


class StoryConsole:
    """`cityops run`'s console: each notice under the heading of the story event it belongs to.

    Notices come a little after the story line that caused them, often after the next story
    line has been printed; ``story_of`` names the event a notice belongs to (by its sensor), and
    when it is not the last heading printed, that event's heading is printed again."""

    def __init__(self, story_of: Callable[[str], str | None] = lambda sensor: None,
                 write: Callable[[str], None] | None = None) -> None:
        self.story_of = story_of
        self.write = write or (lambda line: print(line, flush=True))
        self.current: str | None = None
        self.lock = threading.Lock()        # headings come from the simulator's thread

    def heading(self, line: str) -> None:
        with self.lock:
            self.current = _short(line)
            self.write(f"── {line}")

    def notice(self, n: dict[str, Any]) -> None:
        self._under(n.get("sensor_id") or "", "   " + notice_line(n))

    def dead_letter(self, d: dict[str, Any], sensor: str = "") -> None:
        self._under(sensor, "   " + dead_letter_line(d))

    def _under(self, sensor: str, line: str) -> None:
        story = self.story_of(sensor)
        with self.lock:
            if story is not None and story != self.current:
                self.current = story
                self.write(f"── {story} (continued)")
            elif story is None and self.current is not None:
                self.current = None
                self.write("── 其他 (not part of the story)")
            self.write(line)


def _short(line: str) -> str:
    """A story line's name: its first word (燃气泄漏, 暴雨, …)."""
    return line.split(" ", 1)[0]
