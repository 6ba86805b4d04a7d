"""Engine behaviour: batch invariance, preemption, sampling options, streaming, chat."""

from __future__ import annotations

import math

import pytest
import torch

import lowbit

GREEDY = {"temperature": 0, "max_new_tokens": 20, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(tiny_llama):
    """A float32 engine on the tiny Llama."""
    with lowbit.Engine(str(tiny_llama), dtype="float32", device="cpu") as eng:
        yield eng


def _prompts(n: int) -> list[list[int]]:
    """n prompts of mixed lengths."""
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(3, 384, (3 + 11 * i,), generator=gen).tolist() for i in range(n)]


def test_batch_invariance(engine):
    """A request gives the same greedy tokens alone and inside a batch of 8 mixed lengths."""
    prompts = _prompts(8)
    batched = engine.generate(prompts, GREEDY)
    for p, out in zip(prompts, batched):
        alone = engine.generate(p, GREEDY)[0]
        assert alone.outputs[0].token_ids == out.outputs[0].token_ids
    assert engine.stats()["kv_blocks_used"] == 0


def test_batch_invariance_under_preemption(tiny_llama, engine):
    """With a KV cache so small that preemption happens, the tokens are still the same."""
    prompts = _prompts(8)
    expected = [o.outputs[0].token_ids for o in engine.generate(prompts, GREEDY)]
    with lowbit.Engine(
        str(tiny_llama), dtype="float32", device="cpu", max_total_tokens=160, block_size=16
    ) as small:
        got = [o.outputs[0].token_ids for o in small.generate(prompts, GREEDY)]
        assert small.stats()["preemptions"] > 0
        assert small.stats()["kv_blocks_used"] == 0
    assert got == expected


def test_seed_is_reproducible_and_batch_independent(engine):
    """Same seed → same sample, alone or with other requests; different seeds differ."""
    params = {"temperature": 1.0, "max_new_tokens": 16, "seed": 1234, "ignore_eos": True}
    a = engine.generate("def f", params)[0].outputs[0].token_ids
    batch = engine.generate(["x = 1", "def f", "import os"], params)
    assert batch[1].outputs[0].token_ids == a
    b = engine.generate("def f", {**params, "seed": 99})[0].outputs[0].token_ids
    assert a != b


def test_top_k_one_is_greedy(engine):
    """top_k=1 sampling equals greedy decoding."""
    g = engine.generate("class Foo", GREEDY)[0].outputs[0].token_ids
    k1 = engine.generate("class Foo", {**GREEDY, "temperature": 1.0, "top_k": 1})[0]
    assert k1.outputs[0].token_ids == g


def test_top_p_keeps_only_nucleus(engine):
    """With a tiny top_p every sampled token is the most likely one."""
    g = engine.generate("import", GREEDY)[0].outputs[0].token_ids
    p = engine.generate("import", {**GREEDY, "temperature": 1.0, "top_p": 1e-6, "seed": 5})[0]
    assert p.outputs[0].token_ids == g


def test_min_p_one_is_greedy(engine):
    """min_p=1 keeps only tokens as likely as the best, i.e. the argmax."""
    g = engine.generate("Hello", GREEDY)[0].outputs[0].token_ids
    m = engine.generate("Hello", {**GREEDY, "temperature": 1.0, "min_p": 1.0, "seed": 3})[0]
    assert m.outputs[0].token_ids == g


def test_repetition_penalty_changes_choice(engine):
    """A strong repetition penalty never repeats a token in greedy mode."""
    out = engine.generate("a", {**GREEDY, "repetition_penalty": 1e6, "max_new_tokens": 30})[0]
    ids = out.outputs[0].token_ids
    prompt = engine.encode("a")
    assert len(set(ids)) == len(ids) and not set(ids) & set(prompt)


@pytest.mark.parametrize("freq,pres", [(1.5, 0.0), (0.0, 2.0), (0.7, 0.9)])
def test_frequency_presence_penalty_against_manual_reference(engine, freq, pres):
    """Each greedy choice is the argmax of logits − freq·count − pres·seen over output tokens."""
    prompt = [1, 40, 41, 42]
    params = {**GREEDY, "max_new_tokens": 12, "frequency_penalty": freq, "presence_penalty": pres}
    out = engine.generate(prompt, params)[0].outputs[0].token_ids
    plain = engine.generate(prompt, {**GREEDY, "max_new_tokens": 12})[0].outputs[0].token_ids
    assert out != plain  # the penalty mattered on this prompt
    for i, tok in enumerate(out):
        logits = engine.logits([prompt + out[:i]])[0, -1]
        counts = torch.bincount(torch.tensor(out[:i], dtype=torch.long), minlength=logits.numel())
        ref = logits - freq * counts - pres * (counts > 0).float()
        assert tok == ref.argmax().item()


def test_max_new_tokens_and_length_finish(engine):
    """Exactly max_new_tokens come back with finish_reason 'length'."""
    out = engine.generate("x", {**GREEDY, "max_new_tokens": 7})[0].outputs[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"


def test_stop_token_ids(engine):
    """Generation stops at a stop token id, which is the last token."""
    ref = engine.generate("def", GREEDY)[0].outputs[0].token_ids
    stop_at = ref[5]
    out = engine.generate("def", {**GREEDY, "stop_token_ids": [stop_at]})[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids == ref[: ref.index(stop_at) + 1]


def test_stop_string_cuts_text(engine):
    """A stop string ends generation; the text ends right before it (or with it if asked)."""
    full = engine.generate("def", {**GREEDY, "max_new_tokens": 30})[0].text
    stop = full[8:10]
    assert stop
    out = engine.generate("def", {**GREEDY, "max_new_tokens": 30, "stop": [stop]})[0].outputs[0]
    assert out.finish_reason == "stop" and out.text == full[: full.index(stop)]
    inc = engine.generate(
        "def", {**GREEDY, "max_new_tokens": 30, "stop": stop, "include_stop_str_in_output": True}
    )[0]
    assert inc.text == full[: full.index(stop) + len(stop)]


def test_eos_stops_unless_ignored(engine):
    """The EOS token ends a sequence unless ignore_eos is set."""
    params = {"temperature": 0, "max_new_tokens": 10, "stop_token_ids": []}
    eos = engine.tokenizer.eos_token_id
    prompt = [1, 5, 6]
    first = engine.generate(prompt, {**params, "max_new_tokens": 1})[0].outputs[0].token_ids[0]
    # Make EOS the model's next token by declaring that token the EOS of this engine.
    engine.eos_token_ids.add(first)
    try:
        out = engine.generate(prompt, params)[0].outputs[0]
        assert out.token_ids == [first] and out.finish_reason == "stop"
        out = engine.generate(prompt, {**params, "ignore_eos": True})[0].outputs[0]
        assert len(out.token_ids) == 10
    finally:
        engine.eos_token_ids.discard(first)
        engine.eos_token_ids.add(eos)


def test_n_samples_and_logprobs(engine):
    """n > 1 gives n samples; logprobs have the sampled token and top-k, and match log_softmax."""
    out = engine.generate(
        [1, 9, 8], {"temperature": 1.0, "max_new_tokens": 4, "n": 3, "seed": 0, "logprobs": 2,
                    "ignore_eos": True},
    )[0]  # fmt: skip
    assert len(out.outputs) == 3 and [o.index for o in out.outputs] == [0, 1, 2]
    first = out.outputs[0]
    assert len(first.logprobs) == 4 and first.token_ids[0] in first.logprobs[0]
    ref = engine.logits([[1, 9, 8]])[0, -1].log_softmax(-1)
    for tok, lp in first.logprobs[0].items():
        assert math.isclose(lp, ref[tok].item(), abs_tol=1e-4)
    assert len(first.logprobs[0]) in (2, 3)


def test_stream_concatenates_to_generate(engine):
    """Streaming deltas add up to the non-streamed text and tokens."""
    full = engine.generate("import os", GREEDY)[0].outputs[0]
    deltas = list(engine.generate_stream("import os", GREEDY))
    assert "".join(d.text for d in deltas) == full.text
    assert [t for d in deltas for t in d.token_ids] == full.token_ids
    assert deltas[-1].finish_reason == "length" and engine.stats()["kv_blocks_used"] == 0


def test_chat_uses_template(engine):
    """chat() applies the tokenizer's template and generates."""
    out = engine.chat([{"role": "user", "content": "Hi"}], {**GREEDY, "max_new_tokens": 3})
    assert len(out.outputs[0].token_ids) == 3
    ids = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert out.prompt_token_ids == engine.tokenizer(ids, add_special_tokens=False)["input_ids"]


def test_utf8_never_split(engine):
    """Incremental detokenization of multi-byte characters gives whole characters only."""
    from lowbit.engine.tokenizer import Detokenizer

    text = "Ünïcödé ✓ 日本語 ok"
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = Detokenizer(engine.tokenizer, [], skip_special_tokens=True)
    pieces = [detok.add(t) for t in ids]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("skip", [True, False])
def test_fast_decode_equals_tokenizer_decode(engine, skip):
    """The detokenizer's direct backend decode gives `tokenizer.decode`'s text for random
    windows of ids, special tokens and bytes that make no whole character included; a
    tokenizer that cleans up spaces keeps `tokenizer.decode`."""
    import random

    from lowbit.engine.tokenizer import fast_decode

    tok = engine.tokenizer
    decode = fast_decode(tok, skip)
    assert decode.__code__ is not fast_decode(_CleansUp(tok), skip).__code__  # took the fast path
    rng = random.Random(skip)
    for _ in range(300):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(0, 9))]
        assert decode(ids) == tok.decode(ids, skip_special_tokens=skip), ids


class _CleansUp:
    """A tokenizer stand-in that asks for space clean-up (not a fast tokenizer either)."""

    clean_up_tokenization_spaces = True

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids, skip_special_tokens):
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_sampling_params_object_and_dict_agree(engine):
    """A SamplingParams object and the equivalent dict give the same result."""
    a = engine.generate("x", lowbit.SamplingParams(temperature=0, max_new_tokens=5))[0].text
    b = engine.generate("x", {"temperature": 0, "max_new_tokens": 5})[0].text
    assert a == b


def test_sample_leaves_the_logits_alone_and_penalizes_only_its_row():
    """`sample` copies the logits only when a row has penalties, and never changes the
    caller's tensor: a penalized row and an unpenalized row of one batch."""
    from lowbit.engine.request import SamplingParams
    from lowbit.engine.sampler import SampleRow, sample

    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0], [0.0, 3.0, 2.0, 1.0]])
    before = logits.clone()
    rows = [
        SampleRow(SamplingParams(temperature=0, repetition_penalty=10.0), [1], [], None),
        SampleRow(SamplingParams(temperature=0), [1], [], None),
    ]
    tokens, _ = sample(logits, rows, None)
    assert tokens == [2, 1]  # token 1 (seen in the prompt) penalized in row 0 only
    assert torch.equal(logits, before)
    tokens, _ = sample(logits, rows[1:] * 2, None)  # no penalties: no copy, same answer
    assert tokens == [1, 1] and torch.equal(logits, before)


def test_batched_tokens_default_by_device(tiny_llama, monkeypatch):
    """The forward-pass token budget: 2048 on CPU; on CUDA sized by the GPU's memory; an
    explicit value wins. A budget below a batch's prompts prefills it over several steps."""
    from lowbit.engine import runner as runner_mod

    assert runner_mod.default_batched_tokens(torch.device("cpu")) == 2048

    class Props:
        total_memory = 0

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: Props)
    for gib, want in ((24, 2048), (40, 4096), (79.2, 8192), (139, 8192)):
        Props.total_memory = int(gib * 2**30)
        assert runner_mod.default_batched_tokens(torch.device("cuda")) == want, gib
    with lowbit.Engine(str(tiny_llama), device="cpu") as eng:
        assert eng.scheduler.max_batched_tokens == 2048
    eng = lowbit.Engine(str(tiny_llama), device="cpu", max_num_batched_tokens=96)
    steps = []
    forward = eng.runner.forward
    eng.runner.forward = lambda ids, *a, **k: steps.append(len(ids)) or forward(ids, *a, **k)
    eng.generate(_prompts(8), {"temperature": 0, "max_new_tokens": 1, "ignore_eos": True})
    assert eng.scheduler.max_batched_tokens == 96 and max(steps) <= 96 and len(steps) >= 4
    eng.shutdown()
