"""The open model families (Llama 3.x, Mistral, Qwen2, Qwen3; the mixtures of experts Mixtral and
Qwen3-MoE) and their Hugging Face tokenizers.

Each family is a random model that transformers builds from a small config of that family (with
its features switched on: llama3 RoPE scaling and tied embeddings, linear RoPE scaling, q/k/v
biases, per-head q/k norms with a head size apart from hidden / heads; experts with renormalised
and raw top-k weights and a dense first layer), non-trivial biases, norms and routers, saved with a byte-level BPE tokenizer.json trained here with the `tokenizers` library.
Checked against transformers: logits (fp32, 1e-5), the round trip (tensor-exact, the same
model_type and architecture), `bigllm evaluate perplexity` against transformers' own
sliding-window loop, greedy `bigllm generate` against transformers' `generate`. Then continued
pretraining of the Qwen3 model end to end, a new learning rate on resume, parity of a model that
uses every feature across layouts, and the refusals.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from train_utils import (PARITY, base_overrides, bigllm_cli, model_logits, parity_record, run_ok, small_overrides,
                         train_log, train_losses, transformers_nll)

pytestmark = pytest.mark.slow
VOCAB = 320  # the model's; the tokenizer has 300 (padding rows, as Qwen's configs have)
TOL = dict(atol=1e-5, rtol=1e-5)
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        sliding_window=None, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1e6)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, tie_word_embeddings=True, rope_theta=1e6)),
    # Mixtral: 4 experts of inner size 160 (its intermediate_size), top-2 renormalised.
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        num_local_experts=4, num_experts_per_tok=2, sliding_window=None, router_jitter_noise=0.0)),
    # Qwen3-MoE: a dense first layer (mlp_only_layers, intermediate_size 160), 4 experts of 48,
    # top-2 of the softmax over all experts without renormalising (norm_topk_prob false), qk-norm.
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=False, mlp_only_layers=[0],
        decoder_sparse_step=1, head_dim=24, rope_theta=1e6)),
}


@pytest.fixture(scope="module")
def bpe(small_data, tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer.json (NFC, GPT-2's split regex: Qwen's kind) of 300 tokens with
    <|endoftext|> as EOS, trained on the small corpus and saved by transformers."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = Path(small_data[1]).parent / "corpus.jsonl"
    tok = Tokenizer(models.BPE())
    tok.normalizer, tok.decoder = normalizers.NFC(), decoders.ByteLevel()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((json.loads(line)["text"] for line in corpus.read_text().splitlines()), trainer)
    out = tmp_path_factory.mktemp("bpe")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(out)
    return out


def family_model(family: str, root: Path, bpe: Path):
    """(the transformers model, its saved directory with the tokenizer's files)."""
    import transformers

    config_class, model_class, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**{**COMMON, **extra}))
    with torch.no_grad():  # non-trivial biases and norms, so that a wrong mapping shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.0, 0.3)
            if name.endswith("gate.weight"):  # routers: decisive scores, so each token's experts are clear
                p.normal_(0.0, 0.5)
    path = root / family
    model.eval().save_pretrained(path)
    for f in bpe.iterdir():
        shutil.copy(f, path / f.name)
    return model, path


@pytest.fixture(scope="module")
def imported(bpe, tmp_path_factory):
    """family -> (HF model, HF dir, run dir imported by `bigllm convert from-hf`), made on first use."""
    made = {}

    def get(family):
        if family not in made:
            root = tmp_path_factory.mktemp(family)
            model, path = family_model(family, root, bpe)
            proc = bigllm_cli("convert", "from-hf", "--input", path, "--output", root / "run")
            assert proc.returncode == 0, proc.stderr[-2000:]
            made[family] = (model, path, root / "run")
        return made[family]

    return get


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_imports_and_exports_exactly(family, imported, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from bigllm.checkpoint import open_native

    model, path, run = imported(family)
    src = open_native(run)
    assert src.cfg.model.family == family and (run / "tokenizer" / "tokenizer.json").is_file()
    assert src.cfg.data.tokenizer == str((run / "tokenizer").resolve())
    tokens = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(tokens).logits
    torch.testing.assert_close(model_logits(src.weights(), src.cfg, src.vocab_size, tokens)[..., :VOCAB], want, **TOL)
    proc = bigllm_cli("convert", "to-hf", "--checkpoint", run, "--output", tmp_path / "back")
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = load_file(str(path / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    source, back = (json.loads((d / "config.json").read_text()) for d in (path, tmp_path / "back"))
    assert back["model_type"] == source["model_type"] == family
    assert back["architectures"] == source["architectures"] == [FAMILIES[family][1]]
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == (path / "tokenizer.json").read_bytes()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    assert type(exported).__name__ == FAMILIES[family][1]
    with torch.no_grad():
        torch.testing.assert_close(exported(tokens).logits, want, **TOL)


# Mixtral's bigllm model is qwen3_moe's without qk-norm (its logits are compared above): one MoE family
# here keeps the suite's time.
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "mixtral"])
def test_family_perplexity_and_greedy_generation_equal_transformers(family, imported, small_data, tmp_path):
    """`bigllm evaluate perplexity` on the imported run (its own Hugging Face tokenizer) equals
    transformers' sliding-window loop on the same EOD-separated stream, and greedy `bigllm generate`
    continues prompts as transformers' `generate` does."""
    from transformers import AutoTokenizer

    model, path, run = imported(family)
    heldout = tmp_path / "heldout.jsonl"
    corpus = (Path(small_data[1]).parent / "corpus.jsonl").read_text().splitlines()
    heldout.write_text("\n".join(corpus[:6]) + "\n")
    proc = bigllm_cli("evaluate", "perplexity", "--checkpoint", run, "--data", heldout, "--seq-len", 48,
                      "--stride", 24, "--output", tmp_path / "ppl.json", "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "ppl.json").read_text())
    tok = AutoTokenizer.from_pretrained(path)
    eos = tok.eos_token_id
    stream = [eos] + [t for line in corpus[:6] for t in tok.encode(json.loads(line)["text"], add_special_tokens=False)
                      + [eos]]
    nll, count = transformers_nll(path, torch.tensor(stream), 48, 24)
    assert report["tokens"] == count and report["loss"] == pytest.approx(nll / count, rel=1e-5)
    prompts = ["alpha beta gamma", "the tensor shard"]
    proc = bigllm_cli("generate", "--checkpoint", run, "--prompt", prompts[0], "--prompt", prompts[1],
                      "--max-new-tokens", 8, "--output", tmp_path / "gen.jsonl")
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = [json.loads(line)["generation"] for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    for prompt, text in zip(prompts, got):
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                 eos_token_id=eos, pad_token_id=eos)
        new = out[0, ids.size(1):].tolist()
        new = new[:new.index(eos)] if eos in new else new
        assert text == tok.decode(ids[0].tolist() + new, skip_special_tokens=True)[len(prompt):], (prompt, text)


def test_qwen3_continued_pretraining_end_to_end(imported, small_data, tmp_path):
    """from-hf -> preprocess with the run's own tokenizer -> train (2 processes, tp = 2) with a new
    learning-rate schedule -> to-hf. The shard holds transformers' ids with the EOS after each
    document; the first loss is the Hugging Face model's own on that batch; every step runs the
    asked-for learning rate; transformers loads the result."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bigllm.config import OptimConfig
    from bigllm.optim import lr_lambda

    model, path, run = imported("qwen3")
    work = tmp_path / "run"
    shutil.copytree(run, work)
    corpus = Path(small_data[1]).parent / "corpus.jsonl"
    proc = bigllm_cli("preprocess", "--input", corpus, "--tokenizer", work / "tokenizer", "--output-prefix",
                      tmp_path / "data" / "qwen")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "each document ends with <|endoftext|> (id 0)" in proc.stdout
    tok = AutoTokenizer.from_pretrained(path)
    shard = IndexedDataset(str(tmp_path / "data" / "qwen"), mmap=True)
    docs = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    assert len(shard) == len(docs)
    assert all(shard[i].tolist() == tok.encode(d, add_special_tokens=False) + [tok.eos_token_id]
               for i, d in enumerate(docs))
    optim = {"optim.lr": 3e-3, "optim.min_lr": 3e-4, "optim.warmup_steps": 2, "optim.decay": "linear"}
    over = [f"train.run_dir={work}", f"data.tokenizer={work / 'tokenizer'}",
            f"data.prefixes=[{tmp_path / 'data' / 'qwen'}]", "data.split=90,10,0", "train.max_steps=4",
            "train.global_batch_size=4", "train.micro_batch_size=2", "model.seq_length=64", "train.log_interval=1",
            "train.eval_interval=0", "train.tensorboard=false", "parallel.tp=2", *(f"{k}={v}" for k, v in optim.items())]
    proc = run_ok(2, over, config=work / "config.yaml")
    assert "the optimizer starts fresh" in proc.stdout and "optim.lr 0.0003 -> 0.003" in proc.stdout
    lrs, factor = train_log(work, "train/lr"), lr_lambda(OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=2,
                                                                     decay="linear"), 4)
    assert sorted(lrs) == [1, 2, 3, 4]
    assert all(lrs[s] == pytest.approx(3e-3 * factor(s - 1), rel=1e-9) for s in lrs), lrs
    assert train_losses(work)[1] == pytest.approx(_first_batch_loss(model, work, tok), rel=1e-4)
    proc = bigllm_cli("convert", "to-hf", "--checkpoint", work, "--output", tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr[-2000:]
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert type(trained).__name__ == "Qwen3ForCausalLM"
    assert not torch.equal(trained.model.layers[0].self_attn.q_norm.weight, model.model.layers[0].self_attn.q_norm.weight)


def _first_batch_loss(model, run_dir: Path, tok) -> float:
    """The Hugging Face model's own mean loss on the run's first global batch (consumed 0)."""
    from bigllm.config import RunConfig
    from bigllm.config_loader import load_config
    from bigllm.data.gpt import build_gpt_datasets
    from bigllm.data.sampler import collate
    from bigllm.tokenizer import load_tokenizer

    cfg = load_config(RunConfig, run_dir / "config.yaml", [])
    t = cfg.train
    train, _, _ = build_gpt_datasets(cfg.data, cfg.model.seq_length, t.seed, load_tokenizer(cfg.data.tokenizer),
                                     (t.global_batch_size * t.max_steps, t.eval_iters * t.micro_batch_size, 0))
    batch = collate([train[i] for i in range(t.global_batch_size)])
    with torch.no_grad():
        logits = model(batch["tokens"]).logits
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["labels"].reshape(-1)))


def test_a_resume_with_a_new_learning_rate_runs_it(small_run, small_data, tmp_path):
    """Any run resumed with other optim settings follows them from the resumed step (the start-up
    line names old and new); the logged learning rate is the new schedule's at every step."""
    from bigllm.config import OptimConfig
    from bigllm.optim import lr_lambda

    run = tmp_path / "run"
    shutil.copytree(small_run(1, 1), run)
    new = {"optim.lr": 1e-3, "optim.min_lr": 1e-4, "optim.warmup_steps": 0, "optim.decay": "linear"}
    proc = run_ok(1, small_overrides(*small_data, run, 1, 1, steps=5, **new))
    assert "the new schedule runs from step 2" in proc.stdout and "optim.lr 0.003 -> 0.001" in proc.stdout
    factor = lr_lambda(OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=0, decay="linear"), 5)
    lrs = train_log(run, "train/lr")
    assert [lrs[s] for s in (3, 4, 5)] == pytest.approx([1e-3 * factor(s - 1) for s in (3, 4, 5)], rel=1e-9)


# ----- every feature at once, across layouts ------------------------------------------------------
FEATURES = {"model.qkv_bias": "true", "model.qk_norm": "true", "model.head_dim": 48, "model.num_kv_heads": 4,
            "model.tie_embeddings": "true", "model.rope_scaling.type": "llama3", "model.rope_scaling.factor": 4.0,
            "model.rope_scaling.original_max_position_embeddings": 32}


@pytest.fixture(scope="module")
def features_reference(tokenizer_dir, shard_prefix, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("features_ref")
    run_ok(1, base_overrides(tokenizer_dir, shard_prefix, run_dir, **PARITY, **FEATURES))
    return run_dir


@pytest.mark.parametrize("nproc,extra", [
    (4, {"parallel.tp": 2, "parallel.pp": 2, "parallel.zero_stage": 1, "parallel.sequence_parallel": "true",
         "model.activation_checkpointing": "true"}),
    (4, {"parallel.tp": 2, "parallel.cp": 2, "parallel.zero_stage": 2}),
    (2, {"parallel.zero_stage": 3}),
], ids=["tp2xpp2-sp-recompute", "tp2xcp2-zero2", "dp2-zero3"])
def test_every_feature_matches_one_process(nproc, extra, features_reference, tokenizer_dir, shard_prefix, tmp_path):
    """q/k/v biases, qk-norm (its weight's gradient summed over tp), head_dim 48 (hidden 128 / 4
    heads would be 32), llama3 RoPE scaling and tied embeddings: the same losses (1e-5) and gradient
    norms (1e-4) as one process, and the consolidated weights after training agree too (5e-4); the
    tp2 x pp2 run resumes in one process (elastic) with the one-process run's next loss."""
    from bigllm.checkpoint import open_native

    run_ok(nproc, base_overrides(tokenizer_dir, shard_prefix, tmp_path, **PARITY, **FEATURES, **extra))
    got, want = parity_record(tmp_path), parity_record(features_reference)
    assert sorted(got) == sorted(want)
    # ZeRO-3 sums the squares of its partitions in another order: 1.1e-4 of the norm measured here
    # (7.7e-5 for the plain model on another corpus); a wrong reduction doubles it
    # tp2 x pp2 with SP and recompute: 1.03e-4 on one 2-core CPU (fails at 1e-4 there since before
    # the GPU work, b768536; CI's CPU stayed under), so 1.5e-4
    norm_rtol = 3e-4 if extra.get("parallel.zero_stage") == 3 else 1.5e-4 if extra.get("parallel.pp") else 1e-4
    for step in want:
        assert abs(got[step]["loss"] - want[step]["loss"]) <= 1e-5, (step, got[step], want[step])
        assert abs(got[step]["grad_norm"] - want[step]["grad_norm"]) <= norm_rtol * want[step]["grad_norm"], step
    a, b = open_native(tmp_path).weights(), open_native(features_reference).weights()
    assert list(a) == list(b)
    if extra.get("parallel.pp") == 2:  # elastic resume of this tp2 x pp2 run in one process, one more step
        more = {**PARITY, **FEATURES, "train.max_steps": PARITY["train.max_steps"] + 1}
        resumed = run_ok(1, base_overrides(tokenizer_dir, shard_prefix, tmp_path, **more))
        assert "resharded from tp=2 pp=2" in resumed.stdout
        ref = tmp_path.parent / f"{tmp_path.name}-ref"
        shutil.copytree(features_reference, ref)
        run_ok(1, base_overrides(tokenizer_dir, shard_prefix, ref, **more))
        step = more["train.max_steps"]
        assert abs(train_losses(tmp_path)[step] - train_losses(ref)[step]) <= 1e-5
    # Adam's normalised updates carry float reassociation into the weights: up to 1.04e-4 after 6
    # steps at lr 3e-3 (measured, ZeRO-3); a gradient summed over the wrong group moves them by ~lr a step
    worst = {k: float((a[k] - b[k]).abs().max()) for k in a}
    assert max(worst.values()) <= 5e-4, sorted(worst.items(), key=lambda kv: -kv[1])[:4]


# ----- bad input ------------------------------------------------------------------------------
def test_refusals_name_the_file_or_key(imported, bpe, small_data, tmp_path):
    corpus = Path(small_data[1]).parent / "corpus.jsonl"
    broken = tmp_path / "broken_tok"
    shutil.copytree(bpe, broken)
    (broken / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    empty = tmp_path / "empty_hf"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    _, path, _ = imported("qwen3")
    yarn = tmp_path / "yarn"
    shutil.copytree(path, yarn)
    config = json.loads((yarn / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}
    (yarn / "config.json").write_text(json.dumps(config))
    big = tmp_path / "big_tok"  # the byte-level BPE with 40 more special tokens: 340 > the model's 320
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    grown = Tokenizer.from_file(str(bpe / "tokenizer.json"))
    grown.add_special_tokens([f"<extra_{i}>" for i in range(40)])
    PreTrainedTokenizerFast(tokenizer_object=grown, eos_token="<|endoftext|>").save_pretrained(big)
    cases = [
        (["preprocess", "--input", corpus, "--tokenizer", broken, "--output-prefix", tmp_path / "o1"],
         ["broken_tok/tokenizer.json is not a readable Hugging Face tokenizer"]),
        (["preprocess", "--input", corpus, "--tokenizer", empty, "--output-prefix", tmp_path / "o2"],
         ["empty_hf", "neither a Hugging Face tokenizer.json nor a SentencePiece tokenizer.model"]),
        (["convert", "from-hf", "--input", yarn, "--output", tmp_path / "o3"],
         ["rope_parameters.rope_type='yarn'", "'linear' and 'llama3'"]),
        (["convert", "from-hf", "--input", path, "--output", tmp_path / "o4", "--tokenizer", big],
         ["has 340 tokens", f"vocab_size {VOCAB}"]),
    ]
    for argv, causes in cases:
        before = sorted(p.name for p in tmp_path.iterdir())
        proc = bigllm_cli(*argv)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 1 and last.startswith("bigllm ") and "error:" in last, (argv, proc.stderr[-2000:])
        assert all(cause in last for cause in causes), (causes, last)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, argv


# ----- the byte-level BPE word cache -------------------------------------------------------------
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.mark.parametrize("style", ["gpt2", "llama3"])
def test_byte_level_word_cache_equals_the_library(style, small_data):
    """`bigllm.data.bytelevel` against `tokenizers` itself, on text made to find the edges: quotes
    and contractions, digit runs, runs of spaces, tabs and line breaks, punctuation, added tokens in
    the text, non-ASCII and control characters (those documents go to the library whole)."""
    import random

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from bigllm.data.bytelevel import ByteLevelWords

    corpus = [json.loads(line)["text"] for line in (Path(small_data[1]).parent / "corpus.jsonl").read_text().splitlines()]
    tok = Tokenizer(models.BPE(ignore_merges=style == "llama3"))
    tok.normalizer, tok.decoder = normalizers.NFC(), decoders.ByteLevel()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True) if style == "gpt2" else \
        pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus + ["Don't we'll they're I'M 12345 3.14 a  b\t\tc\n\n d"] * 5, trainer)
    words, why = ByteLevelWords.for_tokenizer(tok, max_words=50)  # small: the cache refills on the way
    assert words is not None, why
    rng = random.Random(0)
    palette = ["a", "Z", "don't", "'S", "'ll", " ", "  ", "\t", "\n", "\r\n", "7", "1234567", ".", "!?", "--", "'",
               '"', "<|endoftext|>", "naïve", "日本", "\x0b", "\x1c", "alpha", " beta", "GAMMA"]
    texts = ["".join(rng.choice(palette) for _ in range(rng.randint(0, 40))) for _ in range(3000)] + corpus
    got, stats = words.encode(texts)
    want = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    assert [g.tolist() for g in got] == want
    assert 0 < stats.whole_docs < len(texts) and stats.words > 0 and 0 < stats.hit_rate < 1


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_harness_with_a_hugging_face_tokenizer_equals_lm_evals_hf_model(family, imported, monkeypatch):
    """`bigllm evaluate harness` on the imported Qwen3 / Qwen3-MoE run (its tokenizer.json) scores what
    lm-eval's own `hf` model scores on the source directory: every choice's log-likelihood and the
    rolling perplexity."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from bigllm.evaluate.harness import run_harness
    from bigllm.evaluate.loading import load_lm
    from train_utils import ROOT

    _, path, run = imported(family)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ROOT)  # the tasks' data_files are relative to the repository root
    tasks, include = ["bigllm_mc", "bigllm_text"], str(ROOT / "tests" / "harness_tasks")
    ours = run_harness(load_lm(run, device="cpu"), tasks, include, limit=8, batch_size=4, log_samples=True)
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={path},dtype=float32", tasks=tasks,
                                     task_manager=TaskManager(include_path=include), device="cpu", batch_size=4,
                                     limit=8, log_samples=True)
    lls = [[ll for s in r["samples"]["bigllm_mc"] for ll, _ in s["filtered_resps"]] for r in (ours, theirs)]
    assert len(lls[0]) == len(lls[1]) > 0
    assert all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(*lls)), list(zip(*lls))[:5]
    key = "byte_perplexity,none"
    assert ours["results"]["bigllm_text"][key] == pytest.approx(theirs["results"]["bigllm_text"][key], rel=1e-4)
