"""`overlap_schedule`: the next decode step launches before this one's tokens are handled on
the host. Every request must come out exactly as without it."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.engine.engine import Engine


@pytest.fixture(scope="module")
def engines(tiny_llama):
    """(plain, overlapped) float32 engines on the tiny Llama."""
    kw = {"dtype": "float32", "device": "cpu"}
    with lowbit.Engine(str(tiny_llama), overlap_schedule=False, **kw) as plain:
        with lowbit.Engine(str(tiny_llama), overlap_schedule=True, **kw) as overlapped:
            yield plain, overlapped


@pytest.fixture
def launches(monkeypatch):
    """How many overlapped decode steps were launched."""
    count = [0]
    launch = Engine._launch_decode

    def counted(self, *a):
        count[0] += 1
        return launch(self, *a)

    monkeypatch.setattr(Engine, "_launch_decode", counted)
    return count


def _prompts(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(3, 384, (2 + 7 * i,), generator=gen).tolist() for i in range(n)]


def _outputs(outs):
    return [[(c.token_ids, c.text, c.finish_reason) for c in o.outputs] for o in outs]


def test_same_outputs_as_without_overlap(engines, launches):
    """Greedy and seeded requests with every way to stop — length 1, 2 and 17, stop token ids
    and stop strings that fire mid-way, EOS, the context limit — give the same tokens, text
    and finish reasons, in one batch, and the overlapped engine really overlapped."""
    plain, overlapped = engines
    prompts = _prompts(6)
    probe = plain.generate(prompts[0], {"temperature": 0, "max_new_tokens": 12,
                                        "ignore_eos": True})[0].outputs[0]  # fmt: skip
    params = [
        {"temperature": 0, "max_new_tokens": 1},
        {"temperature": 0, "max_new_tokens": 2, "ignore_eos": True},
        {"temperature": 0, "max_new_tokens": 17, "ignore_eos": True},
        {"temperature": 0, "max_new_tokens": 30, "stop_token_ids": [probe.token_ids[5]]},
        {"temperature": 0, "max_new_tokens": 30, "stop": [probe.text[8:11]]},
        {"temperature": 0.8, "seed": 7, "n": 2, "max_new_tokens": 9, "ignore_eos": True},
    ]
    prompts[3] = prompts[4] = prompts[0]  # the probe's prompt: its stops fire mid-way
    want = _outputs(plain.generate(prompts, params))
    assert want[3][0][2] == "stop" and want[4][0][2] == "stop"
    assert _outputs(overlapped.generate(prompts, params)) == want
    assert launches[0] > 0
    assert overlapped.stats()["kv_blocks_used"] == 0 and not overlapped.has_unfinished()
    long = [3] * (overlapped.context_length - 4)  # stops at the context length
    p = {"temperature": 0, "max_new_tokens": 50, "ignore_eos": True}
    assert _outputs(overlapped.generate(long, p)) == _outputs(plain.generate(long, p))


def test_stream_and_abort(engines):
    """Streamed deltas add up to the plain text; a request aborted mid-way gets its abort
    delta and nothing after, and the other one is untouched."""
    plain, overlapped = engines
    a, b = _prompts(2)
    p = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
    want = plain.generate([a, b], p)
    text = "".join(d.text for d in overlapped.generate_stream(a, p))
    assert text == want[0].outputs[0].text
    ra = overlapped.add_request(a, p)
    rb = overlapped.add_request(b, p)
    deltas = {ra: [], rb: []}
    for _ in range(5):
        for d in overlapped.step():
            deltas[d.request_id].append(d)
    overlapped.abort(ra)
    while overlapped.has_unfinished():
        for d in overlapped.step():
            deltas[d.request_id].append(d)
    assert deltas[ra][-1].finish_reason == "abort"
    assert [t for d in deltas[rb] for t in d.token_ids] == want[1].outputs[0].token_ids
    overlapped.release(ra)
    overlapped.release(rb)
    assert overlapped.stats()["kv_blocks_used"] == 0


def test_host_sampled_requests_do_not_overlap(engines, launches):
    """Logprobs and penalties need the host's view of each token: such batches take the plain
    path (no overlapped launch) and give the plain results."""
    plain, overlapped = engines
    prompts = _prompts(2)
    params = [
        {"temperature": 0, "max_new_tokens": 6, "logprobs": 2, "ignore_eos": True},
        {"temperature": 0, "max_new_tokens": 6, "repetition_penalty": 1.5, "ignore_eos": True},
    ]
    want = plain.generate(prompts, params)
    got = overlapped.generate(prompts, params)
    assert _outputs(got) == _outputs(want)
    assert got[0].outputs[0].logprobs == want[0].outputs[0].logprobs
    assert launches[0] == 0


def test_no_step_past_the_length_limit(engines, launches):
    """A request of n tokens: the prefill samples the first, every later one is an overlapped
    launch, and none is launched after the token that reaches max_new_tokens."""
    _, overlapped = engines
    out = overlapped.generate(_prompts(1)[0], {"temperature": 0, "max_new_tokens": 5,
                                               "ignore_eos": True})  # fmt: skip
    assert len(out[0].outputs[0].token_ids) == 5
    assert launches[0] == 4
