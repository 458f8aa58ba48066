"""`bigllm convert to-hf` / `from-hf`: Hugging Face Llama directories to and from bigllm.

    bigllm convert to-hf --checkpoint runs/tiny --output hf/tiny
    bigllm convert from-hf --input hf/tiny --output runs/imported --tp 2 --pp 2

The weight and config mapping is `bigllm.model.hf_adapter`'s; reading checkpoints and writing
run dirs is `bigllm.checkpoint`'s. This module adds the tokenizer export and the two commands.
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
from bigllm.tokenizer import Tokenizer

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


def _tokenizer_model(path: str | None) -> Path | None:
    if not path:
        return None
    p = Path(path)
    model = p / "tokenizer.model" if p.is_dir() else p
    return model if model.is_file() else None


# ----- commands -------------------------------------------------------------------------------
def to_hf(checkpoint: str, output: str, tokenizer: str | None = None, overwrite: bool = False) -> Path:
    """Write HF_DIR: model.safetensors, config.json, generation_config.json and tokenizer files."""
    from safetensors.torch import save_file

    check_new_target(output, overwrite, "--output")
    ckpt = open_checkpoint(checkpoint)
    if isinstance(ckpt, HFModel):
        raise CheckpointError(f"'{checkpoint}' is already a Hugging Face dir; give a bigllm checkpoint")
    cfg, state = ckpt.cfg, ckpt.weights("fp32", progress=True)
    model_file = _tokenizer_model(tokenizer or ckpt.tokenizer_path)
    if model_file is not None:
        Tokenizer.load(model_file)  # a damaged tokenizer.model fails here, before anything is written
    # HF vocab_size = the real vocabulary: the padding rows are dropped.
    vocab = ckpt.vocab.real
    with new_directory(output, overwrite, what="--output") as out:
        hf_config(cfg.model, vocab).save_pretrained(out)
        save_file(to_hf_state(state, cfg.model, vocab), str(out / HF_WEIGHTS), metadata={"format": "pt"})
        if model_file is not None:
            hf_tokenizer(model_file).save_pretrained(out)
            shutil.copy(model_file, out / "tokenizer.model")
        else:
            print("warning: no tokenizer found (pass --tokenizer); wrote the model only")
    return Path(output)


def from_hf(input_dir: str, output: str, tp: int = 1, pp: int = 1, tokenizer: str | None = None,
            overwrite: bool = False) -> Path:
    """Import HF Llama weights as a bigllm run dir with a step-0 checkpoint in layout tp x pp."""
    src = Path(input_dir)
    if not (src / "config.json").is_file():
        raise CheckpointError(f"'{src}' has no config.json: not a Hugging Face model directory")
    check_new_target(output, overwrite, "--output")
    hf = HFModel(src)  # refuses an unsupported config before reading the weights
    if tokenizer:
        Tokenizer.load(tokenizer)
    cfg = RunConfig(model=hf.model_cfg)
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.zero_stage = tp, pp, 0
    cfg.data.tokenizer = str(Path(tokenizer).resolve()) if tokenizer else ""
    cfg.validate()
    padded = resolve_vocab(hf.model_cfg, None, tp).padded
    state = from_hf_state(hf.hf_weights(), hf.model_cfg, padded)
    return write_run(state, cfg, padded, output, tokenizer_vocab=hf.model_cfg.vocab_size,
                     origin={"from_hf": str(src.resolve())}, overwrite=overwrite)


def cli_to_hf(args) -> int:
    print(f"wrote {to_hf(args.checkpoint, args.output, args.tokenizer, args.overwrite)}")
    return 0


def cli_from_hf(args) -> int:
    print(f"wrote {from_hf(args.input, args.output, args.tp, args.pp, args.tokenizer, args.overwrite)}")
    return 0
