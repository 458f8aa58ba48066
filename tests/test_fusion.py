"""train.fusion: the compiled decoder layers train as eager ones do, write the same checkpoints, and
fall back to eager where torch.compile cannot run.

Three one-process runs of the tiny config (fp32, 6 steps, checkpoints at steps 3 and 6), shared by
the tests: eager (train.fusion=eager), compiled (train.fusion=compile: on the CPU, inductor's C++
kernels), and the compiled run resumed from its step 3 with fusion asked for on a machine where
torch.compile cannot run (no C++ compiler: CXX points nowhere, and an empty inductor cache so that
nothing compiled earlier is reused), which must train eager and say why. One in-process check:
with dropout and activation recompute the compiled layer draws eager's masks.
"""

from __future__ import annotations

import pytest

from train_utils import PARITY, PARITY_STEPS, base_overrides, cut_back, parity_record, run_ok

pytestmark = pytest.mark.slow
ATOL = 1e-5  # losses: float reassociation in the fused kernels, as across layouts (test_train_parity)
NORM_RTOL = 1e-4


def _run(tokenizer_dir, shard_prefix, run_dir, fusion: str, env_extra=None):
    """(stdout, step -> loss and grad norm); no validation data, so no second (no-grad) compile.
    With `env_extra` (inductor reads CXX and its cache dir when imported) in a fresh interpreter."""
    proc = run_ok(1, base_overrides(tokenizer_dir, shard_prefix, run_dir, **PARITY, **{
        "train.fusion": fusion, "train.save_interval": 3, "data.split": "100,0,0"}), env_extra=env_extra,
        fresh=env_extra is not None)
    return proc.stdout, parity_record(run_dir)


def _runtime(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if "runtime:" in line)


@pytest.fixture(scope="module")
def runs(tokenizer_dir, shard_prefix, tmp_path_factory):
    """{"eager" | "compiled" | "fallback": (stdout, step -> loss and grad norm, run dir)}."""
    base = tmp_path_factory.mktemp("fusion")
    out = {}
    for name, fusion in (("eager", "eager"), ("compiled", "compile")):
        out[name] = (*_run(tokenizer_dir, shard_prefix, base / name, fusion), base / name)
    resumed = cut_back(base / "compiled", base / "fallback", 3)
    no_compiler = {"CXX": str(base / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(base / "inductor-cache")}
    out["fallback"] = (*_run(tokenizer_dir, shard_prefix, resumed, "compile", no_compiler), resumed)
    return out


def _assert_same(got: dict, want: dict, steps):
    for step in steps:
        assert abs(got[step]["loss"] - want[step]["loss"]) <= ATOL, (step, got[step], want[step])
        assert abs(got[step]["grad_norm"] - want[step]["grad_norm"]) <= NORM_RTOL * want[step]["grad_norm"], step


def test_compiled_training_equals_eager(runs):
    stdout, record, _ = runs["compiled"]
    assert "fusion: torch.compile per decoder layer (4 of this rank's 4 layers)" in _runtime(stdout), stdout
    assert "fusion off (eager: train.fusion=eager)" in _runtime(runs["eager"][0])
    assert sorted(record) == list(range(1, PARITY_STEPS + 1))
    _assert_same(record, runs["eager"][1], record)


def test_checkpoints_keep_their_keys_and_resume(runs):
    """nn.Module.compile leaves the state-dict keys alone (no `_orig_mod.`): the compiled run's
    checkpoint has the eager one's tensors under the same names, and an eager run resumes it."""
    import torch

    def module_keys(run_dir):
        path = run_dir / "checkpoints" / "step_0000006" / "mp_rank_00_model_states.pt"
        return sorted(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["module"])

    assert module_keys(runs["compiled"][2]) == module_keys(runs["eager"][2])
    stdout, record, _ = runs["fallback"]
    assert "from step 3 to 6" in stdout  # resumed (DeepSpeed loads the module's keys strictly)
    _assert_same(record, runs["eager"][1], [4, 5, 6])


def test_without_a_compiler_training_runs_eager_and_says_why(runs):
    runtime = _runtime(runs["fallback"][0])
    assert "fusion off (eager: torch.compile does not run on cpu here: " in runtime, runtime
    assert "InvalidCxxCompiler" in runtime or "compiler" in runtime.lower(), runtime


@pytest.fixture
def one_process():
    from bigllm.evaluate.loading import init_single_process
    from bigllm.parallel.context import destroy_parallel

    init_single_process()
    yield
    destroy_parallel()


def _loss_and_grads(compiled: bool):
    """Two forward/backward passes of a 2-layer model with dropout and recompute, from fixed seeds."""
    import torch
    from megatron.core import tensor_parallel

    from bigllm.config import ModelConfig
    from bigllm.model.build import CausalLM, compile_blocks

    cfg = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=128,
                      seq_length=32, dropout=0.1, activation_checkpointing=True)
    model = CausalLM(cfg, 128, tp=1, precision="fp32", seed=1).train()
    if compiled:
        assert compile_blocks(model, cfg.dropout) == (2, 2)
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    torch.manual_seed(7)
    tokens = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(0))
    results = []
    for _ in range(2):  # the second pass draws other masks from the advanced streams
        loss = model(tokens[:, :-1], tokens[:, 1:], torch.ones(2, 32))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    return results


def test_compiled_dropout_draws_eager_masks_under_recompute(one_process):
    """Random ops in the compiled layer are eager's (inductor's fallback_random), drawn inside
    megatron's RNG tracker: the same masks as eager, replayed by recompute."""
    import torch

    for (loss_e, grads_e), (loss_c, grads_c) in zip(_loss_and_grads(False), _loss_and_grads(True)):
        torch.testing.assert_close(loss_c, loss_e, atol=ATOL, rtol=0)
        for g_c, g_e in zip(grads_c, grads_e):
            torch.testing.assert_close(g_c, g_e, atol=1e-5, rtol=1e-4)
