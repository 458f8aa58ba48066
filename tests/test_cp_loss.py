"""Context parallelism averages the loss over whole sequences, not per slice.

Two gloo processes form a cp group of 2 (megatron's parallel state). Each takes its slice of one
batch with the sampler's own `context_slice` and computes `lm_loss` on it; the loss and gradient
are then averaged over the two ranks, as DeepSpeed averages them over its dp x cp data-parallel
group. The slices have unequal loss-mask counts (1 scored position per sequence in the first
half, 8 in the second), so a per-slice mean (each rank dividing by its own count) gives another
number: the check can tell the two apart.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

B, S, V = 2, 16, 32


def _case() -> dict:
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(B, S)
    mask[:, 1:S // 2] = 0.0  # the first slice scores 1 position per sequence, the second S/2
    return {"logits": 3 * torch.randn(S, B, V, generator=gen), "labels": torch.randint(0, V, (B, S), generator=gen),
            "loss_mask": mask}


def _rank_main(rank: int, root: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist
    from megatron.core import parallel_state

    from bigllm.data.sampler import context_slice
    from bigllm.model.llama import lm_loss

    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(root, "store"), 2), rank=rank, world_size=2)
    try:
        parallel_state.initialize_model_parallel(context_parallel_size=2)
        case = _case()
        # the positions this rank holds, cut as training cuts a batch ([b, s] fields)
        positions = context_slice({"pos": torch.arange(S).expand(B, S)}, rank, 2)["pos"][0]
        part = context_slice({"labels": case["labels"], "loss_mask": case["loss_mask"]}, rank, 2)
        logits = case["logits"][positions].clone().requires_grad_()  # [s/2, b, v]
        loss = lm_loss(logits, part["labels"], part["loss_mask"])
        (loss / 2).backward()  # the mean over the 2 ranks, as DeepSpeed averages over its dp x cp group
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        torch.save({"loss": mean / 2, "grad": logits.grad, "positions": positions}, os.path.join(root, f"r{rank}.pt"))
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _token_nll(logits, labels):
    return torch.nn.functional.cross_entropy(logits.transpose(0, 1).reshape(-1, V), labels.reshape(-1),
                                             reduction="none").view(B, S)


@pytest.mark.slow
def test_context_parallel_loss_is_the_whole_sequences_mean(tmp_path):
    mp.spawn(_rank_main, args=(str(tmp_path),), nprocs=2, join=True)
    case = _case()
    logits = case["logits"].clone().requires_grad_()
    nll, mask = _token_nll(logits, case["labels"]), case["loss_mask"]
    whole = (nll * mask).sum() / mask.sum()  # torch's cross entropy, independent of bigllm's
    whole.backward()
    whole = float(whole.detach())
    halves = [slice(0, S // 2), slice(S // 2, S)]
    per_slice = float(sum((nll[:, h] * mask[:, h]).sum() / mask[:, h].sum() for h in halves).detach()) / 2
    assert abs(per_slice - whole) > 0.1  # the case tells the two means apart
    ranks = [torch.load(tmp_path / f"r{r}.pt") for r in range(2)]
    for r, got in enumerate(ranks):
        assert got["positions"].tolist() == list(range(S))[halves[r]]
        assert float(got["loss"]) == pytest.approx(whole, abs=1e-6)
        torch.testing.assert_close(got["grad"], logits.grad[halves[r]], atol=1e-7, rtol=1e-6)
