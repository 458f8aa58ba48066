"""Hugging Face export/import: logits parity with transformers' LlamaForCausalLM (fp32, 1e-4),
tokenizer id parity with bigllm's SentencePiece Tokenizer, tied/untied, GQA, refusals."""

from __future__ import annotations

import json

import pytest
import torch

from train_utils import bigllm_cli, model_logits, run_ok, small_overrides, train_losses

pytestmark = pytest.mark.slow
TOL = dict(atol=1e-4, rtol=1e-4)
TEXTS = ["Hello world", "  leading  and double  spaces ", "naïve café 日本語 🙂 ﬁ Ｆｕｌｌ", "tabs\tand\nnewlines",
         "<s> literal </s> <pad>", "", "▁already escaped"]


def hf_model(tmp_path, tie: bool, vocab: int = 300):
    """A random GQA Llama saved by transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, rope_theta=10000.0,
                      max_position_embeddings=64, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path / f"hf_tie{tie}"
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def data(small_data):
    return small_data


@pytest.fixture(scope="module")
def run22(small_run):
    """A 2-step tp=2 x pp=2 run (4 gloo processes; the session's, shared with test_convert)."""
    return small_run(2, 2)


def consolidated(run_dir):
    from bigllm.checkpoint import open_native

    src = open_native(run_dir)
    return src.weights(), src


def test_to_hf_logits_and_tokenizer_match(run22, data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bigllm.tokenizer import Tokenizer

    proc = bigllm_cli("convert", "to-hf", "--checkpoint", run22, "--output", tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vocab_size"] == 300 and config["num_key_value_heads"] == 2 and not config["tie_word_embeddings"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    state, src = consolidated(run22)
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf_logits = model(tokens).logits
    torch.testing.assert_close(hf_logits, model_logits(state, src.cfg, src.vocab_size, tokens)[..., :300], **TOL)

    hf_tok, ours = AutoTokenizer.from_pretrained(tmp_path / "hf"), Tokenizer.load(data[0])
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == ours.encode(text), text
        assert hf_tok.decode(ours.encode(text)) == ours.decode(ours.encode(text)), text


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_from_hf_logits_match_and_round_trip(tie, tmp_path):
    from transformers import AutoModelForCausalLM

    model, path = hf_model(tmp_path, tie)
    proc = bigllm_cli("convert", "from-hf", "--input", path, "--output", tmp_path / "run", "--tp", 2, "--pp", 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    state, src = consolidated(tmp_path / "run")
    assert src.tp == 2 and src.pp == 2 and src.cfg.model.tie_embeddings == tie
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(tokens).logits
    torch.testing.assert_close(model_logits(state, src.cfg, src.vocab_size, tokens)[..., :300], want, **TOL)
    # and back: bigllm -> HF gives the original model's logits
    assert bigllm_cli("convert", "to-hf", "--checkpoint", tmp_path / "run", "--output", tmp_path / "back").returncode == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, want, **TOL)


def _first_step_loss_of(model, cfg, tokenizer_dir) -> float:
    """The HF model's own mean loss on the first training step's samples of `cfg` (global batch, consumed 0)."""
    from bigllm.data.gpt import build_gpt_datasets
    from bigllm.data.sampler import collate
    from bigllm.tokenizer import Tokenizer

    t = cfg.train
    train, _, _ = build_gpt_datasets(cfg.data, cfg.model.seq_length, t.seed, Tokenizer.load(tokenizer_dir),
                                     (t.global_batch_size * t.max_steps, t.eval_iters * t.micro_batch_size, 0))
    batch = collate([train[i] for i in range(t.global_batch_size)])
    with torch.no_grad():
        logits = model(batch["tokens"]).logits  # [b, s, v]
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["labels"].reshape(-1)))


def test_from_hf_checkpoint_resumes_in_bigllm_train(data, tmp_path):
    from bigllm.config import RunConfig
    from bigllm.config_loader import load_config
    from train_utils import TINY

    tok, prefix = data
    hf, path = hf_model(tmp_path, tie=False)
    assert bigllm_cli("convert", "from-hf", "--input", path, "--output", tmp_path / "run", "--tp", 2, "--pp", 2,
               "--tokenizer", tok).returncode == 0
    over = small_overrides(tok, prefix, tmp_path / "run", 2, 2, steps=1, **{
        "model.hidden_size": 64, "model.num_layers": 2, "model.ffn_hidden_size": 160, "model.vocab_size": 300,
        "model.make_vocab_size_divisible_by": 4, "model.norm_eps": 1e-5})
    proc = run_ok(4, over)
    assert "resumed from" in proc.stdout and "at step 0" in proc.stdout
    # bigllm's first loss is the imported model's own loss on those samples (not merely ~ln(300))
    want = _first_step_loss_of(hf, load_config(RunConfig, TINY, over), tok)
    assert train_losses(tmp_path / "run")[1] == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("field,value", [("model_type", "gpt2"), ("rope_scaling", {"rope_type": "yarn", "factor": 2.0}),
                                         ("attention_bias", True)])
def test_from_hf_refuses_unsupported_architectures(field, value, tmp_path):
    _, path = hf_model(tmp_path, tie=False)
    cfg = json.loads((path / "config.json").read_text())
    cfg[field] = value
    (path / "config.json").write_text(json.dumps(cfg))
    proc = bigllm_cli("convert", "from-hf", "--input", path, "--output", tmp_path / "run")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("bigllm convert: error:") and field in last, proc.stderr
