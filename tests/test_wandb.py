"""train.wandb: the run's scalars and resolved config reach Weights & Biases, tested in W&B's
offline mode (no network): the offline run file is read back with W&B's own protobuf schema and
compared with train_log.jsonl; a resumed run continues the same W&B run."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from train_utils import ROOT, run_ok, small_overrides

pytestmark = pytest.mark.slow


def wandb_records(path: Path) -> list:
    """The protobuf Records of an offline run file: W&B's 7-byte header, then LevelDB's log format
    (32 KiB blocks of [crc32, length, type] framed chunks; FULL=1, FIRST/MIDDLE/LAST=2/3/4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, records, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        header = data[pos:pos + 7]
        if left < 7 or header == bytes(7):  # block trailer / padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", header)
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def history(run_dir: Path) -> tuple[dict[int, dict], dict, set[str]]:
    """(step -> logged scalars, resolved config, run ids) over every offline run file of the run dir."""
    steps, config, ids = {}, {}, set()
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                step = record.history.step.num if record.history.HasField("step") else items["_step"]
                items.pop("_step", None)
                steps.setdefault(step, {}).update(
                    {k: v for k, v in items.items() if not k.startswith("_")})
            elif kind == "run":
                ids.add(record.run.run_id)
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
    return steps, config, ids


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_offline_wandb_logs_the_jsonl_scalars_and_config(small_data, tmp_path):
    """Also: W&B writes only under RUN_DIR/wandb/ (and bigllm's RUN_DIR/wandb_id): nothing in the
    home directory, the temporary directory or the repository (the working directory)."""
    run = tmp_path / "run"
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir(), tmp.mkdir()
    env = {"HOME": str(home), "TMPDIR": str(tmp), "XDG_CONFIG_HOME": str(home / ".config"),
           "XDG_CACHE_HOME": str(home / ".cache")}
    repo_before = {p.name for p in ROOT.iterdir()}  # (W&B's default is ./wandb in the working directory)
    extra = {"train.wandb.project": "bigllm-test", "train.wandb.mode": "offline", "train.eval_interval": 2}
    run_ok(1, small_overrides(*small_data, run, 1, 1, steps=2, **extra), env_extra=env)
    run_ok(1, small_overrides(*small_data, run, 1, 1, steps=3, **extra), env_extra=env)  # resumes: the same W&B run
    outside = [f for f in _files(home) | _files(tmp) if "wandb" in f.lower()]
    assert outside == [] and {p.name for p in ROOT.iterdir()} == repo_before, outside
    assert (run / "wandb").is_dir() and not any("wandb" in p.name for p in run.iterdir()
                                                 if p.name not in ("wandb", "wandb_id"))
    logged, config, ids = history(run)
    assert len(ids) == 1 and ids == {(run / "wandb_id").read_text().strip()}
    assert config["model"]["hidden_size"] > 0 and config["train"]["wandb"]["project"] == "bigllm-test"
    jsonl = {}
    for line in (run / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        jsonl.setdefault(rec.pop("step"), {}).update(rec)
    assert sorted(logged) == sorted(jsonl) == [0, 1, 2, 3]
    for step, scalars in jsonl.items():
        assert logged[step] == pytest.approx(scalars, rel=1e-12), step


def test_wandb_without_the_package_is_one_line(small_data, tmp_path):
    from train_utils import TINY, bigllm_cli

    shadow = tmp_path / "shadow" / "wandb"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no wandb here')\n")
    overrides = small_overrides(*small_data, tmp_path / "run", 1, 1, **{"train.wandb.project": "p"})
    proc = bigllm_cli("train", TINY, *overrides, env_extra={"PYTHONPATH": str(tmp_path / "shadow")})
    assert proc.returncode == 1 and "pip install 'bigllm[wandb]'" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
