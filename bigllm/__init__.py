"""bigllm: distributed multi-node LLM pretraining on DeepSpeed and megatron-core.

Kept import-light on purpose: `bigllm --help` must not import torch or deepspeed.
"""

__version__ = "0.1.0"
