"""Checkpoint tools: consolidate any tp/pp layout, reshard, and convert to/from Hugging Face Llama.

    bigllm convert consolidate --checkpoint RUN_DIR --output OUT
    bigllm convert to-hf --checkpoint RUN_DIR --output HF_DIR
    bigllm convert from-hf --input HF_DIR --output RUN_DIR [--tp N --pp M]
    bigllm convert reshard --checkpoint RUN_DIR --tp N --pp M --output OUT

`layout` names the canonical (tp = pp = 1) tensors and cuts them per rank; `source` reads
training checkpoints; `zero` gathers fp32 masters and AdamW moments from DeepSpeed's ZeRO-1/2/3
optimizer shards; `native` writes checkpoints DeepSpeed's engine loads; `hf` maps to and from
`transformers.LlamaForCausalLM`.
"""
