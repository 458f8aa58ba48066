"""Offline evaluation of bigllm checkpoints (and Hugging Face Llama directories).

    lm = load_lm("runs/tiny")                                 # native run dir, tag dir, or HF dir
    report = perplexity(lm, documents, seq_len=128, stride=64)
    texts = generate_texts(lm, ["Once upon a time"], GenerationConfig(max_new_tokens=32))
    report = bleu_eval(lm, pairs, GenerationConfig(max_new_tokens=32))

Modules: `loading` (checkpoint -> the training model + tokenizer, via bigllm.checkpoint),
`perplexity` (sliding-window NLL), `parallel` (the same in the checkpoint's tp x pp layout),
`generate` (batched decoding with megatron's KV cache), `bleu` (sacrebleu corpus BLEU/chrF), `cli`
(handlers of `bigllm evaluate` / `bigllm generate`; bigllm/commands stays argparse-only).
"""
