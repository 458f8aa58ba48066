"""Checkpoint tools: consolidate any tp/pp layout, reshard, and convert to/from Hugging Face Llama.

    bigllm convert consolidate --checkpoint RUN_DIR --output OUT
    bigllm convert to-hf --checkpoint RUN_DIR --output HF_DIR
    bigllm convert from-hf --input HF_DIR --output RUN_DIR [--tp N --pp M]
    bigllm convert reshard --checkpoint RUN_DIR --tp N --pp M --output OUT

The commands only: reading and writing checkpoints is `bigllm.checkpoint`'s, the tensor names,
tp split rules and the Hugging Face mapping are beside the model (`bigllm.model.structure`,
`bigllm.model.hf_adapter`). Every command writes a new directory (beside the target, then
renamed) and refuses an existing, non-empty --output unless --overwrite.
"""
