"""Output for people and for scripts: aligned tables, check marks, colour only on a terminal, and
``--json`` for everything.

Everything a command prints passes through here, and here only control characters are removed:
values come from integration secrets, status records and server replies that someone else may
have written, and an escape sequence in a mailbox name must not move the cursor, retitle the
terminal or hide a line. The colour codes ``paint`` itself writes are the only escapes kept;
``--json`` escapes every control character by itself.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_COLOURS = {"red": "31", "green": "32", "yellow": "33", "blue": "34", "dim": "2", "bold": "1"}
# The colour codes paint() writes: the only escape sequences that may reach a terminal.
_OWN_COLOUR = re.compile("(\x1b\\[(?:" + "|".join([*_COLOURS.values(), "0"]) + ")m)")
# Bidirectional overrides and isolates reorder what a terminal shows (a disguised name or command).
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: str, *, keep: str = "") -> str:
    """``text`` without control characters (C0, DEL, C1: ESC, CR, the CSI 0x9b...), line and
    paragraph separators and bidirectional overrides; characters in ``keep`` stay."""
    return "".join(ch for ch in text if ch in keep or not _is_control(ch))


def _is_control(ch: str) -> bool:
    code = ord(ch)
    return code < 0x20 or 0x7F <= code <= 0x9F or ch in "\u2028\u2029" or ch in _BIDI


def _terminal_safe(text: str, *, colour: bool = False) -> str:
    """Printable text: lines and tabs kept, and on a colour terminal the colour codes of paint()."""
    if not colour:
        return printable(text, keep="\n\t")
    pieces = _OWN_COLOUR.split(text)
    # split() with a group: odd indexes are the colour codes themselves.
    return "".join(piece if i % 2 else printable(piece, keep="\n\t") for i, piece in enumerate(pieces))


class Output:
    """Where a command writes. Colour is used only when the stream is a terminal and NO_COLOR is unset."""

    def __init__(
        self, stdout: TextIO | None = None, stderr: TextIO | None = None, *, as_json: bool = False
    ) -> None:
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.as_json = as_json
        self.colour = _is_terminal(self.stdout) and "NO_COLOR" not in os.environ
        self.interactive = _is_terminal(self.stderr)
        self._err_colour = self.interactive and "NO_COLOR" not in os.environ

    # -- text
    def paint(self, text: str, colour: str) -> str:
        if not self.colour:
            return text
        return f"\x1b[{_COLOURS[colour]}m{text}\x1b[0m"

    def line(self, text: str = "") -> None:
        print(_terminal_safe(text, colour=self.colour), file=self.stdout, flush=True)

    def note(self, text: str) -> None:
        """A remark for the person at the terminal (stderr, so scripts reading stdout are unaffected)."""
        print(_terminal_safe(text, colour=self._err_colour), file=self.stderr, flush=True)

    def warn(self, text: str) -> None:
        label = self.paint("warning:", "yellow") if _is_terminal(self.stderr) else "warning:"
        print(_terminal_safe(f"{label} {text}", colour=self._err_colour), file=self.stderr, flush=True)

    def error(self, code: str, message: str, hint: str | None = None) -> None:
        if self.as_json:
            body = {"error": {"code": code, "message": message, **({"hint": hint} if hint else {})}}
            print(json.dumps(body, indent=2), file=self.stdout, flush=True)
            return
        label = self.paint("error:", "red") if _is_terminal(self.stderr) else "error:"
        print(
            _terminal_safe(f"{label} {message} ({code})", colour=self._err_colour),
            file=self.stderr,
            flush=True,
        )
        if hint:
            print(_terminal_safe(f"hint: {hint}", colour=self._err_colour), file=self.stderr, flush=True)

    def json(self, value: Any) -> None:
        # ensure_ascii (the default) writes every control character as a \\u escape.
        print(json.dumps(value, indent=2, sort_keys=False, default=str), file=self.stdout, flush=True)

    def mark(self, ok: bool | None) -> str:
        if ok is None:
            return self.paint("-", "dim")
        return self.paint("✓", "green") if ok else self.paint("✗", "red")

    # -- tables
    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        for text in render_table(headers, rows, header_style=lambda h: self.paint(h, "bold")):
            self.line(text)

    # -- progress
    @contextmanager
    def progress(self, label: str) -> Iterator[None]:
        """A spinner on stderr while a long operation runs (only on a terminal)."""
        if not self.interactive or self.as_json:
            yield
            return
        stop = threading.Event()

        def spin() -> None:
            frames = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
            index = 0
            while not stop.wait(0.1):
                self.stderr.write(f"\r{frames[index % len(frames)]} {printable(label)}")
                self.stderr.flush()
                index += 1

        thread = threading.Thread(target=spin, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.stderr.write("\r\x1b[2K")
            self.stderr.flush()


def render_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], *, header_style: Any = None
) -> list[str]:
    """Columns aligned on their widest cell (ANSI colour codes do not count towards width)."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for index, value in enumerate(row):
            widths[index] = max(widths[index], visible_len(value))

    def fmt(row: Sequence[str]) -> str:
        parts = [value + " " * (widths[i] - visible_len(value)) for i, value in enumerate(row)]
        return "  ".join(parts).rstrip()

    head = fmt(list(headers))
    lines = [header_style(head) if header_style else head]
    lines.extend(fmt(row) for row in cells)
    return lines


def visible_len(text: str) -> int:
    return len(_ANSI.sub("", text))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    # A cell may hold paint()'s colour codes; line() drops them again off a terminal.
    return _terminal_safe(str(value).replace("\n", " ").replace("\t", " "), colour=True)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def ago(moment: float | None, now: float | None = None) -> str:
    """'3 min ago', 'in 2 h' — for times in tables."""
    if moment is None:
        return "-"
    delta = (now if now is not None else time.time()) - moment
    future = delta < 0
    seconds = abs(delta)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            amount = f"{int(seconds // size)} {unit}"
            break
    else:
        amount = f"{int(seconds)} s"
    return f"in {amount}" if future else f"{amount} ago"
