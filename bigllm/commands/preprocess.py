"""`bigllm preprocess`: tokenize a corpus into megatron-core .bin/.idx shards, or merge shards."""



def register(sub) -> None:
    p = sub.add_parser(
        "preprocess", help="tokenize a corpus into .bin/.idx shards (or merge shards)",
        description="Tokenize --input files into PREFIX.bin/PREFIX.idx (megatron-core IndexedDataset, one "
        "document per record, EOD appended). Plain text: one document per blank-line-separated paragraph. "
        "Or concatenate existing shards with --merge.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", metavar="PATH",
                     help="corpus files: .jsonl, .jsonl.gz, .txt, .txt.gz, .parquet or a datasets.save_to_disk dir")
    src.add_argument("--merge", nargs="+", metavar="PREFIX", help="merge these shard prefixes, in order")
    p.add_argument("--output-prefix", required=True, help="write OUTPUT_PREFIX.bin and OUTPUT_PREFIX.idx")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="tokenizer directory: from 'bigllm tokenizer train' (SentencePiece), or a model's Hugging Face "
                   "tokenizer.json with its tokenizer_config.json (RUN_DIR/tokenizer after 'bigllm convert from-hf')")
    p.add_argument("--json-key", default="text", help="document field of jsonl/parquet/HF inputs (default: text)")
    p.add_argument("--workers", type=int, default=1,
                   help="encoding processes: this one and N-1 forked (output is identical for any N)")
    p.add_argument("--no-append-eod", dest="append_eod", action="store_false",
                   help="do not append the end-of-document token to each document")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip (and count) malformed lines, missing keys and invalid UTF-8 instead of failing")
    p.add_argument("--chunk-docs", type=int, default=None, metavar="N",
                   help="documents per worker task, at most (default 8192; a task also ends after 1 MiB of input, "
                   "less toward the end)")
    p.add_argument("--word-cache", type=int, default=None, metavar="N",
                   help="words each worker caches (BPE tokenizers; output is identical either way); "
                   "0 turns the cache off (default 200000)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUTPUT_PREFIX.bin/.idx (the new shard is renamed over it once complete)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.set_defaults(handler=run)


def run(args) -> int:
    """Handler of `bigllm preprocess`."""
    from bigllm.errors import BigLLMError

    if args.merge:
        from bigllm.data.merge import merge_shards

        result = merge_shards(args.merge, args.output_prefix, overwrite=args.overwrite)
    else:
        if not args.tokenizer:
            raise BigLLMError("--tokenizer DIR is required to preprocess --input files")
        if args.word_cache is not None and args.word_cache < 0:
            raise BigLLMError(f"--word-cache must be 0 (off) or a positive word count, got {args.word_cache}")
        from bigllm.data.preprocess import preprocess

        result = preprocess(args.input, args.tokenizer, args.output_prefix, json_key=args.json_key,
                            workers=args.workers, append_eod=args.append_eod, skip_bad=args.skip_bad,
                            progress=args.progress, overwrite=args.overwrite,
                            **({} if args.chunk_docs is None else {"chunk_docs": args.chunk_docs}),
                            **({} if args.word_cache is None else {"word_cache": args.word_cache}))
    print(result.summary())
    return 0
