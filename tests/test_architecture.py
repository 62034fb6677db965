"""The import rule of docs/architecture.md: layers import only downward.

Every module of app/, daemon/ and models/ is parsed with ``ast``; each import (module level or inside a
function) is resolved to a ``rwkv_chat.*`` module name and checked against the rules below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"app": "rwkv_chat.app", "daemon": "rwkv_chat.daemon", "models": "rwkv_chat.models"}

#: what app/ may import of the daemon
DAEMON_FACE = ("protocol", "client", "launcher", "config", "paths", "errors", "doctor", "registry", "hub", "headers")
#: what the daemon may import of the engine: the top level and these subpackages / modules
ENGINE_FACE = ("text", "errors", "state", "kernels")
#: the engine's functions the daemon may call by their package-level names (besides its classes)
ENGINE_FUNCTIONS = ("load_model", "fitted_strategy")
#: the app modules that may use the engine directly (local tools)
APP_ENGINE_TOOLS = ("rwkv_chat.app.bench", "rwkv_chat.app.plan", "rwkv_chat.app.convert")


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    parts[0] = LAYERS[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``; ``from X import a`` gives X.a as well
    as X, so that importing a submodule by name is seen."""
    name = module_name(path)
    return imports_of(path.read_text(), name if path.name != "__init__.py" else name + ".__init__")


def imports_of(source: str, name: str) -> list[tuple[int, str]]:
    """``imports`` of the source of module ``name`` (a package's ``__init__`` named ``pkg.__init__``)."""
    tree = ast.parse(source)
    package = name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.append((node.lineno, mod))
            found += [(node.lineno, f"{mod}.{a.name}") for a in node.names if a.name != "*"]
    return [(ln, m) for ln, m in found if m.startswith("rwkv_chat")]


def violation(importer: str, target: str) -> str | None:
    """Why ``importer`` may not import ``target`` (both absolute module names), or None."""
    def under(mod: str, pkg: str) -> bool:
        return mod == pkg or mod.startswith(pkg + ".")

    if under(importer, "rwkv_chat.models"):
        if under(target, "rwkv_chat.daemon") or under(target, "rwkv_chat.app"):
            return "the engine imports nothing of the daemon or the UI"
    elif under(importer, "rwkv_chat.daemon"):
        if under(target, "rwkv_chat.app"):
            return "the daemon imports nothing of the UI"
        if under(target, "rwkv_chat.models") and target != "rwkv_chat.models":
            rest = target[len("rwkv_chat.models."):].split(".")
            top = rest[0]
            if top not in ENGINE_FACE and not (len(rest) == 1 and (top[:1].isupper() or top in ENGINE_FUNCTIONS)):
                return f"the daemon uses the engine only through its interface (rwkv_chat.models, {ENGINE_FACE})"
    elif under(importer, "rwkv_chat.app"):
        if under(target, "rwkv_chat.daemon") and target != "rwkv_chat.daemon":
            top = target[len("rwkv_chat.daemon."):].split(".")[0]
            if top not in DAEMON_FACE:
                return f"the UI uses only the daemon's public face {DAEMON_FACE}"
        if under(target, "rwkv_chat.models") and importer not in APP_ENGINE_TOOLS:
            return f"the UI imports the engine only in local tools {APP_ENGINE_TOOLS}"
    return None


def all_modules() -> list[Path]:
    return sorted(p for layer in LAYERS for p in (REPO / layer).rglob("*.py"))


def test_every_layer_imports_only_downward():
    bad = []
    for path in all_modules():
        importer = module_name(path)
        for line, target in imports(path):
            why = violation(importer, target)
            if why:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {target}: {why}")
    assert not bad, "forbidden imports:\n" + "\n".join(bad)


def test_modules_found():
    names = {module_name(p) for p in all_modules()}
    assert {"rwkv_chat.app.cli", "rwkv_chat.daemon.server", "rwkv_chat.models.rwkv.model"} <= names


@pytest.mark.parametrize("importer, target, allowed", [
    ("rwkv_chat.models.rwkv.model", "rwkv_chat.daemon.paths", False),
    ("rwkv_chat.models.kernels", "rwkv_chat.app.paths", False),
    ("rwkv_chat.daemon.server", "rwkv_chat.app.cli", False),
    ("rwkv_chat.daemon.host", "rwkv_chat.models.rwkv.decode", False),
    ("rwkv_chat.daemon.host", "rwkv_chat.models.backends.fused_cuda", False),
    ("rwkv_chat.daemon.host", "rwkv_chat.models.load_model", True),
    ("rwkv_chat.daemon.host", "rwkv_chat.models.State", True),
    ("rwkv_chat.daemon.host", "rwkv_chat.models.text.sampling", True),
    ("rwkv_chat.app.cli", "rwkv_chat.daemon.server", False),
    ("rwkv_chat.app.cli", "rwkv_chat.daemon.client", True),
    ("rwkv_chat.app.chat_app", "rwkv_chat.models", False),
    ("rwkv_chat.app.bench", "rwkv_chat.models.rwkv.decode", True),
    ("rwkv_chat.app.plan", "rwkv_chat.models.plan", True),
    ("rwkv_chat.app.screens.first_run", "rwkv_chat.models.plan", False),
])
def test_rule_itself(importer, target, allowed):
    """The checker refuses what the rules forbid and admits what they allow."""
    assert (violation(importer, target) is None) == allowed


def test_relative_imports_resolve():
    """``from ..x import y`` inside a subpackage resolves against the right package."""
    got = {m for _, m in imports_of("from ..errors import StateError\nfrom . import v7\n", "rwkv_chat.models.rwkv.probe")}
    assert {"rwkv_chat.models.errors", "rwkv_chat.models.errors.StateError", "rwkv_chat.models.rwkv.v7"} <= got


def test_ui_and_protocol_import_without_torch():
    """The UI and the daemon's public face load no engine (torch takes seconds to import)."""
    import subprocess
    import sys

    code = ("import sys, rwkv_chat.app.cli, rwkv_chat.app.chat_app, rwkv_chat.daemon.client, "
            "rwkv_chat.daemon.protocol, rwkv_chat.daemon.config\n"
            "print(sorted(m for m in ('torch', 'rwkv_chat.models.rwkv', 'rwkv_chat.daemon.server') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
