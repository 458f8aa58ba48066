"""What reaches the console: bigllm's own lines, without the third-party notices that bury them.

Each filter below names one notice, by its text and the module that raises it, and why it says
nothing to a bigllm user; Python's warnings stay on for everything else. `bigllm --verbose ...`
or BIGLLM_LOG=debug installs none of them. The test suite installs the same filters
(tests/conftest.py), so its warning summary lists only what is left.
"""

from __future__ import annotations

import os
import warnings

# (category, message regex, module regex of where it is raised, why it is noise)
NOTICES = (
    (UserWarning, r"Transformer Engine and Apex are not installed", r"megatron\.core",
     "bigllm runs torch's SDPA, norms and optimizers by design; megatron-core says so once per module"),
    (UserWarning, r"full scope is deprecated", r"megatron\.core\.transformer\.transformer_config",
     "megatron-core's own default for cuda_graph_scope, which bigllm does not set"),
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
     r"torch\.distributed",
     "raised by torch for DeepSpeed's collective calls, once per process"),
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated", r"torch\.jit",
     "from a dependency's import, not from bigllm's code"),
    (DeprecationWarning, r"The following imports from `dynamic_context\.py` will be removed", r"megatron\.core",
     "megatron-core's import of its own inference module"),
    (DeprecationWarning, r"Warning. tp_group is None, using default", r"megatron\.core",
     "bigllm's layers use megatron-core's default tp group (parallel_state) by design, on every call"),
    (DeprecationWarning, r"MLP requires ffn_hidden_size", r"megatron\.core\.transformer\.spec_utils",
     "megatron-core's own spec building; bigllm sets ffn_hidden_size in the config it passes"),
)


def verbose(environ=os.environ) -> bool:
    return environ.get("BIGLLM_LOG", "").lower() == "debug"


def quiet_third_party(environ=os.environ) -> None:
    """Install the filters (unless BIGLLM_LOG=debug); before the libraries are imported."""
    if verbose(environ):
        return
    for category, message, module, _why in NOTICES:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
