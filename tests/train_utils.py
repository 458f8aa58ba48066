"""Helpers for tests that launch real multi-process training runs with torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
                 "TORCHELASTIC_RUN_ID", "LOCAL_SIZE", "CROSS_RANK", "NODE_RANK")


def clean_env(**extra) -> dict:
    """This process's environment without launcher variables, for starting a launcher."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
TINY = ROOT / "configs" / "tiny.yaml"
TEST_VOCAB = 512


# ----- the session's test data (conftest's fixtures; tools/update_golden.py makes the same) --------
def make_corpus(path: Path) -> Path:
    """~0.5 MB of real English text (the standard library's docs) as jsonl."""
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_corpus.py"), "--output", str(path),
                    "--max-mb", "0.5"], check=True, capture_output=True)
    return path


def make_tokenizer(corpus: Path, out: Path, vocab_size: int = TEST_VOCAB) -> Path:
    from bigllm.tokenizer import train_tokenizer

    train_tokenizer([str(corpus)], out, vocab_size=vocab_size, max_sentences=20_000)
    return out


SMALL_WORDS = ("alpha beta gamma delta model token layer pipeline tensor shard gradient optimizer loss "
               "naïve café 日本 übung").split()


def make_small_data(root: Path) -> tuple[Path, Path]:
    """A word-salad corpus, its SentencePiece tokenizer (vocab 300: padded to 320, so exports drop
    rows) and one .bin/.idx shard: the conversion tests' data."""
    import random

    rng = random.Random(0)
    corpus = root / "corpus.jsonl"
    with open(corpus, "w") as f:
        for _ in range(400):
            f.write(json.dumps({"text": " ".join(rng.choice(SMALL_WORDS) for _ in range(rng.randint(20, 80)))}) + "\n")
    make_tokenizer(corpus, root / "tok", vocab_size=300)
    make_shard(corpus, root / "tok", str(root / "corpus"))
    return root / "tok", root / "corpus"


def small_overrides(tok, prefix, run_dir, tp, pp, steps=2, **extra) -> list[str]:
    """2-step runs of the tiny model on the small data: seq 64, global batch 4."""
    return base_overrides(tok, prefix, run_dir, **{
        "train.max_steps": steps, "parallel.tp": tp, "parallel.pp": pp, "train.global_batch_size": 4,
        "train.micro_batch_size": 2, "model.seq_length": 64, "data.split": "90,10,0", **extra})


def model_logits(state: dict, cfg, vocab_size: int, tokens):
    """tokens [b, s] -> logits [b, s, V] of `CausalLM` at tp = 1 (one gloo process) with `state`."""
    import torch

    from bigllm.config import ParallelConfig
    from bigllm.model.build import CausalLM
    from bigllm.parallel.context import destroy_parallel, init_parallel

    saved = dict(os.environ)  # restored after: torchrun children must not inherit RANK/WORLD_SIZE
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    init_parallel(ParallelConfig(), 0)
    try:
        model = CausalLM(cfg.model, vocab_size, 1, "fp32", 0).eval()
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
        with torch.no_grad():
            return model(tokens).transpose(0, 1)
    finally:
        destroy_parallel()
        os.environ.clear()
        os.environ.update(saved)


def transformers_nll(model_dir: Path, tokens, seq_len: int, stride: int) -> tuple[float, int]:
    """(NLL sum, scored tokens) of the Hugging Face perplexity guide's loop in transformers itself
    over a token stream: labels -100 where a window does not score."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    nll, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(tokens), stride):
            end = min(begin + seq_len, len(tokens))
            ids = tokens[begin:end][None]
            labels = ids.clone()
            labels[:, :-(end - prev_end)] = -100
            n = int((labels[:, 1:] != -100).sum())  # targets after transformers' internal shift
            nll += float(model(ids, labels=labels).loss) * n
            count += n
            prev_end = end
            if end == len(tokens):
                break
    return nll, count


def make_shard(corpus: Path, tokenizer_dir: Path, prefix: str) -> str:
    from bigllm.data.preprocess import preprocess

    preprocess([str(corpus)], str(tokenizer_dir), prefix, workers=1, progress=False)
    return prefix


def base_overrides(tokenizer_dir, shard_prefix, run_dir, **extra) -> list[str]:
    """The tiny config pointed at the test data, logging every step, no mid-run eval/saves."""
    values = {
        "data.tokenizer": str(tokenizer_dir), "data.prefixes": f"[{shard_prefix}]", "train.run_dir": str(run_dir),
        "train.log_interval": 1, "train.eval_interval": 0, "train.save_interval": 0, "train.max_steps": 4,
        "train.tensorboard": "false", "train.eval_iters": 2, "parallel.tp": 1, "parallel.pp": 1,
        "parallel.zero_stage": 0, "data.split": "90,10,0",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def launch(nproc: int, argv: list, timeout: int = 300, env_extra: dict | None = None, popen: bool = False):
    """`torchrun --standalone --nproc-per-node N -m bigllm ARGV...`: the tests' one launcher.
    popen=True returns the running Popen (own session, pipes), else the finished CompletedProcess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "bigllm", *map(str, argv)]
    env = clean_env(**(env_extra or {}))
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def launch_script(nproc: int, script: str, args: list, timeout: int = 300,
                  env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N tests/SCRIPT ARGS...` on ranks forked as `torchrun` below
    starts them: a test's worker script that runs bigllm in its processes with hooks of its own
    (tests/sync_worker.py, params_worker.py)."""
    return fork_server().run(args, ROOT, env=clean_env(**(env_extra or {})), timeout=timeout, nproc=nproc,
                             script=ROOT / "tests" / script)


def torchrun(nproc: int, overrides: list[str], timeout: int = 300, config: Path = TINY,
             env_extra: dict | None = None, fresh: bool = False) -> subprocess.CompletedProcess:
    """`bigllm train CONFIG OVERRIDES...` on `nproc` ranks as torchrun starts them (its rank
    environment, one master port, the others stopped when a rank fails, exit 1 then), forked from
    the session's warm server: real processes and gloo groups without ~8 s of imports each. The
    tests of launching itself (signals, dead peers, import-time warnings, SLURM) use `launch`, and
    so does `fresh=True`: for an `env_extra` that the libraries read as they are imported."""
    if fresh:
        return launch(nproc, ["train", config, *overrides], timeout=timeout, env_extra=env_extra)
    return forked(nproc, ["train", config, *overrides], timeout=timeout, env_extra=env_extra)


def forked(nproc: int, argv: list, timeout: int = 300, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """`bigllm ARGV...` on `nproc` ranks forked from the session's warm server, as `torchrun` above."""
    return fork_server().run(argv, ROOT, env=clean_env(**(env_extra or {})), timeout=timeout, nproc=nproc)


def cli_env(**extra) -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **extra}


def bigllm_cli(*args, timeout: int = 300, env_extra: dict | None = None, fresh: bool = False) -> subprocess.CompletedProcess:
    """One `bigllm ARGS...` process (no launcher): forked from the session's warm ForkServer, or
    with `fresh` (or a PYTHONPATH of its own) a new `python -m bigllm` interpreter, for tests of
    what happens at import time (warnings, missing packages)."""
    env = cli_env(**(env_extra or {}))
    if fresh or "PYTHONPATH" in (env_extra or {}):
        return subprocess.run([sys.executable, "-m", "bigllm", *map(str, args)], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=timeout)
    return fork_server().run(args, ROOT, env=env, timeout=timeout)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deepspeed_launch(nproc: int, overrides: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """The deepspeed launcher (`deepspeed --module bigllm train ...`) on this host."""
    env = clean_env()
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [sys.executable, str(launcher), f"--num_gpus={nproc}", f"--master_port={free_port()}", "--no_local_rank",
           "--module", "bigllm", "train", str(TINY), *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def run_ok(nproc: int, overrides: list[str], **kw) -> subprocess.CompletedProcess:
    proc = torchrun(nproc, overrides, **kw)
    assert proc.returncode == 0, f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def train_log(run_dir, key: str) -> dict[int, float]:
    """step -> the logged scalar `key` (e.g. 'train/grad_norm'), from RUN_DIR/train_log.jsonl."""
    out = {}
    for line in (Path(run_dir) / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if key in rec:
            out[rec["step"]] = rec[key]
    return out


def train_losses(run_dir) -> dict[int, float]:
    """step -> training loss, from RUN_DIR/train_log.jsonl."""
    return train_log(run_dir, "train/loss")


# The parity runs: 2 warm-up steps, then 4 steps into the cosine decay (tiny.yaml's 20-step warm-up
# would keep every compared step in the linear ramp).
PARITY_STEPS = 6
PARITY = {"train.max_steps": PARITY_STEPS, "optim.warmup_steps": 2}


def parity_record(run_dir) -> dict[int, dict]:
    """step -> {"loss", "grad_norm"}: what the parity tests and the golden file compare."""
    losses, norms = train_losses(run_dir), train_log(run_dir, "train/grad_norm")
    return {step: {"loss": losses[step], "grad_norm": norms[step]} for step in sorted(losses)}


# ----- a warm `python -m bigllm` for tests that run many short commands and training jobs ---------
_FORK_SERVER = r"""
import json, os, signal, socket, sys, time, traceback
import bigllm.cli
from bigllm.commands import convert, evaluate, preprocess  # noqa: F401
import torch, deepspeed, megatron.core, sentencepiece, transformers  # noqa: F401  imported once, here
import bigllm.train.loop, bigllm.train.engine, bigllm.model.build, bigllm.train.checkpointer  # noqa: F401
try:
    import lm_eval.evaluator  # noqa: F401  (the harness tests)
except ImportError:
    pass


def child(req, env, out, err):
    # the command, in a fresh process of its own: `bigllm ARGV` as the interpreter would run it
    os.setpgid(0, 0)  # its own process group, so that the launcher can stop it with what it started
    signal.alarm(req["timeout"])  # a hung command dies (SIGALRM) instead of hanging the tests
    os.chdir(req["cwd"])
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.environ.clear()
    os.environ.update(env)
    try:
        if req.get("script"):  # a test's worker script, run as `python SCRIPT ARGV...` would run it
            import runpy
            sys.argv = [req["script"], *req["argv"]]
            sys.path.insert(0, os.path.dirname(req["script"]))
            runpy.run_path(req["script"], run_name="__main__")
            code = 0
        else:
            sys.argv = ["bigllm", *req["argv"]]
            code = bigllm.cli.main(req["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def files(req):
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND  # ranks share them, as they share torchrun's
    return os.open(req["stdout"], flags), os.open(req["stderr"], flags)


def run_one(req):
    out, err = files(req)
    pid = os.fork()
    if pid == 0:
        child(req, req["env"], out, err)
    os.close(out), os.close(err)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def launch(req):
    # torchrun --standalone --nproc-per-node N, minus its interpreter and imports: N ranks with the
    # environment torchrun gives them; when one fails the others are stopped (SIGTERM, then
    # SIGKILL) and the launch exits 1, as torchrun does
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    n, out_err = req["nproc"], files(req)
    ranks = {}
    for rank in range(n):
        env = {**req["env"], "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n),
               "LOCAL_WORLD_SIZE": str(n), "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1", "ROLE_RANK": str(rank),
               "ROLE_WORLD_SIZE": str(n), "ROLE_NAME": "default", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_RESTART_COUNT": "0",
               "TORCHELASTIC_MAX_RESTARTS": "0"}
        pid = os.fork()
        if pid == 0:
            child(req, env, *out_err)
        ranks[pid] = rank
    for fd in out_err:
        os.close(fd)
    codes, deadline, stop_at = {}, time.time() + req["timeout"], None
    while len(codes) < n:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            codes[pid] = os.waitstatus_to_exitcode(status)
            if codes[pid] != 0 and stop_at is None:
                stop_at = time.time()
                for other in set(ranks) - set(codes):
                    os.killpg(other, signal.SIGTERM)
            continue
        if stop_at is not None and time.time() > stop_at + 30 or time.time() > deadline:
            for other in set(ranks) - set(codes):
                os.killpg(other, signal.SIGKILL)
        time.sleep(0.05)
    return 0 if not any(codes.values()) else 1


for line in sys.stdin:
    req = json.loads(line)
    print(json.dumps(launch(req) if req.get("nproc") else run_one(req)), flush=True)
"""


class ForkServer:
    """`python -m bigllm ARGV` without paying the imports each time: one server process imports
    torch, DeepSpeed, megatron-core and bigllm once, then forks a fresh child per command, which
    runs `bigllm.cli.main(ARGV)` in the given cwd and env with its own stdout/stderr (an uncaught
    exception prints its traceback and exits 1, as the interpreter would)."""

    def __init__(self, env: dict):
        import tempfile

        self.env, self.tmp = env, Path(tempfile.mkdtemp(prefix="bigllm-fork-"))
        self.proc = subprocess.Popen([sys.executable, "-c", _FORK_SERVER], cwd=ROOT, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def run(self, argv: list, cwd, env: dict | None = None, timeout: int = 120, nproc: int = 0,
            script: Path | None = None) -> subprocess.CompletedProcess:
        """`bigllm ARGV` (or `python SCRIPT ARGV`) in a forked child; with `nproc`, on that many
        forked ranks as torchrun would start them (rank environment, a free master port, the
        others stopped when one fails)."""
        out, err = self.tmp / "fork.stdout", self.tmp / "fork.stderr"
        request = {"argv": [str(a) for a in argv], "cwd": str(cwd), "env": env or self.env, "stdout": str(out),
                   "stderr": str(err), "timeout": int(timeout), "nproc": nproc, "script": str(script or "")}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        code = json.loads(self.proc.stdout.readline())
        result = subprocess.CompletedProcess(argv, code, out.read_text(errors="replace"), err.read_text(errors="replace"))
        out.unlink()
        err.unlink()
        return result

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


_SERVER: ForkServer | None = None


def fork_server() -> ForkServer:
    """The session's ForkServer, started on first use (and again if it died)."""
    global _SERVER
    if _SERVER is None or _SERVER.proc.poll() is not None:
        import atexit

        _SERVER = ForkServer(cli_env())
        atexit.register(_SERVER.close)
    return _SERVER


def plant_malicious_pickle(tag_dir: Path, marker: Path) -> Path:
    """Replace the checkpoint's mp_rank_00 shard with a pickle that runs `touch MARKER` when
    unpickled, and fix its manifest size as a forger would; the shard's path."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    target = Path(tag_dir) / "mp_rank_00_model_states.pt"
    target.write_bytes(pickle.dumps({"module": Payload()}))
    meta = json.loads((Path(tag_dir) / "meta.json").read_text())
    meta["manifest"][target.name] = target.stat().st_size
    (Path(tag_dir) / "meta.json").write_text(json.dumps(meta))
    return target


# ----- runs interrupted and resumed ----------------------------------------------------------------
def cut_back(run_dir, out, step: int):
    """A copy of `run_dir` as it was right after the save at `step` (later checkpoints and logs dropped)."""
    shutil.copytree(run_dir, out)
    root = out / "checkpoints"
    for tag in root.glob("step_*"):
        if int(tag.name.split("_")[1]) > step:
            shutil.rmtree(tag)
    (root / "latest").write_text(f"step_{step:07d}")
    log = out / "train_log.jsonl"
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines()
                           if json.loads(line).get("step", 0) <= step))
    for trace in out.glob("samples_rank*.jsonl"):
        trace.unlink()
    return out


def workers_of(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the torchrun workers below a launcher (read from /proc)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == launcher_pid:
            env = dict(e.split(b"=", 1) for e in environ if b"=" in e)
            if b"RANK" in env:
                out[int(env[b"RANK"])] = int(entry.name)
    return out


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        log = run_dir / "train_log.jsonl"
        if log.exists() and any(json.loads(l).get("step", 0) >= step for l in log.read_text().splitlines() if l):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError(f"run did not reach step {step}")
