"""The run's state on disk, in one package: it writes, verifies and reads bigllm checkpoints.

    format      the layout of RUN_DIR/checkpoints/, CheckpointMeta (meta.json), manifests, `latest`
    files       weights-only reading of every checkpoint file (never unpickling objects)
    engine_io   save / resume through DeepSpeed's engine (training)
    checkpoint  Checkpoint, HFModel, Consolidated and `open_checkpoint`: any path -> canonical tensors
    zero        fp32 masters and AdamW moments out of DeepSpeed's ZeRO-1/2/3 optimizer shards
    write       a run dir for a chosen layout (what `convert reshard` / `from-hf` write), atomically

The model's structure (names, tp split rules, pipeline placement) is `bigllm.model.structure`'s;
this package only knows where those tensors lie in files.
"""

from bigllm.checkpoint.checkpoint import (Checkpoint, Consolidated, HFModel, open_checkpoint, open_native,
                                          run_config_from_dict, write_consolidated)
from bigllm.checkpoint.format import (CheckpointMeta, Layout, checkpoint_root, find_resumable, tag_for,
                                      verify)

__all__ = ["Checkpoint", "CheckpointMeta", "Consolidated", "HFModel", "Layout", "checkpoint_root",
           "find_resumable", "open_checkpoint", "open_native", "run_config_from_dict", "tag_for", "verify",
           "write_consolidated"]
