"""The console script starts light, every shipped config loads, and the config loader is strict."""

import subprocess
import sys
from pathlib import Path

import pytest

from bigllm.config import RunConfig
from bigllm.config_loader import load_config, save_config
from bigllm.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_help_lists_every_command_and_each_has_its_own_help():
    from bigllm.cli import COMMANDS

    out = subprocess.run([sys.executable, "-m", "bigllm", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    listed = out.stdout.split("COMMAND", 2)[-1]
    assert all(f"    {name} " in listed or f"    {name}\n" in listed for name in COMMANDS), out.stdout
    for name in COMMANDS:
        sub = subprocess.run([sys.executable, "-m", "bigllm", name, "--help"], capture_output=True, text=True,
                             timeout=60)
        assert sub.returncode == 0 and sub.stdout.startswith(f"usage: bigllm {name}"), (name, sub.stderr)


def test_building_the_parser_imports_no_heavy_library():
    code = ("import sys, bigllm.cli; bigllm.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'deepspeed', 'megatron', 'sentencepiece', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_with_its_values(path):
    """Every value written in the file is the loaded tree's (nothing dropped, renamed or defaulted)."""
    import yaml

    from bigllm.config_loader import to_dict

    def same(written: dict, loaded: dict, where: str) -> None:  # nested blocks (model.moe) key by key
        for key, value in written.items():
            if isinstance(value, dict):
                same(value, loaded[key], f"{where}{key}.")
            else:
                assert loaded[key] == value, (where + key, loaded[key], value)

    cfg = load_config(RunConfig, path)
    same(yaml.safe_load(path.read_text()), to_dict(cfg), "")


def test_unknown_key_names_the_closest_valid_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.max_step'.*'max_steps'"):
        load_config(RunConfig, None, ["train.max_step=5"])
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  micro_batch_sise: 2\n")
    with pytest.raises(ConfigError, match=r"train.micro_batch_sise.*'micro_batch_size'"):
        load_config(RunConfig, path)


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"'train.max_steps' must be int"):
        load_config(RunConfig, None, ["train.max_steps=ten"])
    with pytest.raises(ConfigError, match=r"'train.precision' must be one of 'fp32' \| 'bf16'"):
        load_config(RunConfig, None, ["train.precision=fp8"])


def test_dotted_overrides_apply_on_top_of_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 7\noptim:\n  lr: 0.001\n")
    cfg = load_config(RunConfig, path, ["train.max_steps=20", "optim.lr=0.002", "data.prefixes=[a, b]"])
    assert cfg.train.max_steps == 20 and cfg.optim.lr == 0.002 and cfg.data.prefixes == ["a", "b"]
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(RunConfig, path, ["train.max_steps"])


def test_save_then_load_round_trips(tmp_path):
    cfg = load_config(RunConfig, None, ["train.max_steps=3", "model.hidden_size=128", "data.weights=[0.5, 0.5]",
                                        "data.prefixes=[x, y]"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(RunConfig, tmp_path / "saved.yaml") == cfg
