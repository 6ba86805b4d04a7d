"""The engine loop's delivery policy, without HTTP."""

from __future__ import annotations

from types import SimpleNamespace

from lowbit.engine.request import StreamDelta
from lowbit.server.engine_loop import _coalesce, _Sink


def _deltas(n: int) -> list[StreamDelta]:
    """n one-token deltas of one sample, the last one finished."""
    return [
        StreamDelta("r", 0, chr(97 + i), [i], "length" if i == n - 1 else None, None, 3, i + 1)
        for i in range(n)
    ]


def _delivered(interval: int, n: int) -> list[StreamDelta]:
    """What a subscriber with this interval receives for n tokens."""
    sink = _Sink(SimpleNamespace(interval=interval), n=1, submitted=0.0)
    return [d for d in map(sink.release, _deltas(n)) if d is not None]


def test_stream_interval_one_delivers_every_token():
    """Interval 1: one delta per token."""
    assert [d.token_ids for d in _delivered(1, 3)] == [[0], [1], [2]]


def test_stream_interval_holds_tokens_back_but_loses_none():
    """Interval 4: the first token at once, then every 4th, then the rest at the finish."""
    out = _delivered(4, 10)
    assert [d.token_ids for d in out] == [[0], [1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert "".join(d.text for d in out) == "abcdefghij"
    assert out[-1].finish_reason == "length" and out[-1].completion_tokens == 10


def test_non_streaming_gets_only_the_final_delta():
    """Interval 0 (not streaming): everything arrives merged, once."""
    (only,) = _delivered(0, 5)
    assert only.token_ids == [0, 1, 2, 3, 4] and only.text == "abcde" and only.finished


def test_coalesce_merges_per_sample_in_order():
    """Queued deltas of two samples merge into one each, first-seen order kept."""
    a = StreamDelta("r", 0, "x", [1])
    b = StreamDelta("r", 1, "y", [2])
    c = StreamDelta("r", 0, "z", [3], "stop", None, 1, 2)
    out = _coalesce([a, b, c])
    assert [(d.index, d.text, d.token_ids, d.finish_reason) for d in out] == [
        (0, "xz", [1, 3], "stop"), (1, "y", [2], None),
    ]  # fmt: skip
