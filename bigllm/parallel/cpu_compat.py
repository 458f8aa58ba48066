"""CPU-only workarounds, in one place, applied only when CUDA is absent.

megatron-core and DeepSpeed assume CUDA in a few spots (see ../shared/NOTES-CPU.md). On a
machine without CUDA (CI, laptops) `apply()` makes the same training code run on gloo:

- `torch.cuda.current_device()` returns "cpu" (megatron allocates buffers on it);
- megatron's CUDA RNG-states tracker is replaced by one that keeps CPU generator states, and its
  `_get/_set_cuda_rng_state` (used by activation recompute) point at the CPU generator;
- DeepSpeed's shared-memory comm op, JIT-compiled at init (~47 s), is skipped: gloo needs none.

On a CUDA machine `apply()` does nothing.
"""

from __future__ import annotations

import contextlib
import importlib
import os

import torch

_APPLIED = False


def cuda_absent() -> bool:
    return not torch.cuda.is_available()


def apply() -> None:
    """Install the CPU workarounds once per process; a no-op when CUDA is present."""
    global _APPLIED
    if _APPLIED or not cuda_absent():
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.cuda.current_device = lambda: "cpu"  # megatron passes it as `device=`
    _install_cpu_rng_tracker()
    _skip_deepspeed_shm_build()
    _APPLIED = True


def _install_cpu_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """megatron's named RNG states (model-parallel dropout streams) on the CPU generator."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_ or name in self.states_:
                raise RuntimeError(f"RNG state {name!r} / seed {seed} already exists")
            self.seeds_.add(seed)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.states_[name] = torch.get_rng_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise RuntimeError(f"RNG state {name!r} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Activation recompute saves/restores "the CUDA RNG" around the forward replay.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _skip_deepspeed_shm_build() -> None:
    # `deepspeed.comm.torch` the attribute is the torch module; import the submodule by name.
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    if hasattr(ds_torch_comm, "build_shm_op"):
        ds_torch_comm.build_shm_op = lambda: None
