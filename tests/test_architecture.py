"""The package's import direction, checked on the source (module-level and function-level imports alike).

    cli, demo  →  training, pipelines  →  metrics, rerank  →  composite models (text2image, captioner, clip)
      →  convert  →  sampling  →  single networks (gpt, vqgan, vit, text_encoder, discriminator)  →  data, text
      →  errors, fileio, config, runtime, hub

A module may import its own layer or a lower one. Two same-layer pairs are forbidden too (training and
pipelines never import each other).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tuwen"

LAYERS: list[tuple[str, ...]] = [
    ("tuwen.errors", "tuwen.fileio", "tuwen.config", "tuwen.runtime", "tuwen.hub"),
    ("tuwen.text", "tuwen.data"),
    ("tuwen.models.gpt", "tuwen.models.vqgan", "tuwen.models.vit", "tuwen.models.resnet", "tuwen.models.text_encoder",
     "tuwen.models.discriminator", "tuwen.models", "tuwen.models.cogview_vqvae"),
    ("tuwen.sampling",),
    ("tuwen.convert",),
    ("tuwen.models.text2image", "tuwen.models.captioner", "tuwen.models.clip", "tuwen.models.cogview",
     "tuwen.models.completion", "tuwen.models.superres"),
    ("tuwen.metrics", "tuwen.rerank"),
    ("tuwen.training", "tuwen.pipelines"),
    ("tuwen.cli", "tuwen.demo", "tuwen.serve"),
    ("tuwen", "tuwen.__main__"),
]
FORBIDDEN = [("tuwen.training", "tuwen.pipelines"), ("tuwen.pipelines", "tuwen.training")]  # same layer


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str) -> int:
    """The layer of the most specific prefix that matches ``module``."""
    best, best_len = None, -1
    for i, names in enumerate(LAYERS):
        for prefix in names:
            if _under(module, prefix) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    if best is None:
        raise AssertionError(f"{module}: not in any layer of tests/test_architecture.py; add it there")
    return best


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(module: str, source: str, is_package: bool, exists) -> list[tuple[str, int]]:
    """Every ``tuwen.*`` module that ``source`` imports (at any depth in the file), with its line."""
    out = []
    pkg = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if _under(a.name, "tuwen")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not _under(target, "tuwen"):
                continue
            for a in node.names:  # `from tuwen.x import y`: y may itself be a module
                sub = f"{target}.{a.name}"
                out.append((sub if exists(sub) else target, node.lineno))
    return out


def violations(files: dict[str, tuple[str, bool]]) -> list[str]:
    """``files``: module name → (source, is_package). Returns one line per import against the direction."""
    exists = files.__contains__
    bad = []
    for mod, (source, is_pkg) in sorted(files.items()):
        lm = layer_of(mod)
        for target, line in imports_of(mod, source, is_pkg, exists):
            if _under(target, "tuwen.tasks"):
                bad.append(f"{mod}:{line} imports {target}: the old tasks package is gone")
                continue
            lt = layer_of(target)
            if lt > lm:
                bad.append(f"{mod}:{line} imports {target} (layer {lt} above {lm})")
            for a, b in FORBIDDEN:
                if _under(mod, a) and _under(target, b) and not _under(mod, b):
                    bad.append(f"{mod}:{line} imports {target} ({a} must not import {b})")
    return bad


def read_tree(root: Path = SRC) -> dict[str, tuple[str, bool]]:
    return {module_name(p, root): (p.read_text(encoding="utf-8"), p.name == "__init__.py")
            for p in sorted(root.rglob("*.py"))}


def test_import_direction():
    bad = violations(read_tree())
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


@pytest.mark.parametrize("module,injected", [
    ("tuwen.models.gpt", "from ..sampling import generate\n"),                    # module level
    ("tuwen.data.tables", "def f():\n    from ..models.vqgan import VQGAN\n"),  # hidden in a function
    ("tuwen.convert.taming", "import tuwen.cli.common\n"),
    ("tuwen.training.trainer", "from ..pipelines import pipeline\n"),
])
def test_a_reverse_import_is_caught(module, injected):
    files = read_tree()
    src, is_pkg = files[module]
    files[module] = (src + "\n" + injected, is_pkg)
    bad = violations(files)
    assert any(line.startswith(module + ":") for line in bad), bad


def test_no_cycles_between_modules():
    files = read_tree()
    graph = {m: {t for t, _ in imports_of(m, s, p, files.__contains__) if t in files and t != m}
             for m, (s, p) in files.items()}
    # package __init__ files re-export lazily; a package importing its own children is not a cycle
    graph = {m: {t for t in ts if not _under(t, m)} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                cyc = visit(t)
                if cyc:
                    return cyc
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            cyc = visit(m)
            assert cyc is None, "import cycle: " + " → ".join(cyc)
