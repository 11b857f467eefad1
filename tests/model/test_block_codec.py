"""The upload encodings: lossless, and decoding is bounded by the announced size."""

from __future__ import annotations

import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotoffload.model.block_codec import (
    CodecError,
    best_encoding,
    decode,
    encode,
    shuffle,
    unshuffle,
)


def floats(n: int, dtype: str = "float32", seed: int = 0) -> bytes:
    """Weights-like bytes: normally distributed floats behind a small header."""
    rng = np.random.default_rng(seed)
    return b"\x08\x07header" + rng.normal(0, 0.05, n).astype(dtype).tobytes()


def test_shuffle_groups_byte_lanes_and_keeps_the_tail() -> None:
    data = bytes([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert shuffle(data, 4) == bytes([1, 5, 2, 6, 3, 7, 4, 8, 9])
    assert unshuffle(shuffle(data, 4), 4) == data
    assert shuffle(b"ab", 4) == b"ab"  # shorter than one element


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=5000), st.sampled_from(["identity", "shuffle2-zlib", "shuffle4-zlib"]))
def test_every_encoding_round_trips(data: bytes, enc: str) -> None:
    assert decode(encode(data, enc), enc, len(data)) == data  # type: ignore[arg-type]


def test_float_weights_are_encoded_smaller_in_the_stride_of_their_type() -> None:
    f32, f16 = floats(50_000), floats(50_000, "float16")
    enc32, out32 = best_encoding(f32)
    enc16, out16 = best_encoding(f16)
    assert (enc32, enc16) == ("shuffle4-zlib", "shuffle2-zlib")
    assert len(out32) < 0.9 * len(f32) and len(out16) < 0.95 * len(f16)
    assert decode(out32, enc32, len(f32)) == f32


def test_bytes_that_do_not_compress_stay_identity() -> None:
    noise = np.random.default_rng(1).bytes(20_000)
    enc, out = best_encoding(noise)
    assert enc == "identity" and out == noise


def test_a_bomb_stops_at_the_announced_size_without_inflating() -> None:
    bomb = zlib.compress(bytes(200_000_000), 9)  # 200 MB of zeros in about 200 KB
    assert len(bomb) < 300_000
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="longer"):
            decode(bomb, "shuffle4-zlib", 1_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000  # the output never grew past about the 1 MB asked for


@pytest.mark.parametrize(
    ("stream", "size", "match"),
    [
        (lambda s: s[: len(s) // 2], None, "cut short"),  # truncated
        (lambda s: s + b"extra", None, "after the end"),  # trailing bytes
        (lambda s: s, -1, "decodes to 20008 bytes, expected 20009"),  # a whole stream, short
        (lambda s: b"\x00" * 64, None, "corrupt"),  # not a zlib stream
        (lambda s: bytes([s[0], s[1] ^ 0xFF]) + s[2:], None, "corrupt"),  # bad header
    ],
)
def test_broken_streams_are_refused(stream: object, size: int | None, match: str) -> None:
    data = floats(5000)
    good = encode(data, "shuffle4-zlib")
    n = len(data) + 1 if size == -1 else len(data)
    with pytest.raises(CodecError, match=match):
        decode(stream(good), "shuffle4-zlib", n)  # type: ignore[operator]


def test_a_stream_longer_than_announced_is_refused() -> None:
    data = floats(5000)
    with pytest.raises(CodecError, match="longer"):
        decode(encode(data, "shuffle4-zlib"), "shuffle4-zlib", len(data) - 1)


def test_identity_must_have_the_announced_size_and_unknown_encodings_are_refused() -> None:
    with pytest.raises(CodecError, match="expected 5"):
        decode(b"abcd", "identity", 5)
    with pytest.raises(CodecError, match="unknown encoding"):
        decode(b"abcd", "lz4", 4)  # type: ignore[arg-type]
