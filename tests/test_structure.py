"""The code's own structure: no import circles, no private names across modules, and the model's
structure table (`bigllm.model.structure`) equal to the real model's parameters."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from train_utils import ROOT

PACKAGE = ROOT / "bigllm"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> list[tuple[str, list[str]]]:
    """(imported bigllm module, names taken from it) for every import in the file, functions included."""
    out = []
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("bigllm")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("bigllm"):
                out.append((base, [a.name for a in node.names]))
    return out


def import_graph() -> dict[str, list[tuple[str, list[str]]]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        edges = []
        for target, names in _imports(path, name):
            # `from bigllm.x import y` may name the module bigllm.x.y
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            edges += [(s, []) for s in subs] + ([(target, [n for n in names if f"{target}.{n}" not in modules])]
                                                if target in modules else [])
        graph[name] = [(t, n) for t, n in edges if t != name]
    return graph


def test_the_import_graph_has_no_circle():
    graph = {k: sorted({t for t, _ in v}) for k, v in import_graph().items()}
    state, stack, circles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph.get(node, []):
            if nxt.endswith("__init__") or nxt == "bigllm":
                continue
            if state.get(nxt) == "open":
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node)
    # a package importing its own submodules in __init__ is its face, not a circle
    circles = [c for c in circles if not any(_is_package(m) for m in c)]
    assert circles == [], f"import circles: {circles}"


def package_graph(graph=None) -> dict[str, set[str]]:
    """Top-level rooms of bigllm (bigllm.data, bigllm.train, bigllm.plan, ...) and the rooms each imports."""
    def room(module: str) -> str:
        return ".".join(module.split(".")[:2])

    rooms: dict[str, set[str]] = {}
    for src, edges in (graph or import_graph()).items():
        rooms.setdefault(room(src), set())
        rooms[room(src)] |= {room(t) for t, _ in edges if room(t) != room(src) and t != "bigllm"}
    return rooms


def test_imports_run_down_the_house():
    """The packages form layers: no two top-level packages import each other, directly or around a
    loop (an arrow from a lower package to a higher one would close such a loop)."""
    rooms = package_graph()
    loops = []
    for start in rooms:
        seen, todo = set(), list(rooms[start])
        while todo:
            room = todo.pop()
            if room == start:
                loops.append(start)
                break
            if room not in seen:
                seen.add(room)
                todo += rooms.get(room, ())
    assert loops == [], f"packages on a loop of imports (one of their arrows runs back up): {sorted(loops)}"


def test_the_house_check_sees_an_arrow_back_up(monkeypatch):
    """data -> tokenizer -> data (the circle this layout once had) trips the check above."""
    planted = {"bigllm.data.preprocess": [("bigllm.tokenizer", ["Tokenizer"])],
               "bigllm.tokenizer": [("bigllm.data.readers", ["iter_corpus"])], "bigllm.data.readers": []}
    monkeypatch.setattr(__import__(__name__), "import_graph", lambda: planted)
    with pytest.raises(AssertionError, match=r"bigllm.data', 'bigllm.tokenizer"):
        test_imports_run_down_the_house()


def _is_package(module: str) -> bool:
    return (ROOT / Path(*module.split(".")) / "__init__.py").is_file()


def test_no_private_name_is_imported_across_modules():
    leaks = [(src, target, n) for src, edges in import_graph().items() for target, names in edges
             for n in names if n.startswith("_") and not n.startswith("__")]
    assert leaks == []


def test_the_checker_sees_a_circle_and_a_private_import(tmp_path, monkeypatch):
    """The two checks above can fail: a planted pair of modules trips both."""
    pkg = tmp_path / "bigllm"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from bigllm.b import _hidden\n")
    (pkg / "b.py").write_text("def f():\n    from bigllm import a\n_hidden = 1\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    with pytest.raises(AssertionError, match="import circles"):
        test_the_import_graph_has_no_circle()
    with pytest.raises(AssertionError):
        test_no_private_name_is_imported_across_modules()


@pytest.fixture(scope="module")
def one_process():
    from bigllm.evaluate.loading import init_single_process
    from bigllm.parallel.context import destroy_parallel

    init_single_process()
    yield
    destroy_parallel()


@pytest.mark.parametrize("kind", ["untied", "tied", "moe"])
def test_structure_table_is_the_real_model(kind, one_process):
    """Names (in parameter order), full shapes and the parameter count of `structure` equal a built
    CausalLM's; the init rule and tp rules cover every parameter. The MoE model has a dense first
    layer and a shared expert, and its expert sizes differ from the dense MLP's."""
    from bigllm.config import ModelConfig, MoEConfig
    from bigllm.model import sizes, structure
    from bigllm.model.build import CausalLM

    moe = MoEConfig(num_experts=4, top_k=2, ffn_hidden_size=32, shared_expert_ffn_hidden_size=48, dense_layers=[0])
    cfg = ModelConfig(hidden_size=64, num_layers=3, num_attention_heads=4, num_kv_heads=2, seq_length=32,
                      tie_embeddings=kind == "tied", moe=moe if kind == "moe" else MoEConfig())
    vocab = sizes.padded_vocab_size(300, cfg, 2)
    model = CausalLM(cfg, vocab, tp=1, precision="fp32", seed=0)
    params = dict(model.named_parameters())
    assert list(params) == structure.canonical_names(cfg)
    assert {n: tuple(p.shape) for n, p in params.items()} == structure.full_shapes(cfg, vocab)
    assert sum(p.numel() for p in params.values()) == sizes.count_params(cfg, vocab)
    for name, p in params.items():
        sigma = structure.init_std(name, cfg.init_std, cfg.num_layers)
        if sigma is None:
            assert bool((p == 1).all()), name  # norms start at one
        else:
            assert abs(float(p.std()) - sigma) < 0.25 * sigma, name
        shards = structure.split_tp(name, p.detach(), 2)
        assert all(tuple(s.shape) == structure.shard_shape(name, tuple(p.shape), 2) for s in shards), name
        assert bool((structure.merge_tp(name, shards) == p).all()), name


def test_pipeline_placement_covers_every_name_once():
    from bigllm.config import ModelConfig
    from bigllm.model import structure

    cfg = ModelConfig(num_layers=5)
    for pp in (1, 2, 3):
        names = [n for s in range(pp) for n in structure.stage_names(cfg, pp, s)]
        assert sorted(names) == sorted(structure.canonical_names(cfg)) and len(names) == len(set(names))
        assert sum(structure.blocks_per_stage(cfg, pp)) == cfg.num_layers
    tied = ModelConfig(num_layers=4, tie_embeddings=True)
    assert structure.stage_names(tied, 2, 1)[0] == structure.EMBED  # the tied table on both ends


def test_hf_adapter_round_trips_exactly():
    import torch

    from bigllm.config import ModelConfig
    from bigllm.model import hf_adapter, sizes, structure

    cfg = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2, vocab_size=300)
    vocab = sizes.padded_vocab_size(300, cfg, 1)
    gen = torch.Generator().manual_seed(0)
    state = {n: torch.randn(s, generator=gen) for n, s in structure.full_shapes(cfg, vocab).items()}
    for name in (structure.EMBED, structure.HEAD):
        state[name][300:] = 0  # the padding rows an export drops and an import zero-fills
    back = hf_adapter.from_hf_state(hf_adapter.to_hf_state(state, cfg, 300), cfg, vocab)
    assert list(back) == list(state) and all(torch.equal(back[n], state[n]) for n in state)
