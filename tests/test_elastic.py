"""Elastic resume: `bigllm train` on a run dir whose checkpoint was written at another layout
(tp, pp, dp, ZeRO stage) loads each rank's share from the source shards and goes on with the
losses of the original layout (fp32, dropout 0, within 1e-5), reading exactly the samples the
original run read next (checked by the sample indices each rank traces)."""

from __future__ import annotations

import json

import pytest

from train_utils import TINY, bigllm_cli, cut_back, run_ok, small_overrides, torchrun, train_losses

pytestmark = pytest.mark.slow

STEPS, CUT = 5, 2  # the source saves at CUT and trains on to STEPS; every target resumes at CUT
# (three resumed steps: the third loss is the first that sees a learning rate the resumed schedule computed)
GLOBAL = 4  # small_overrides' global batch


def _overrides(small_data, run_dir, tp, pp, zero, **extra):
    return small_overrides(*small_data, run_dir, tp, pp, steps=STEPS, **{
        "parallel.zero_stage": zero, "train.save_interval": 1, "train.keep_last": 0, "optim.warmup_steps": 1,
        **extra})


@pytest.fixture(scope="module")
def source(small_data, tmp_path_factory):
    """source(tp, pp, dp, zero, **extra) -> a run dir trained uninterrupted to STEPS in that layout
    (with `extra` overrides), saving every step."""
    made = {}

    def get(tp, pp, dp, zero, **extra):
        key = (tp, pp, dp, zero, *sorted(extra.items()))
        if key not in made:
            run_dir = tmp_path_factory.mktemp(f"src_tp{tp}pp{pp}dp{dp}z{zero}")
            run_ok(tp * pp * dp, _overrides(small_data, run_dir, tp, pp, zero, **extra),
                   env_extra={"BIGLLM_TRACE_SAMPLES": "1"})
            made[key] = run_dir
        return made[key]

    return get


def traced(run_dir) -> list[list[int]]:
    """Each rank's traced sample indices, in reading order."""
    return [[i for line in p.read_text().splitlines() for i in json.loads(line)]
            for p in sorted(run_dir.glob("samples_rank*.jsonl"))]


def resume(small_data, run_dir, tp, pp, dp, zero, stops: bool = False, **extra):
    """Relaunch at the layout; `stops`: the run saves and stops early (torchrun reports a rank's
    exit 3 as its own failure, so status.json says how it ended)."""
    proc = torchrun(tp * pp * dp, _overrides(small_data, run_dir, tp, pp, zero, **extra),
                    env_extra={"BIGLLM_TRACE_SAMPLES": "1"})
    state = json.loads((run_dir / "status.json").read_text())["state"] if (run_dir / "status.json").exists() else None
    assert (proc.returncode != 0, state) == (stops, "requeue" if stops else "finished"), \
        f"exit {proc.returncode}, {state}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


def assert_continues(run_dir, reference, first: int, last: int = STEPS):
    got, want = train_losses(run_dir), train_losses(reference)
    assert sorted(s for s in got if s > first) == list(range(first + 1, last + 1)), got
    for step in range(first + 1, last + 1):
        assert abs(got[step] - want[step]) <= 1e-5, (step, got[step], want[step])
    # The data position: every sample of steps first+1..last read once, none of any other step.
    per_rank = traced(run_dir)
    read = {i for rank in per_rank for i in rank}
    assert read == set(range(first * GLOBAL, last * GLOBAL)), sorted(read)
    assert all(len(rank) == len(set(rank)) for rank in per_rank)


# (dp 2 -> 1 at ZeRO-0 is no case: ZeRO-0's files do not depend on dp, so it is a plain resume,
# which tests/test_train_parity.py's exact-resume tests cover.)
CASES = {  # id: (source tp, pp, dp, zero) -> (target tp, pp, dp, zero)
    "dp2-to-1-zero1": ((1, 1, 2, 1), (1, 1, 1, 1)),
    "dp1-to-2-zero1": ((1, 1, 1, 1), (1, 1, 2, 1)),
    "dp2-to-1-zero2": ((1, 1, 2, 2), (1, 1, 1, 2)),
    "dp2-to-4-zero2": ((1, 1, 2, 2), (1, 1, 4, 2)),  # micro batch 1: 4 samples over 4 ranks
    "dp2-to-1-zero3": ((1, 1, 2, 3), (1, 1, 1, 3)),
    "tp2-to-1": ((2, 1, 1, 0), (1, 1, 1, 0)),
    "pp1-to-2-zero0-to-1": ((2, 1, 1, 0), (1, 2, 1, 1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resumes_at_another_layout_with_the_same_losses(case, small_data, source, tmp_path):
    (s_tp, s_pp, s_dp, s_zero), (tp, pp, dp, zero) = CASES[case]
    reference = source(s_tp, s_pp, s_dp, s_zero)
    run_dir = cut_back(reference, tmp_path / "run", CUT)
    out = resume(small_data, run_dir, tp, pp, dp, zero, **({"train.micro_batch_size": 1} if dp == 4 else {}))
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{CUT:07d}'} at step {CUT}" in out, out[-3000:]
    if (s_tp, s_pp, s_zero) != (tp, pp, zero) or (s_dp != dp and s_zero):
        assert f"resharded from tp={s_tp} pp={s_pp} dp={s_dp} ZeRO-{s_zero} to tp={tp} pp={pp} dp={dp} " \
               f"ZeRO-{zero}" in out, out[-3000:]
    assert_continues(run_dir, reference, CUT)


def test_tp2xpp2_to_two_processes_then_one(small_data, source, tmp_path):
    """The acceptance chain: TP2xPP2 on 4 processes -> tp1 pp1 dp2 -> one process, no command in
    between, each hop continuing the 4-process run's losses."""
    reference = source(2, 2, 1, 1)
    run_dir = cut_back(reference, tmp_path / "run", CUT)
    resume(small_data, run_dir, 1, 1, 2, 1, stops=True, **{"train.exit_interval": 1})  # CUT -> CUT + 1, stop
    assert_continues(run_dir, reference, CUT, CUT + 1)
    for trace in run_dir.glob("samples_rank*.jsonl"):
        trace.unlink()
    out = resume(small_data, run_dir, 1, 1, 1, 1)
    assert "resharded from tp=1 pp=1 dp=2 ZeRO-1 to tp=1 pp=1 dp=1 ZeRO-1" in out, out[-3000:]
    assert_continues(run_dir, reference, CUT + 1)


def _refused(small_data, run_dir, world: int, **extra):
    """`bigllm train` as rank 0 of `world` (the preflight runs before any process group)."""
    env = dict(RANK="0", WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    overrides = _overrides(small_data, run_dir, extra.pop("tp", 1), extra.pop("pp", 1), extra.pop("zero", 1), **extra)
    proc = bigllm_cli("train", TINY, *overrides, env_extra=env, timeout=60)  # a refusal takes seconds
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def test_what_cannot_be_resumed_is_one_line(small_data, source, tmp_path):
    run_dir = cut_back(source(1, 1, 2, 1), tmp_path / "run", CUT)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    line = _refused(small_data, run_dir, 3)  # global batch 4 over dp 3
    assert "train.global_batch_size=4 is not divisible by train.micro_batch_size * dp = 2 * 3" in line, line
    line = _refused(small_data, run_dir, 4, tp=4)  # 2 kv heads over tp 4
    assert "model.num_kv_heads=2 is not divisible by parallel.tp=4" in line, line
    line = _refused(small_data, run_dir, 1, **{"train.precision": "bf16"})
    assert "was trained in fp32" in line and "train.precision=fp32" in line, line
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_dropout_resumes_at_another_layout_reproducibly(small_data, source, tmp_path):
    """dropout 0.1, dp 2 -> 1 (ZeRO-1): the saved RNG streams belong to the old ranks, so the run
    re-seeds them from train.seed and the step. Its losses stay within dropout's noise of the
    original continuation, and the same resume run twice gives the same losses bit for bit."""
    extra = {"model.dropout": 0.1}
    reference = source(1, 1, 2, 1, **extra)
    losses = []
    for name in ("a", "b"):
        run_dir = cut_back(reference, tmp_path / name, CUT)
        out = resume(small_data, run_dir, 1, 1, 1, 1, **extra)
        assert "RNG streams re-seeded from train.seed and the step" in out, out[-3000:]
        losses.append({s: v for s, v in train_losses(run_dir).items() if s > CUT})
    want = train_losses(reference)
    assert losses[0] == losses[1] and sorted(losses[0]) == list(range(CUT + 1, STEPS + 1))
    for step, loss in losses[0].items():
        assert abs(loss - want[step]) <= 0.02 * want[step], (step, loss, want[step])


def test_bf16_resumes_at_another_layout_with_its_fp32_masters(small_data, source, tmp_path):
    """bf16, dp 2 -> 1 (ZeRO-1): each rank reads the fp32 masters, not the bf16 weights. The
    resumed run takes one step at a learning rate of 1e-12, so its saved masters are the source's
    masters at the cut, to far closer than the bf16 rounding that re-deriving them from the
    weights would cost; its first loss is the original layout's."""
    from bigllm.checkpoint import open_native

    extra = {"train.precision": "bf16"}
    reference = source(1, 1, 2, 1, **extra)
    run_dir = cut_back(reference, tmp_path / "run", CUT)
    out = resume(small_data, run_dir, 1, 1, 1, 1, **extra, **{"train.max_steps": CUT + 1, "optim.lr": 1e-12,
                                                               "optim.min_lr": 0.0})
    assert "resharded from tp=1 pp=1 dp=2 ZeRO-1 to tp=1 pp=1 dp=1 ZeRO-1" in out, out[-3000:]
    cut = open_native(reference / "checkpoints" / f"step_{CUT:07d}")
    want, rounded = cut.weights("fp32"), cut.weights("bf16")
    got = open_native(run_dir / "checkpoints" / f"step_{CUT + 1:07d}").weights("fp32")
    drift = max(float((got[n] - want[n]).abs().max()) for n in want)
    rounding = max(float((want[n] - rounded[n].float()).abs().max()) for n in want)
    assert drift < rounding / 1000, (drift, rounding)
    assert abs(train_losses(run_dir)[CUT + 1] - train_losses(reference)[CUT + 1]) <= 2e-3


def test_vocab_padding_and_fp16_are_refused_at_another_layout(small_data, source, tmp_path):
    """A tp that pads the vocabulary to another size (model.make_vocab_size_divisible_by=7: 300
    tokens are 301 rows at tp 1, 308 at tp 2) and an fp16 run at another layout: one line each,
    before any process group, the checkpoints untouched."""
    seven = {"model.make_vocab_size_divisible_by": 7}
    run_dir = cut_back(source(1, 1, 1, 1, **seven), tmp_path / "run", CUT)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    line = _refused(small_data, run_dir, 2, tp=2, **seven)
    assert "pads the vocabulary to 301 rows at tp=1, tp=2 pads it to 308" in line and "parallel.tp=1" in line, line
    # fp16 cannot train on a CPU: the checkpoint's own record says fp16 (the refusal reads only that)
    tag = run_dir / "checkpoints" / f"step_{CUT:07d}"
    meta = json.loads((tag / "meta.json").read_text())
    meta["config"]["train"]["precision"] = "fp16"
    (tag / "meta.json").write_text(json.dumps(meta))
    line = _refused(small_data, run_dir, 2, **seven, **{"train.precision": "fp16"})
    assert "fp16 runs resume only at their own layout" in line, line
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
