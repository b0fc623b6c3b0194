"""Secret masking and the line/batch pump, without processes."""

from __future__ import annotations

import asyncio
import base64

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vela.executor import MASK, Masker
from vela.executor.logs import LinePump

SECRET = "tok?>~~en-Value-42"
LONG_SECRET = "ghp_" + "A1b2C3d4E5f6G7h8I9j0" * 3  # 64 bytes: its base64 takes two lines


def test_plain_and_base64_forms():
    m = Masker([SECRET])
    raw = SECRET.encode()
    for form in (
        SECRET,
        base64.b64encode(raw).decode(),
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
    ):
        assert m.mask(f"a {form} b") == "a *** b", form


def test_base64_inside_a_larger_blob_at_every_offset():
    m = Masker([SECRET])
    for prefix in (b"", b"u", b"us", b"user:", b"xy:"):
        for suffix in (b"", b"!", b"!!", b"@host"):
            blob = base64.b64encode(prefix + SECRET.encode() + suffix).decode()
            masked = m.mask(blob)
            assert MASK in masked
            # What is left cannot encode the secret: at most the neighbours' chars.
            assert len(masked.replace(MASK, "")) <= len(blob) - len(SECRET) * 4 // 3 + 4


def test_multiline_secret_masked_per_fragment():
    m = Masker(["first-line-part\nsecond-line-part"])
    assert m.mask("x first-line-part") == "x ***"
    assert m.mask("second-line-part y") == "*** y"


def test_empty_secret_ignored_and_longest_first():
    m = Masker(["", "abcd", "abcdefgh"])
    assert m.mask("abcdefgh abcd") == "*** ***"
    assert Masker([]).mask("nothing") == "nothing"


def test_wrapped_base64_of_a_long_secret_masked_per_line():
    m = Masker([LONG_SECRET])
    for raw in (LONG_SECRET.encode(), LONG_SECRET.encode() + b"\n"):  # printf, echo
        encoded = base64.b64encode(raw).decode()
        for width in (64, 76):  # openssl, coreutils base64
            for i in range(0, len(encoded), width):
                masked = m.mask(encoded[i:i + width])
                assert MASK in masked
                assert len(masked.replace(MASK, "")) <= 3  # the bits of the newline


def test_short_last_line_of_wrapped_base64_left_alone():
    secret = "k" * 60  # base64 of 80 characters: its last line at 76 columns has 4
    tail = base64.b64encode(secret.encode()).decode()[76:]
    assert Masker([secret]).mask(f"a {tail} b") == f"a {tail} b"


def test_overlapping_secrets_masked_as_one_stretch():
    m = Masker(["user-1234", "1234-pass"])
    assert m.mask("login user-1234-pass") == "login ***"
    assert m.mask("user-1234 1234-pass user-1234user-1234") == "*** *** ******"


def test_safe_cut_never_splits_overlapping_secrets():
    m = Masker(["user-1234", "1234-pass"])
    text = "x" * 10 + "user-1234-pass" + "y" * 10
    for limit in range(1, len(text)):
        cut = m.safe_cut(text, limit)
        assert m.mask(text[:cut]) + m.mask(text[cut:]) == "x" * 10 + MASK + "y" * 10


def test_safe_cut_never_splits_a_secret():
    m = Masker(["SECRETSECRET"])
    text = "x" * 10 + "SECRETSECRET" + "y" * 10
    for limit in range(1, len(text)):
        cut = m.safe_cut(text, limit)
        assert cut <= limit
        assert "SECRETSECRET" not in m.mask(text[:cut]) + m.mask(text[cut:])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    secret=st.text(st.characters(blacklist_characters="\n"), min_size=3, max_size=40).map(
        lambda s: "k" + s
    ),
    before=st.text(max_size=30),
    after=st.text(max_size=30),
)
def test_masked_text_never_holds_the_secret(secret, before, after):
    out = Masker([secret]).mask(before + secret + after)
    assert secret not in out


def reader(data: bytes | None = None) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    if data is not None:
        r.feed_data(data)
        r.feed_eof()
    return r


async def collect(stream, **kw) -> list[list[str]]:
    batches: list[list[str]] = []

    async def deliver(lines):
        batches.append(lines)

    kw.setdefault("masker", Masker([SECRET]))
    kw.setdefault("batch_lines", 100)
    kw.setdefault("flush_s", 10.0)
    await LinePump(stream, deliver, **kw).run()
    return batches


async def test_pump_lines_masks_and_splits():
    data = f"one\r\ntwo {SECRET}\n\xff\nlast-no-newline".encode("latin-1")
    data = data.replace(SECRET.encode("latin-1"), SECRET.encode())
    assert await collect(reader(data)) == [
        ["one", "two ***", "\ufffd", "last-no-newline"]
    ]


async def test_pump_batches_by_size():
    data = "".join(f"{i}\n" for i in range(7)).encode()
    batches = await collect(reader(data), batch_lines=3)
    assert [len(b) for b in batches] == [3, 3, 1]


async def test_pump_flushes_by_time():
    stream = reader()
    got = asyncio.Event()
    batches: list[list[str]] = []

    async def deliver(lines):
        batches.append(lines)
        got.set()

    pump = LinePump(stream, deliver, masker=Masker([]), batch_lines=100, flush_s=0.05)
    task = asyncio.create_task(pump.run())
    stream.feed_data(b"early\npartial")
    await asyncio.wait_for(got.wait(), 5)  # delivered before EOF, by time
    assert batches == [["early"]]
    stream.feed_data(b" line\n")
    stream.feed_eof()
    await asyncio.wait_for(task, 5)
    assert batches == [["early"], ["partial line"]]


async def test_pump_long_line_split_without_leaking():
    filler = "z" * 100
    text = (filler * 5 + SECRET) * 20  # secrets land across every split point
    batches = await collect(reader(text.encode()), max_line_chars=64)
    lines = [line for b in batches for line in b]
    assert all(len(line) <= 64 for line in lines)
    joined = "".join(lines)
    assert SECRET not in joined
    assert joined == Masker([SECRET]).mask(text)
