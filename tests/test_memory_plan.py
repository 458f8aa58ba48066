"""`bigllm plan`'s memory parts against what a real training step holds, on the CPU.

Activations: one forward (and, with recompute, the backward that replays each block) runs under
torch's `saved_tensors_hooks`, which see every tensor autograd keeps for backward. The bytes
counted are those of the distinct storages kept (a view keeps its whole storage alive: v, a
view of linear_qkv's output, keeps all of it), each counted once, in the segment of the step
that first saved it (blocks, final norm, head and loss). Parameters are weights, not activations:
storages of the model's parameters are left out. Every counted tensor is held until the count
ends, so that a freed storage's address cannot be taken for a new one's. The model runs in bf16 as
DeepSpeed's engine runs it (parameters cast to bf16, no autocast); the kernels are the CPU's
(torch's composite RMSNorm, SDPA's flash kernel for CPU), which the plan is asked for with
device="cpu".

Gradients, optimizer and the update: a real DeepSpeed engine (bf16, ZeRO-1: BF16_Optimizer;
ZeRO-2: its reduce buckets) and torch's AdamW kernels, with the allocations of a call read from
torch's profiler (`profile_memory`: every allocation and free on the CPU allocator).

One torchrun launch (2 gloo processes) measures every case: tp = 2 with sequence parallelism and
cp = 2 need two ranks; the single-rank cases run on each rank (dp = 2) and rank 0's counts are
kept. The measured model is small but per-layer activations dominate its fixed overheads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train_utils import ROOT, clean_env

pytestmark = pytest.mark.slow

MODEL = {"model.hidden_size": 256, "model.num_layers": 4, "model.num_attention_heads": 4, "model.num_kv_heads": 2,
         "model.ffn_hidden_size": 704, "model.seq_length": 256, "model.vocab_size": 512,
         "train.micro_batch_size": 2, "train.global_batch_size": 4, "train.precision": "bf16",
         "parallel.zero_stage": 1, "train.fusion": "eager", "parallel.pp": 1}
ENGINE = {"model.num_layers": 2, "model.seq_length": 64}  # small: only parameter counts matter there
ENGINE_CASES = {"bf16_zero0": {**ENGINE, "parallel.zero_stage": 0}, "bf16_zero1": ENGINE,
                "bf16_zero2": {**ENGINE, "parallel.zero_stage": 2}}
ACTIVATION_CASES = {
    "eager": {},
    "recompute": {"model.activation_checkpointing": "true"},
    "sequence_parallel": {"parallel.tp": 2, "parallel.sequence_parallel": "true"},
    "context_parallel": {"parallel.cp": 2},
    "qk_norm": {"model.qk_norm": "true"},  # Qwen3's per-head norms of q and k
    "compiled": {"train.fusion": "compile"},  # train.fusion's torch.compile of each layer (rank 0 only)
}
# The issue asks for the plan within 10%; on these kernels it is within 1.5%, so a term that drifts
# by its own size (SwiGLU's, a norm's) fails here.
TOLERANCE = 0.05


def run_config(extra: dict | None = None):
    from bigllm.config import RunConfig
    from bigllm.config_loader import load_config

    values = {**MODEL, **(extra or {})}
    return load_config(RunConfig, None, [f"{k}={v}" for k, v in values.items()])


# ----- the worker (run under torchrun) --------------------------------------------------------
class SavedBytes:
    """Counts the distinct storages autograd saves, per segment of the step (see the docstring)."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: dict[int, tuple[str, int, object]] = {}
        self.where = "embedding"

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if storage.nbytes() and ptr not in self.params and ptr not in self.seen:
            self.seen[ptr] = (self.where, storage.nbytes(), tensor)  # held: no address reuse
        return tensor

    def by_segment(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for where, nbytes, _ in self.seen.values():
            out[where] = out.get(where, 0) + nbytes
        return out


def measure_activations(cfg, ctx, compiled: bool) -> dict:
    """{"activations", "logits_kept"} bytes this rank keeps for one micro-batch's backward."""
    import torch

    from bigllm.model.build import CausalLM, compile_blocks
    from bigllm.model.llama import lm_loss

    m, p, t = cfg.model, cfg.parallel, cfg.train
    model = CausalLM(m, m.vocab_size, p.tp, t.precision, t.seed, p.sequence_parallel)
    for param in model.parameters():  # what DeepSpeed's bf16 engine does (parameters only)
        param.data = param.data.to(torch.bfloat16)
    if compiled:  # train.fusion's compile, with inductor's partitioner (what backward keeps) but no codegen
        compile_module = torch.nn.Module.compile
        torch.nn.Module.compile = lambda self, **kw: compile_module(self, backend="aot_eager_decomp_partition", **kw)
        try:
            compile_blocks(model, m.dropout)
        finally:
            torch.nn.Module.compile = compile_module
    counter = SavedBytes(model)
    phase = ["forward"]

    def enter(name):
        return lambda module, args: setattr(counter, "where", f"{phase[0]}:{name}")

    for i, block in enumerate(model.blocks):
        # the layer, which recompute replays; a compiled layer's hooks would run inside its graph
        (block if compiled else block.layer).register_forward_pre_hook(enter(f"block{i}"))
    model.final_norm.register_forward_pre_hook(enter("final_norm"))
    model.head.register_forward_pre_hook(enter("head_loss"))
    b, s, cp = t.micro_batch_size, m.seq_length, p.cp
    tokens = torch.randint(0, m.vocab_size, (b, s + 1), generator=torch.Generator().manual_seed(0))
    first = ctx.cp_rank * s // cp  # a cp rank holds s/cp consecutive positions
    inputs, labels = tokens[:, first:first + s // cp], tokens[:, first + 1:first + 1 + s // cp]
    for _ in range(2 if compiled else 1):  # a compiled layer's first call compiles it
        counter.seen.clear()
        phase[0], counter.where = "forward", "embedding"
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda x: x):
            loss = lm_loss(model(inputs), labels, torch.ones(b, s // cp))
            phase[0] = "backward"  # only recompute saves anything during backward
            loss.backward()
    parts = counter.by_segment()
    recomputed = [v for k, v in parts.items() if k.startswith("backward:block")]
    forward = sum(v for k, v in parts.items() if k.startswith("forward:") or k == "embedding")
    logits = parts.get("forward:head_loss", 0)
    return {"activations": forward - logits + max(recomputed, default=0), "logits_kept": logits}


def memory_timeline(fn) -> tuple[object, int]:
    """(fn's result, the peak of the CPU allocator's bytes above their level at the call)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    level = peak = 0
    for event in events:
        level += event.nbytes()
        peak = max(peak, level)
    return out, peak


def measure_logits_peak(cfg) -> int:
    """The allocator's peak above its level during the head's and the loss's forward and backward
    (bf16, from a final hidden state that exists already; the head's weight gradient left out)."""
    import torch

    from bigllm.model.build import CausalLM
    from bigllm.model.llama import lm_loss

    m, t = cfg.model, cfg.train
    model = CausalLM(m, m.vocab_size, 1, t.precision, t.seed)
    model.head.requires_grad_(False)
    model.head.to(torch.bfloat16)
    b, s = t.micro_batch_size, m.seq_length
    hidden = torch.randn(s, b, m.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, m.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
    return memory_timeline(lambda: lm_loss(model.logits(hidden), labels, torch.ones(b, s)).backward())[1]


def measure_engine(cfg, ctx) -> dict:
    """A real DeepSpeed engine's gradient, optimizer and update bytes on this rank."""
    import torch
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    from bigllm.model.build import build_model
    from bigllm.parallel.context import MegatronMPU
    from bigllm.train.engine import build_engine

    m, t = cfg.model, cfg.train
    model = build_model(m, m.vocab_size, ctx.dims, t.precision, t.seed, cfg.parallel.sequence_parallel)
    engine = build_engine(cfg, model, ctx.dims, mpu=MegatronMPU())
    optimizer = engine.optimizer
    buckets = []
    if hasattr(optimizer, "ipg_buckets"):  # ZeRO's reduce buckets, as DeepSpeed allocates them
        setup = optimizer.setup_buckets

        def spy():
            setup()
            buckets[:] = [buf.numel() * buf.element_size() for bucket in optimizer.ipg_buckets.values()
                          for buf in bucket.buffer]

        optimizer.setup_buckets = spy
    b, s = t.micro_batch_size, m.seq_length
    tokens = torch.randint(0, m.vocab_size, (b, s + 1), generator=torch.Generator().manual_seed(ctx.rank))
    out = {"params": sum(p.numel() for p in model.parameters()), "buckets": buckets,
           "largest_param": max(p.numel() for p in model.parameters())}
    bf16 = isinstance(optimizer, BF16_Optimizer)
    steps = 0 if cfg.parallel.zero_stage == 2 else 2  # ZeRO-2: only its buckets, which live in backward
    for step in range(max(steps, 1)):  # the first step creates AdamW's moments: measure the second
        engine.backward(engine(tokens[:, :-1], tokens[:, 1:], torch.ones(b, s)))
        if step == 1:
            if bf16:
                out["weights"] = sum(f.numel() * f.element_size() for f in optimizer.bf16_groups_flat)
                out["lp_grads"] = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
                out["fp32_grads"] = sum(g.numel() * g.element_size() for g in optimizer.fp32_groups_gradients_flat)
            _, out["allreduce_peak"] = memory_timeline(engine.allreduce_gradients)  # again: measured alone
            _, out["step_peak"] = memory_timeline(engine.step)
            if bf16:  # AdamW's moments and the fp32 masters of this rank's partition
                out["optimizer"] = sum(v.numel() * v.element_size() for state in optimizer.optimizer.state.values()
                                       for k, v in state.items() if k != "step")
                out["optimizer"] += sum(f.numel() * f.element_size() for f in optimizer.fp32_groups_flat_partition)
        elif steps:
            engine.step()
    return out


def measure_adamw() -> dict:
    """The allocations of a torch AdamW step over one flat fp32 tensor, by kernel."""
    import torch

    out = {}
    for name, kwargs in {"fused": {"fused": True}, "foreach": {"foreach": True}}.items():
        flat = torch.nn.Parameter(torch.zeros(1_000_000))
        flat.grad = torch.ones_like(flat)
        opt = torch.optim.AdamW([flat], lr=1e-3, **kwargs)
        opt.step()  # creates the moments
        _, out[name] = memory_timeline(opt.step)
    return out


def worker(out_path: str) -> None:
    import torch

    from bigllm.parallel.context import init_parallel

    torch.set_num_threads(1)
    results: dict = {"activations": {}, "seconds": {}}

    def setup(cfg):
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        return init_parallel(cfg.parallel, cfg.train.seed)

    for name, extra in ACTIVATION_CASES.items():
        cfg = run_config(extra)
        ctx = setup(cfg)
        if name == "compiled" and ctx.rank != 0:
            continue  # each rank would compile the same layer: one is enough
        start = time.perf_counter()
        results["activations"][name] = measure_activations(cfg, ctx, compiled=name == "compiled")
        results["seconds"][name] = time.perf_counter() - start
    if ctx.rank == 0:
        results["logits_peak"] = measure_logits_peak(run_config())
    torch.distributed.barrier()
    for name, extra in ENGINE_CASES.items():
        cfg = run_config(extra)
        start = time.perf_counter()
        results[name] = measure_engine(cfg, setup(cfg))
        results["seconds"][name] = time.perf_counter() - start
    if torch.distributed.get_rank() == 0:
        results["adamw"] = measure_adamw()
        Path(out_path).write_text(json.dumps(results))


# ----- the tests -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("memory") / "measured.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__, str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def plan_activations(cfg) -> dict:
    """The plan's activations and kept logits for one micro-batch of `cfg` on the CPU (pp = 1)."""
    from bigllm.model import structure
    from bigllm.plan import logits_loss_bytes, stage_activations

    m, t, p = cfg.model, cfg.train, cfg.parallel
    tokens = t.micro_batch_size * m.seq_length // p.cp
    acts = stage_activations(cfg, structure.stage_layers(m, 1, 0), 1, True, m.vocab_size, device="cpu")
    return {"activations": acts["activations"], "logits_kept": logits_loss_bytes(cfg, tokens, m.vocab_size)[0]}


@pytest.mark.parametrize("case", sorted(ACTIVATION_CASES))
def test_plan_activations_match_what_backward_keeps(case, measured):
    got, planned = measured["activations"][case], plan_activations(run_config(ACTIVATION_CASES[case]))
    for part in ("activations", "logits_kept"):
        assert planned[part] == pytest.approx(got[part], rel=TOLERANCE), (case, part, got, planned)


def test_logits_and_loss_peak(measured):
    """While the loss runs, the bf16 logits (and in backward their gradient) live beside the fp32
    copy that megatron's cross-entropy works on in place: 6 bytes per logit, not 10."""
    from bigllm.plan import logits_loss_bytes

    cfg = run_config()
    tokens = cfg.train.micro_batch_size * cfg.model.seq_length
    kept, beside = logits_loss_bytes(cfg, tokens, cfg.model.vocab_size)
    head_input = tokens * cfg.model.hidden_size * 2  # allocated before the head runs
    assert kept + beside - head_input == pytest.approx(measured["logits_peak"], rel=TOLERANCE)


def test_bf16_optimizer_gradients_and_update_match_deepspeed(measured):
    """bf16 at ZeRO-1 (DeepSpeed's BF16_Optimizer, dp = 2): the bf16 param.grad and the fp32 flat
    gradients of every parameter, AdamW's moments and fp32 masters on 1/dp, the all-reduce's
    flattened copy, and the step's temporary (torch's for-loop AdamW on the CPU: sqrt and division
    of the flat partition)."""
    from bigllm.plan import adamw_step_bytes, allreduce_copy_bytes, state_bytes

    got, cfg = measured["bf16_zero1"], run_config(ENGINE_CASES["bf16_zero1"])
    groups = [(got["params"], 2)]
    planned = state_bytes(cfg, groups, 0, device="cpu")
    for part in ("weights", "optimizer"):  # DeepSpeed pads its flat groups to a multiple of 2 x dp
        assert planned[part] == pytest.approx(got[part], rel=0.01), part
    assert planned["gradients"] == pytest.approx(got["lp_grads"] + got["fp32_grads"], rel=0.01)
    assert planned["buffers"] == 0  # no ZeRO buckets: BF16_Optimizer all-reduces after backward
    assert allreduce_copy_bytes(cfg, groups) == pytest.approx(got["allreduce_peak"], rel=0.02)
    stepped = got["params"] // 2
    assert adamw_step_bytes(cfg, stepped, stepped, device="cpu") == pytest.approx(got["step_peak"], rel=0.02)
    assert planned["update"] == pytest.approx(max(got["allreduce_peak"], got["step_peak"]), rel=0.02)


def test_zero0_update_matches_deepspeed(measured):
    """bf16 at ZeRO-0 (DeepSpeed's FP16_UnfusedOptimizer): the engine's all-reduce flattens the bf16
    gradients; the step gives the fp32 masters fp32 copies of them, beside AdamW's temporaries."""
    from bigllm.plan import allreduce_copy_bytes, state_bytes

    got, cfg = measured["bf16_zero0"], run_config(ENGINE_CASES["bf16_zero0"])
    groups = [(got["params"], 2)]
    assert allreduce_copy_bytes(cfg, groups) == pytest.approx(got["allreduce_peak"], rel=0.02)
    planned = state_bytes(cfg, groups, got["largest_param"], device="cpu")
    # (5% under here: DeepSpeed's own temporaries, norms and clipping, are not planned)
    assert planned["update"] == pytest.approx(max(got["allreduce_peak"], got["step_peak"]), rel=0.10)
    assert planned["buffers"] == 0


def test_zero2_reduce_buckets_match_deepspeed(measured):
    from bigllm.plan import state_bytes

    got, cfg = measured["bf16_zero2"], run_config(ENGINE_CASES["bf16_zero2"])
    assert len(got["buckets"]) == 2  # overlap_comm: two buffers
    assert state_bytes(cfg, [(got["params"], 2)], 1)["buffers"] == sum(got["buckets"])


def test_adamw_step_temporary_by_kernel(measured):
    """fused: none; foreach: a full fp32 copy (`_foreach_sqrt` of the second moments)."""
    from bigllm.plan import adamw_step_bytes

    for kernel, got in measured["adamw"].items():
        cfg = run_config({"optim.implementation": kernel})
        assert adamw_step_bytes(cfg, 1_000_000, 1_000_000, device="cpu") == pytest.approx(got, abs=1024), kernel


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    worker(sys.argv[1])
