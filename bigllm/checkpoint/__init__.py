"""The run's state on disk, in one package: it writes, verifies and reads bigllm checkpoints.

    format        the layout of RUN_DIR/checkpoints/ and DeepSpeed's file names in it, CheckpointMeta
                  (meta.json), manifests, `latest`
    files         weights-only, memory-mapped reading of every checkpoint file (never unpickling
                  objects); the checkpoint engine DeepSpeed's engine saves and loads through
    resolve       `open_checkpoint`: what a path is (native, Hugging Face, consolidated)
    native        Checkpoint: a native checkpoint as canonical tensors, and a rank's share of it
    hf            HFModel: a Hugging Face directory as canonical tensors
    consolidated  what `bigllm convert consolidate` writes and reads
    zero          fp32 masters and AdamW moments out of DeepSpeed's ZeRO-1/2/3 optimizer shards
    engine_io     save / resume through DeepSpeed's engine (training), synchronous or asynchronous
    elastic       resume at another layout: each rank reads its own share
    write         a run dir for a chosen layout (what `convert reshard` / `from-hf` write), atomically

The model's structure (names, tp split rules, pipeline placement) is `bigllm.model.structure`'s;
this package only knows where those tensors lie in files.
"""

from bigllm.checkpoint.consolidated import Consolidated, write_consolidated
from bigllm.checkpoint.format import (CheckpointMeta, Layout, checkpoint_root, find_resumable, run_config_from_dict,
                                      tag_for, verify)
from bigllm.checkpoint.hf import HFModel
from bigllm.checkpoint.native import Checkpoint
from bigllm.checkpoint.resolve import open_checkpoint, open_native

__all__ = ["Checkpoint", "CheckpointMeta", "Consolidated", "HFModel", "Layout", "checkpoint_root",
           "find_resumable", "open_checkpoint", "open_native", "run_config_from_dict", "tag_for", "verify",
           "write_consolidated"]
