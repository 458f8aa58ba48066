"""A shard's .bin and .idx checked against each other before megatron-core opens them.

megatron-core's `IndexedDataset` memory-maps both files and trusts them: a truncated .idx ends in
numpy's "buffer is smaller than requested size", a truncated .bin in a read past the end, much
later. `check_shard` reads the .idx header (megatron's `_IndexWriter` layout: magic, version,
dtype code, sequence and document counts, then int32 lengths, int64 pointers, int64 document
indices) and checks that both files are exactly as long as the index says.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from bigllm.errors import DataError

_MAGIC = b"MMIDIDX\x00\x00"
_FIXED = len(_MAGIC) + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count
_FIX = "re-run `bigllm preprocess --output-prefix {prefix} --overwrite`"


@dataclass(frozen=True)
class ShardInfo:
    sequences: int
    documents: int
    tokens: int
    dtype_size: int


def check_shard(prefix: str | Path) -> ShardInfo:
    """The shard's counts, or a DataError naming the file that is missing, truncated or inconsistent."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import DType

    prefix = str(prefix)
    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    fix = _FIX.format(prefix=prefix)
    for path in (bin_, idx):
        if not path.is_file():
            raise DataError(f"data prefix '{prefix}': {path} does not exist; make it with `bigllm preprocess "
                            "--output-prefix PREFIX`")
    size = idx.stat().st_size
    with open(idx, "rb") as f:
        head = f.read(_FIXED)
        if len(head) < _FIXED or not head.startswith(_MAGIC):
            raise DataError(f"{idx} is not a megatron-core index (no header, {size} bytes); {fix}")
        version, code, sequences, documents = struct.unpack("<QBQQ", head[len(_MAGIC):])
        try:
            itemsize = np.dtype(DType.dtype_from_code(code)).itemsize
        except (KeyError, ValueError):
            raise DataError(f"{idx} names an unknown token dtype (code {code}); {fix}") from None
        expected = _FIXED + 4 * sequences + 8 * sequences + 8 * documents
        if version != 1 or size < expected or size > expected + sequences:  # + optional int8 modes
            raise DataError(f"{idx} is truncated or damaged: {size} bytes where its header ({sequences} sequences, "
                            f"{documents} documents) needs {expected}; {fix}")
        lengths = np.frombuffer(f.read(4 * sequences), dtype=np.int32)
        pointers = np.frombuffer(f.read(8 * sequences), dtype=np.int64)
    tokens = int(lengths.sum(dtype=np.int64))
    end = int(pointers[-1]) + int(lengths[-1]) * itemsize if sequences else 0
    if sequences and (lengths.min() < 0 or end != tokens * itemsize):
        raise DataError(f"{idx} is inconsistent (its pointers do not follow its lengths); {fix}")
    if bin_.stat().st_size != tokens * itemsize:
        raise DataError(f"{bin_} has {bin_.stat().st_size} bytes but {idx} indexes {tokens} tokens of {itemsize} "
                        f"bytes ({tokens * itemsize}): the two files do not belong together or one is truncated; {fix}")
    return ShardInfo(sequences=sequences, documents=documents, tokens=tokens, dtype_size=itemsize)
