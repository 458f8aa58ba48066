"""`bigllm convert to-hf` / `from-hf`: Hugging Face Llama, Mistral, Qwen2 and Qwen3 directories to and
from bigllm.

    bigllm convert to-hf --checkpoint runs/tiny --output hf/tiny
    bigllm convert from-hf --input hf/Qwen3-8B --output runs/qwen3 --tp 2 --pp 2

The weight and config mapping is `bigllm.model.hf_adapter`'s; reading checkpoints and writing
run dirs is `bigllm.checkpoint`'s. This module adds the tokenizers (a Hugging Face model's own
files are copied into the run and back; bigllm's SentencePiece ones are converted) and the two
commands.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from bigllm.checkpoint import HFModel, open_checkpoint
from bigllm.checkpoint.write import write_run
from bigllm.config import RunConfig
from bigllm.errors import CheckpointError
from bigllm.fsutil import check_new_target, new_directory
from bigllm.model.hf_adapter import from_hf_state, hf_config, to_hf_state
from bigllm.model.sizes import resolve_vocab

HF_WEIGHTS = "model.safetensors"


# ----- tokenizer ------------------------------------------------------------------------------
def hf_tokenizer(model_file: str | Path):
    """A `PreTrainedTokenizerFast` that encodes like bigllm's SentencePiece Tokenizer (no BOS/EOS).

    transformers' `SpmConverter.build_tokenizer_from_spm_proto` follows the model's normalizer
    spec (NFKC charsmap, whitespace handling, dummy prefix) and byte fallback. Its BOS token is
    the EOD piece: a bigllm model sees every document after an EOD and never sees SentencePiece's
    <s>, so a tool that conditions on BOS (lm-eval's hf model: empty contexts, rolling windows)
    conditions it as it was trained, and scores as `bigllm evaluate harness` does.
    """
    from sentencepiece import sentencepiece_model_pb2
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())  # Tokenizer.load checked it first
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    pieces = [p.piece for p in proto.pieces]
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=pieces[0], bos_token=pieces[2],
                                   eos_token=pieces[2], pad_token=pieces[3], add_bos_token=False,
                                   add_eos_token=False, clean_up_tokenization_spaces=False,
                                   split_special_tokens=True)  # "<s>" in text is text, as in SentencePiece


# ----- commands -------------------------------------------------------------------------------
def _special_ids(tok) -> dict:
    """config.json's bos/eos/pad ids: a Hugging Face tokenizer's own; for bigllm's SentencePiece
    tokenizers the fixed ids (their export names the EOD piece its BOS, see `hf_tokenizer`); none
    without a tokenizer."""
    if tok is None:
        return {}
    if tok.kind == "sentencepiece":
        from bigllm.tokenizer import BOS_ID, EOS_ID, PAD_ID

        return {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    return {"bos_token_id": tok.bos, "eos_token_id": tok.eos, "pad_token_id": tok.pad_token_id}


def _checkpoint_tokenizer(path: str | None):
    """The tokenizer at `path` (None when no path is recorded or it is gone: the model is exported alone)."""
    from bigllm.tokenizer import load_tokenizer

    return load_tokenizer(path) if path and Path(path).exists() else None


def to_hf(checkpoint: str, output: str, tokenizer: str | None = None, overwrite: bool = False) -> Path:
    """Write HF_DIR: model.safetensors, config.json (the run's family: model_type, architecture),
    generation_config.json and the tokenizer's files."""
    from safetensors.torch import save_file

    check_new_target(output, overwrite, "--output")
    ckpt = open_checkpoint(checkpoint)
    if isinstance(ckpt, HFModel):
        raise CheckpointError(f"'{checkpoint}' is already a Hugging Face dir; give a bigllm checkpoint")
    cfg, state = ckpt.cfg, ckpt.weights("fp32", progress=True)
    tok = _checkpoint_tokenizer(tokenizer or ckpt.tokenizer_path)  # a damaged one fails here, before writing
    vocab = ckpt.vocab.real  # HF vocab_size = the real vocabulary: the padded rows are dropped
    with new_directory(output, overwrite, what="--output") as out:
        hf_config(cfg.model, vocab, _special_ids(tok)).save_pretrained(out)
        save_file(to_hf_state(state, cfg.model, vocab), str(out / HF_WEIGHTS), metadata={"format": "pt"})
        if tok is None:
            print("warning: no tokenizer found (pass --tokenizer); wrote the model only")
        elif tok.kind == "sentencepiece":
            hf_tokenizer(tok.model_path).save_pretrained(out)
            shutil.copy(tok.model_path, out / "tokenizer.model")
        else:
            for f in tok.files:
                shutil.copy(f, out / f.name)
    return Path(output)


def from_hf(input_dir: str, output: str, tp: int = 1, pp: int = 1, tokenizer: str | None = None,
            overwrite: bool = False) -> Path:
    """Import a Hugging Face model as a bigllm run dir with a step-0 checkpoint in layout tp x pp,
    and a copy of its tokenizer (the dir's own, or --tokenizer) in RUN_DIR/tokenizer."""
    from bigllm.tokenizer import load_tokenizer

    src = Path(input_dir)
    if not (src / "config.json").is_file():
        raise CheckpointError(f"'{src}' has no config.json: not a Hugging Face model directory")
    check_new_target(output, overwrite, "--output")
    hf = HFModel(src)  # refuses an unsupported config before reading the weights
    tok = load_tokenizer(tokenizer) if tokenizer else _own_tokenizer(src)
    if tok is not None and tok.vocab_size > hf.vocab.real:
        raise CheckpointError(f"the tokenizer {tokenizer or src} has {tok.vocab_size} tokens, more than the model's "
                              f"vocab_size {hf.vocab.real} in {src / 'config.json'}; pass the model's own tokenizer")
    if tok is None:
        print(f"warning: {src} holds no tokenizer (tokenizer.json or tokenizer.model); pass --tokenizer to "
              "record one (the run needs data.tokenizer to train)")
    cfg = RunConfig(model=hf.model_cfg)
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.zero_stage = tp, pp, 0
    cfg.validate()
    padded = resolve_vocab(hf.model_cfg, None, tp).padded
    state = from_hf_state(hf.hf_weights(), hf.model_cfg, padded)
    return write_run(state, cfg, padded, output, tokenizer_vocab=tok.vocab_size if tok else hf.model_cfg.vocab_size,
                     origin={"from_hf": str(src.resolve())}, overwrite=overwrite,
                     tokenizer_files=tok.files if tok is not None else [])


def _own_tokenizer(hf_dir: Path):
    """The Hugging Face dir's tokenizer, or None when it has no tokenizer file at all."""
    from bigllm.tokenizer import HF_FILE, MODEL_FILE, load_tokenizer

    if not ((hf_dir / HF_FILE).is_file() or (hf_dir / MODEL_FILE).is_file()):
        return None
    return load_tokenizer(hf_dir)


def cli_to_hf(args) -> int:
    print(f"wrote {to_hf(args.checkpoint, args.output, args.tokenizer, args.overwrite)}")
    return 0


def cli_from_hf(args) -> int:
    print(f"wrote {from_hf(args.input, args.output, args.tp, args.pp, args.tokenizer, args.overwrite)}")
    return 0
