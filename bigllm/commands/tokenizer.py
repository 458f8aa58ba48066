"""`bigllm tokenizer train`: train a SentencePiece tokenizer."""



def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a SentencePiece tokenizer",
                       description="Tokenizer tools. Special ids are fixed: unk=0, bos=1, eos=eod=2, pad=3.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = actions.add_parser(
        "train", help="train SentencePiece (byte fallback) on jsonl/txt/parquet/HF-dataset inputs",
        description="Train a SentencePiece model on a sample of at most --max-sentences lines (reservoir "
        "sampling over the stream, so the corpus is never loaded whole). Writes DIR/tokenizer.model and "
        "DIR/tokenizer.json.")
    t.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="corpus files: .jsonl, .jsonl.gz, .txt, .txt.gz, .parquet or a datasets.save_to_disk dir")
    t.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special and byte pieces included")
    t.add_argument("--output", required=True, metavar="DIR", help="output directory")
    t.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    t.add_argument("--json-key", default="text", help="document field of jsonl/parquet/HF inputs (default: text)")
    t.add_argument("--max-sentences", type=int, default=1_000_000, help="cap on sampled training lines")
    t.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of characters covered by pieces; the rest fall back to bytes")
    t.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed records instead of failing")
    t.add_argument("--threads", type=int, default=2, help="SentencePiece trainer threads")
    t.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --output directory")
    t.set_defaults(handler=run_train)


def run_train(args) -> int:
    """Handler of `bigllm tokenizer train`."""
    from bigllm.tokenizer import train_tokenizer

    tok = train_tokenizer(args.input, args.output, args.vocab_size, model_type=args.model_type,
                          json_key=args.json_key, max_sentences=args.max_sentences, skip_bad=args.skip_bad,
                          character_coverage=args.character_coverage, num_threads=args.threads,
                          overwrite=args.overwrite)
    print(f"wrote {tok.model_path} (vocab {tok.vocab_size}, {args.model_type}; unk={tok.unk} bos={tok.bos} "
          f"eos=eod={tok.eos} pad={tok.pad})")
    return 0
