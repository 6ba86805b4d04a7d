"""The official openai client against the server: completions and chat, streaming and not."""

from __future__ import annotations

import pytest

MODEL = "tiny"  # the served name in conftest.py
EXACT = {"ignore_eos": True}  # the random model may sample EOS; counts must be exact


def test_models(client):
    """/v1/models lists the served name."""
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion(client, server):
    """A completion returns max_tokens tokens and usage; greedy decoding is deterministic."""
    kw = dict(model=MODEL, prompt="Hello, world", max_tokens=8, temperature=0, extra_body=EXACT)
    out = client.completions.create(**kw)
    assert out.object == "text_completion" and out.model == MODEL
    choice = out.choices[0]
    assert choice.finish_reason == "length"
    prompt_len = len(server.engine.encode("Hello, world"))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_len, 8)
    assert out.usage.total_tokens == prompt_len + 8
    assert client.completions.create(**kw).choices[0].text == choice.text


def test_completion_stream_matches_non_stream(client):
    """Streaming yields the same text, ends with finish_reason, and the usage chunk is last."""
    kw = dict(model=MODEL, prompt="def fibonacci(n):", max_tokens=12, temperature=0,
              extra_body=EXACT)  # fmt: skip
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True}))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_completion_batch_n_echo_stop(client):
    """A list of prompts × n samples, echo, and a stop string."""
    out = client.completions.create(
        model=MODEL, prompt=["Hello", "import os"], n=2, max_tokens=5, seed=1, echo=True,
        extra_body=EXACT,
    )  # fmt: skip
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text.startswith("Hello") and out.choices[2].text.startswith("import os")
    assert out.usage.completion_tokens == 20
    base = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0,
                                      extra_body=EXACT).choices[0].text  # fmt: skip
    stop = base[3:5]
    cut = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0,
                                     stop=[stop], extra_body=EXACT).choices[0]  # fmt: skip
    assert cut.finish_reason == "stop" and cut.text == base[: base.index(stop)]


def test_completion_token_prompt_and_logprobs(client, server):
    """Token-id prompts, and legacy logprobs with top_logprobs and text offsets."""
    ids = server.engine.encode("Hello")
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, logprobs=3,
                                    temperature=0, extra_body=EXACT)  # fmt: skip
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) == 3 for t in lp.top_logprobs)
    # Greedy: the sampled token is the most likely one.
    for tok_lp, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert tok_lp == pytest.approx(max(top.values()))
    assert lp.text_offset[0] == 0


def test_seed_reproducible(client):
    """The same seed gives the same sample."""
    kw = dict(model=MODEL, prompt="The quick", max_tokens=8, temperature=1.0, seed=7,
              extra_body=EXACT)  # fmt: skip
    assert client.completions.create(**kw).choices[0].text == (
        client.completions.create(**kw).choices[0].text
    )


def test_chat(client):
    """Chat completion: assistant message, usage, n, and top logprobs."""
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Hello!"}],
        max_tokens=6, n=2, logprobs=True, top_logprobs=2, extra_body=EXACT,
    )  # fmt: skip
    assert out.object == "chat.completion" and len(out.choices) == 2
    assert out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens == 12
    content = out.choices[1].logprobs.content
    assert len(content) == 6 and all(len(c.top_logprobs) == 2 for c in content)


def test_chat_stream(client):
    """Streaming chat: role first, content deltas, finish_reason, then the usage chunk."""
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}],
              max_completion_tokens=9, temperature=0, extra_body=EXACT)  # fmt: skip
    full = client.chat.completions.create(**kw).choices[0].message.content
    opts = {"include_usage": True}
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options=opts))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 9


def test_chat_template_content_parts(client):
    """Content given as a list of text parts is the same prompt as a plain string."""
    kw = dict(model=MODEL, max_tokens=3, temperature=0, extra_body=EXACT)
    a = client.chat.completions.create(messages=[{"role": "user", "content": "ab"}], **kw)
    b = client.chat.completions.create(
        messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                               {"type": "text", "text": "b"}]}], **kw,
    )  # fmt: skip
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    assert a.choices[0].message.content == b.choices[0].message.content
