"""The incremental JSON splitter under the QMP server."""

from __future__ import annotations

import time

import pytest

from pviommu.qmp.streamer import MAX_NESTING, Invalid, Item, JsonStreamer, TooLarge, Value


def feed(*chunks: bytes, max_size: int = 1 << 20) -> list[Item]:
    stream = JsonStreamer(max_size)
    return [item for chunk in chunks for item in stream.feed(chunk)]


def bytewise(data: bytes, max_size: int = 1 << 20) -> list[Item]:
    return feed(*(data[i:i + 1] for i in range(len(data))), max_size=max_size)


CASES: list[tuple[bytes, list[Item]]] = [
    (b'{"execute": "a"}{"execute": "b"}\n\n  {}',
     [Value(b'{"execute": "a"}'), Value(b'{"execute": "b"}'), Value(b"{}")]),
    (b'{\n  "a": {"b": [1, {"c": "}{[\\"\\\\"}]},\n  "d": "\xc3\xa9"\n}\n',
     [Value(b'{\n  "a": {"b": [1, {"c": "}{[\\"\\\\"}]},\n  "d": "\xc3\xa9"\n}')]),
    (b'[1, 2] "s" 5 true x}\n', [Value(b"[1, 2]"), Value(b'"s"'), Value(b"5"),
                                 Value(b"true"), Value(b"x}")]),
    # Decoding is the caller's: a value that closes is a value, even if not JSON.
    (b'{"execute": }\n', [Value(b'{"execute": }')]),
    # An incomplete request does not swallow the next.
    (b'{\n{"execute": "q"}\n',
     [Invalid("expecting property name enclosed in double quotes"), Value(b'{"execute": "q"}')]),
    (b'{"execute": "x"{"execute": "q"}',
     [Invalid("expecting ',' delimiter"), Value(b'{"execute": "q"}')]),
    (b'{"a": 1,\n{"execute": "q"}',
     [Invalid("expecting property name enclosed in double quotes"), Value(b'{"execute": "q"}')]),
    (b'[1 {}]\n', [Invalid("expecting ',' delimiter"), Value(b"{}"), Value(b"]")]),
    # ...where JSON allows "{", it nests.
    (b'{"a":\n{"b": [{}, {}]}}', [Value(b'{"a":\n{"b": [{}, {}]}}')]),
    # Control characters and 0xFE/0xFF end a value and are dropped.
    (b'{"execute": "add", \x00{}', [
        Invalid("expecting property name enclosed in double quotes"), Value(b"{}")]),
    (b'{"s": "a\nb"}\n{}', [Invalid("invalid control character at"), Value(b"b"),
                           Invalid("invalid control character at"), Value(b"{}")]),
    (b'{"s": "a\\\x1b"}\n', [Invalid("invalid \\escape"), Invalid("invalid control character at")]),
    (b"\x1b\xff {}", [Invalid("expecting value"), Invalid("expecting value"), Value(b"{}")]),
    (b'{"a": [1}\n{}', [Invalid("expecting ',' delimiter"), Value(b"{}")]),
]


@pytest.mark.parametrize(("data", "expected"), CASES)
def test_splitting_whole_and_byte_by_byte(data: bytes, expected: list[Item]) -> None:
    assert feed(data) == expected
    assert bytewise(data) == expected


def test_an_escape_split_across_chunks() -> None:
    assert feed(b'{"s": "\\', b'"', b'"}') == [Value(b'{"s": "\\""}')]
    assert feed(b'"\\', b'\\', b'"') == [Value(b'"\\\\"')]


def test_nesting_limit() -> None:
    ok = b"[" * MAX_NESTING + b"]" * MAX_NESTING
    deep = b'{"id": ' + b"[" * MAX_NESTING + b"]" * MAX_NESTING + b"}"
    assert feed(ok, b"{}") == [Value(ok), Value(b"{}")]
    assert bytewise(deep + b"{}") == [
        Invalid(f"nesting deeper than {MAX_NESTING} levels"), Value(b"{}")]


def test_size_limit() -> None:
    stream = JsonStreamer(16)
    assert stream.feed(b'{"a": "0123456789"}') == [TooLarge(16)]
    assert stream.feed(b"{}") == []
    stream = JsonStreamer(16)
    assert stream.feed(b'  {"a": "01234') == []
    assert stream.pending == 12  # whitespace before a value is not kept
    assert stream.feed(b"56789") == [TooLarge(16)]
    assert feed(b' {"a": "012345678"}', max_size=18) == [Value(b'{"a": "012345678"}')]


def test_a_slow_drip_is_scanned_once() -> None:
    """Each byte added to a large pending request costs O(1), not a rescan."""
    for filler in (b"1,", b'"x",', b"x", b" "):
        stream = JsonStreamer(4 << 20)
        assert stream.feed(b'{"execute": "q", "arguments": {"n": [' + filler * (1 << 19)) == []
        start = time.perf_counter()
        for _ in range(2000):
            assert stream.feed(filler) == []
        assert time.perf_counter() - start < 0.2, filler
        assert stream.feed(b"1]}}") == [Value(b'{"execute": "q", "arguments": {"n": ['
                                              + filler * ((1 << 19) + 2000) + b"1]}}")]
