"""The package layout promises (issue: one `kvtrace` package with a torch-free runtime):
dependencies point one way (exporter -> models -> kvtrace <- runtime), checked on the source by
parsing every import statement (lazy imports inside functions included)."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PART_OF = {"kvtrace": "kvtrace", "runtime": "kvtrace.runtime", "models": "kvtrace.models",
           "exporter": "kvtrace.exporter", "configs": "kvtrace.configs"}


def imports(folder: str) -> list[tuple[str, int, str]]:
    """(file, line, absolute module name) for every import in the folder's modules."""
    out = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        pkg = PART_OF[folder] + "".join("." + p for p in path.relative_to(ROOT / folder).parent.parts)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out += [(path.name, node.lineno, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against the package
                    base = pkg.split(".")
                    base = base[: len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                out += [(path.name, node.lineno, mod)] + [(path.name, node.lineno, f"{mod}.{a.name}")
                                                          for a in node.names]
    return out


def _offending(folder: str, banned: tuple[str, ...]) -> list[str]:
    return [f"{folder}/{f}:{line} imports {mod}" for f, line, mod in imports(folder)
            if any(mod == b or mod.startswith(b + ".") for b in banned)]


def test_runtime_imports_no_models_exporter_or_torch():
    assert _offending("runtime", ("kvtrace.models", "kvtrace.exporter", "torch", "onnx", "safetensors")) == []


def test_core_imports_none_of_its_parts():
    assert _offending("kvtrace", ("kvtrace.models", "kvtrace.exporter", "kvtrace.runtime", "torch", "onnx")) == []


def test_models_import_no_exporter():
    assert _offending("models", ("kvtrace.exporter", "kvtrace.runtime")) == []


def test_configs_are_pure_data():
    assert _offending("configs", ("kvtrace.models", "kvtrace.exporter", "kvtrace.runtime", "torch")) == []


def test_the_check_catches_a_violation(tmp_path, monkeypatch):
    """The parser above really sees lazy and relative imports (so the tests above can fail)."""
    fake = tmp_path / "runtime"
    fake.mkdir()
    (fake / "bad.py").write_text("def f():\n    from ..models import transformer\n    import torch\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = _offending("runtime", ("kvtrace.models", "torch"))
    assert any("kvtrace.models" in x for x in found) and any("imports torch" in x for x in found)


@pytest.mark.parametrize("folder", ["runtime", "models", "exporter", "configs", "kvtrace"])
def test_code_cites_repository_paths_only(folder):
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / folder).rglob("*.py")
           for i, line in enumerate(p.read_text().splitlines(), 1) if "/work/" in line or "notes/" in line]
    assert bad == []
