"""Corpus readers, tokenization into megatron-core .bin/.idx shards, and shard merging.

Kept import-light (no torch, no megatron) so worker processes and the CLI start fast; the
heavy libraries are imported inside the functions that need them.
"""
