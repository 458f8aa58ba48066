"""Tokenization into megatron-core .bin/.idx shards, shard merging, and the training data stream.

Corpus files are read by `bigllm.corpus`, tokenizers are `bigllm.tokenizer`'s; both sit below this
package. Kept import-light (no torch, no megatron) so worker processes and the CLI start fast; the
heavy libraries are imported inside the functions that need them.
"""
