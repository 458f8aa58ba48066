"""Generation: the KV cache (megatron's StaticInferenceContext) gives the no-cache tokens, a
left-padded batch gives the one-by-one tokens, EOS stops a row, sampling is seeded; the CLI.

The equivalence tests use an untrained model with a large init (peaked, varied logits, so
argmax is never a near-tie and sequences are not one repeated token); the CLI test uses the
session's tiny checkpoint (conftest's tiny_run).
"""

from __future__ import annotations

import json

import pytest
import torch


PROMPTS = [[5, 9, 14, 7, 30, 2 + 40], [11], [8, 8, 21, 60], [100, 3 + 50, 77, 12, 13, 14, 15, 16, 17]]


class _Tok:
    """The ids a generator needs (bigllm's fixed specials)."""

    eos, pad, eod, vocab_size = 2, 3, 2, 128


def _model(attention: str):
    """The training model; with attention="megatron" its SDPA core attention is swapped for
    megatron-core's local DotProductAttention (the reference the SDPA path must reproduce)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from bigllm.config import ModelConfig
    from bigllm.evaluate.loading import LoadedLM, init_single_process
    from bigllm.model.build import CausalLM

    init_single_process()
    cfg = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2, seq_length=64,
                      init_std=0.3)
    model = CausalLM(cfg, 128, tp=1, precision="fp32", seed=3).eval()  # a seed whose greedy rows vary
    if attention == "megatron":
        for block in model.blocks:
            attn = block.layer.self_attention
            attn.core_attention = DotProductAttention(attn.config, attn.layer_number, AttnMaskType.causal, "self")
    return LoadedLM(model=model, tokenizer=_Tok(), cfg=cfg, vocab_size=128, device=torch.device("cpu"))


@pytest.fixture(scope="module", params=["sdpa", "megatron"])
def lm(request):
    """The same weights with bigllm's SDPA core attention (training and evaluation) or megatron's."""
    return _model(request.param)


def test_sdpa_matches_megatron_attention():
    """Padded batch, prefill then one cached decode step: the two core attentions agree."""
    from bigllm.evaluate.generate import GenerationConfig, generate_ids

    sdpa, megatron = _model("sdpa"), _model("megatron")
    x = torch.randint(4, 128, (3, 20))
    causal = torch.ones(20, 20, dtype=torch.bool).triu_(1)[None, None]  # megatron's kernel needs it explicit
    with torch.no_grad():
        torch.testing.assert_close(sdpa.model(x), megatron.model(x, attention_mask=causal), rtol=1e-5, atol=1e-5)
    cfg = GenerationConfig(max_new_tokens=10, stop_at_eos=False)
    assert generate_ids(sdpa, PROMPTS, cfg) == generate_ids(megatron, PROMPTS, cfg)


def _gen(lm, prompts, **kw):
    from bigllm.evaluate.generate import GenerationConfig, generate_ids

    kw.setdefault("max_new_tokens", 12)
    kw.setdefault("stop_at_eos", False)
    return generate_ids(lm, prompts, GenerationConfig(**kw))


def test_cached_greedy_equals_uncached(lm):
    cached = _gen(lm, PROMPTS, use_cache=True)
    uncached = _gen(lm, PROMPTS, use_cache=False)
    assert cached == uncached
    assert all(len(set(row)) > 2 for row in cached)  # not a degenerate repetition


def test_batched_equals_one_by_one(lm):
    batched = _gen(lm, PROMPTS)
    assert batched == [_gen(lm, [p])[0] for p in PROMPTS]
    assert _gen(lm, PROMPTS, batch_size=3) == batched


def test_left_padded_row_has_its_own_logits(lm):
    """Logits of a padded row equal the unpadded row's: positions follow the pad offset, pads masked."""
    from bigllm.evaluate.generate import attention_mask, left_pad, rope_for_positions

    def last_logits(prompts):
        tokens, valid, start = left_pad(prompts, 3, max(len(p) for p in prompts))
        pads = (~valid).sum(1, keepdim=True)
        rotary = rope_for_positions(lm.model, (torch.arange(start)[None] - pads).clamp(min=0))
        with torch.no_grad():
            return lm.model(tokens, rotary_pos_emb=rotary, attention_mask=attention_mask(valid, 0, start))[-1]

    alone = last_logits([PROMPTS[1]])
    together = last_logits(PROMPTS)
    torch.testing.assert_close(together[1:2], alone, rtol=1e-5, atol=1e-5)


def test_each_row_stops_at_eos(lm):
    free = _gen(lm, PROMPTS)
    eos = free[0][3]  # make row 0's 4th token the end of sequence

    class Tok(_Tok):
        pass

    Tok.eos = eos
    stopped = _gen(type(lm)(lm.model, Tok(), lm.cfg, lm.vocab_size, lm.device), PROMPTS, stop_at_eos=True)
    for row, full in zip(stopped, free):
        assert row == (full[:full.index(eos)] if eos in full else full)
    assert len(stopped[0]) == 3


def test_sampling_is_seeded_and_top_k_1_is_greedy(lm):
    a = _gen(lm, PROMPTS, temperature=1.0, top_p=0.9, seed=3)
    assert a == _gen(lm, PROMPTS, temperature=1.0, top_p=0.9, seed=3)
    assert a != _gen(lm, PROMPTS, temperature=1.0, top_p=0.9, seed=4)
    assert _gen(lm, PROMPTS, temperature=0.7, top_k=1) == _gen(lm, PROMPTS)
    assert all(0 <= t < 128 for row in a for t in row)


@pytest.mark.slow
def test_generate_cli(tiny_run, tmp_path, capsys):
    from bigllm.cli import main

    tiny = tiny_run
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "months: march april", "id": 1}\n{"prompt": "count: 5", "id": 2}\n')
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--checkpoint", str(tiny["run"]), "--input", str(prompts), "--max-new-tokens", "6",
                 "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2]
    # the CLI's continuations are the library's greedy ones for the same checkpoint
    from bigllm.evaluate.generate import GenerationConfig, generate_texts
    from bigllm.evaluate.loading import load_lm

    lm = load_lm(tiny["run"])
    want = generate_texts(lm, ["months: march april", "count: 5"], GenerationConfig(max_new_tokens=6))
    assert [r["generation"] for r in rows] == want and all(want)
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tiny["run"]), "--prompt", "days: monday",
                 "--max-new-tokens", "4", "--temperature", "0.8", "--top-k", "5", "--seed", "3"]) == 0
    sampled = capsys.readouterr().out
    again = generate_texts(lm, ["days: monday"], GenerationConfig(max_new_tokens=4, temperature=0.8, top_k=5, seed=3))
    assert sampled == "days: monday" + again[0] + "\n"
    assert main(["generate", "--checkpoint", str(tiny["run"]), "--input", str(tmp_path / "none.jsonl")]) == 1
