"""Splits a QMP client's byte stream into JSON values, incrementally.

Values are delimited the way QEMU's json-streamer delimits them: a value ends where the
brace or bracket that opened it closes (strings and their escapes taken into account),
so no newline is needed and a newline does not end a value. A top-level string ends at
its closing quote, any other top-level token at the next whitespace, ``{``, ``[``, ``"``
or control character. The value itself is only decoded, by the caller, once complete.

Two rules end a value early, with an error, so that bad input never swallows what
follows it:

* a ``{`` where the value being received cannot take one (right after ``{``, after a
  member's value, after ``,`` in an object, after an array element) ends it, and starts
  the next value: ``{`` followed by a line holding a whole request is one error, then
  that request. After ``:``, ``[`` or ``,`` in an array, ``{`` nests, as JSON says;
* an ASCII control character other than tab, CR and LF, or a byte 0xFE or 0xFF (never
  valid UTF-8), ends it and is dropped: QEMU's documented way for a client to reset the
  parser (qmp-spec.rst). So does a closing bracket that does not match.

The scanner keeps its state between chunks and looks at each byte a bounded number of
times, mostly inside ``re`` runs, so a client that trickles a large request in byte by
byte costs no more than one that sends it at once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

MAX_NESTING = 128
"""Deepest nesting of objects and arrays accepted in one value (QEMU: 1024; Python's json
recursion, which decodes and echoes the value, must stay far from its limit)."""

# Outside strings: what needs no attention (whitespace, words, commas, colons).
_PLAIN = re.compile(rb'[^"{}\[\]\x00-\x08\x0b\x0c\x0e-\x1f\xfe\xff]*+')
# Inside a string: plain bytes and complete escapes (possessive: no backtracking state).
_STRING = re.compile(rb'(?:[^"\\\x00-\x1f\xfe\xff]++|\\[\x20-\xfd])*+')
_SPACE = re.compile(rb"[ \t\r\n]*+")
# A top-level token other than an object, array or string ends before any of these.
_TOKEN_END = re.compile(rb'[ \t\r\n"{\[\x00-\x1f\xfe\xff]')
_WS = b" \t\r\n"
_OPEN_OBJ, _CLOSE_OBJ, _OPEN_ARR, _CLOSE_ARR, _QUOTE, _BACKSLASH = b"{}[]\"\\"
_COLON, _COMMA = b":,"
_CLOSER = {_CLOSE_OBJ: _OPEN_OBJ, _CLOSE_ARR: _OPEN_ARR}


def _run_end(pattern: re.Pattern[bytes], buf: bytearray, pos: int) -> int:
    """Where the run of ``pattern`` starting at ``pos`` ends (_PLAIN, _STRING, _SPACE)."""
    match = pattern.match(buf, pos)
    assert match is not None  # these patterns match the empty string, so never fail
    return match.end()


@dataclass(frozen=True)
class Value:
    """A complete JSON value, still undecoded."""

    data: bytes


@dataclass(frozen=True)
class Invalid:
    """Input that is not a JSON value; ``reason`` says why, in json's words."""

    reason: str


@dataclass(frozen=True)
class TooLarge:
    """A value longer than the limit; the scanner accepts nothing after it."""

    limit: int


Item = Value | Invalid | TooLarge


def _reason(data: bytes | bytearray) -> str:
    """Why ``data`` (a value cut short where the scanner found it wrong) is not JSON."""
    try:
        json.loads(data.decode("utf-8", "replace"))
    except json.JSONDecodeError as exc:
        return exc.msg[:1].lower() + exc.msg[1:]
    except (ValueError, RecursionError):
        pass
    return "invalid input"


class JsonStreamer:
    """Feed it bytes as they arrive; it returns the values (and errors) they complete."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buf = bytearray()  # the value being received, from its first byte
        self._pos = 0  # how far _buf was scanned
        self._stack = bytearray()  # open brackets and braces
        self._deepest = 0
        self._in_string = False
        self._token = False  # in a top-level token that is not a string or container
        self._mark = 0  # just after the last bracket, brace or string: where plain text began
        self._last = 0  # that bracket, brace or quote
        self._closed = False

    @property
    def pending(self) -> int:
        """Bytes of the value being received."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Item]:
        """The items ``data`` completes, in order; TooLarge is last and final."""
        if self._closed:
            return []
        self._buf += data
        items: list[Item] = []
        while self._step(items):
            pass
        if not self._closed and len(self._buf) > self.max_size:
            self._closed = True
            items.append(TooLarge(self.max_size))
        return items

    def _step(self, items: list[Item]) -> bool:
        """Scans on; False once the input runs out (or the stream is closed)."""
        buf = self._buf
        if self._in_string:
            pos = _run_end(_STRING, buf, self._pos)
            if pos == len(buf):
                self._pos = pos
                return False
            char = buf[pos]
            if char == _QUOTE:
                self._in_string = False
                return self._after_value(items, pos + 1, _QUOTE)
            if char == _BACKSLASH and pos + 1 == len(buf):
                self._pos = pos  # the escaped byte is still to come
                return False
            # A control character, 0xFE/0xFF, or one escaped.
            return self._fail(items, pos + (char == _BACKSLASH))
        if self._token:
            match = _TOKEN_END.search(buf, self._pos)
            if match is None:
                self._pos = len(buf)
                return False
            self._token = False
            return self._emit(items, match.start())
        if not self._stack:
            return self._start(items)
        pos = _run_end(_PLAIN, buf, self._pos)
        if pos == len(buf):
            self._pos = pos
            return False
        char = buf[pos]
        if char == _QUOTE:
            self._in_string = True
            self._pos = pos + 1
        elif char == _OPEN_OBJ:
            if not self._takes_value(pos):
                return self._emit_error(items, pos)  # and the "{" starts the next value
            self._push(char, pos)
        elif char == _OPEN_ARR:
            self._push(char, pos)
        elif char in _CLOSER:
            if self._stack[-1] != _CLOSER[char]:
                return self._fail(items, pos)
            self._stack.pop()
            return self._after_value(items, pos + 1, char)
        else:
            return self._fail(items, pos)
        return True

    def _start(self, items: list[Item]) -> bool:
        """At the top level: drop whitespace, then begin a value."""
        buf = self._buf
        del buf[:_run_end(_SPACE, buf, 0)]
        self._pos = 0
        if not buf:
            return False
        char = buf[0]
        if char in (_OPEN_OBJ, _OPEN_ARR):
            self._deepest = 0
            self._push(char, 0)
        elif char == _QUOTE:
            self._in_string = True
            self._pos = 1
        elif char < 0x20 or char >= 0xFE:
            return self._fail(items, 0)
        else:
            self._token = True
            self._pos = 1
        return True

    def _push(self, char: int, pos: int) -> None:
        self._stack.append(char)
        self._deepest = max(self._deepest, len(self._stack))
        self._mark, self._last = pos + 1, char
        self._pos = pos + 1

    def _takes_value(self, pos: int) -> bool:
        """Whether a value may start at ``pos``, inside the current container."""
        plain = self._buf[self._mark:pos].rstrip(_WS)
        last = plain[-1] if plain else self._last
        return last in (_COLON, _OPEN_ARR) or (last == _COMMA and self._stack[-1] == _OPEN_ARR)

    def _after_value(self, items: list[Item], end: int, char: int) -> bool:
        """A string or container ended just before ``end``."""
        if not self._stack:
            return self._emit(items, end)
        self._mark, self._last = end, char
        self._pos = end
        return True

    def _emit(self, items: list[Item], end: int) -> bool:
        """The value ends just before ``end``."""
        if end > self.max_size:
            self._closed = True
            items.append(TooLarge(self.max_size))
            return False
        if self._deepest > MAX_NESTING:
            items.append(Invalid(f"nesting deeper than {MAX_NESTING} levels"))
        else:
            items.append(Value(bytes(self._buf[:end])))
        self._reset(end)
        return True

    def _fail(self, items: list[Item], pos: int) -> bool:
        """The byte at ``pos`` cannot continue the value: an error, and the byte is dropped."""
        if not self._emit_error(items, pos):
            return False
        del self._buf[:1]
        return True

    def _emit_error(self, items: list[Item], pos: int) -> bool:
        """The value ends with an error before the byte at ``pos``, the byte json is shown
        to word the error; False if the value was over the limit."""
        if pos > self.max_size:
            self._closed = True
            items.append(TooLarge(self.max_size))
            return False
        if self._deepest > MAX_NESTING:
            reason = f"nesting deeper than {MAX_NESTING} levels"
        else:
            reason = _reason(self._buf[:pos + 1])
        items.append(Invalid(reason))
        self._reset(pos)
        return True

    def _reset(self, end: int) -> None:
        del self._buf[:end]
        self._pos = 0
        self._stack.clear()
        self._deepest = 0
        self._in_string = self._token = False
        self._mark = self._last = 0
