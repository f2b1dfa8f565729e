"""The library is a library: importing it leaves the process as it found it, and its modules
import pytest
import one way (no cycles)."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "eca_flax"

# In a fresh interpreter: the third-party libraries first (what they do on import is theirs),
# then the process state, then eca_flax's parts (no download library among what they import),
# a model, converted weights saved and loaded, a jitted forward, and the state again.
SCRIPT = """
import asyncio, logging, signal, sys
import absl.logging, flax, grain, jax, numpy as np, orbax.checkpoint, safetensors, tensorboard

def state():
    loggers = {n: logging.getLogger(n) for n in ("", "absl", "asyncio")}
    return {
        "unraisablehook": sys.unraisablehook,
        "excepthook": sys.excepthook,
        "SIGINT": signal.getsignal(signal.SIGINT),
        "SIGTERM": signal.getsignal(signal.SIGTERM),
        **{f"logger {n!r} handlers": list(l.handlers) for n, l in loggers.items()},
        **{f"logger {n!r} filters": list(l.filters) for n, l in loggers.items()},
    }

before = state()
import eca_flax, eca_flax.data, eca_flax.linen
import eca_flax.models.layers, eca_flax.models.registry
import eca_flax.weights.convert, eca_flax.weights.orbax_io, eca_flax.weights.pretrained
import eca_flax.weights.safetensors_io, eca_flax.weights.verify
import eca_flax.training.checkpoints, eca_flax.training.loop, eca_flax.training.steps
import eca_flax.weights.download, eca_flax.weights.__main__, eca_flax.predict
from flax import nnx

eca_flax.create_model, eca_flax.load_pretrained  # the one-call API: no download library yet
assert not {"huggingface_hub", "gdown"} & set(sys.modules), "a download library"

model = eca_flax.create_model("eca_resnet18", num_classes=3, rngs=nnx.Rngs(0))
sd = eca_flax.weights.convert.state_dict(model)  # the PyTorch layout
target = eca_flax.create_model("eca_resnet18", num_classes=3, rngs=nnx.Rngs(1))
eca_flax.weights.convert.load_state_dict(target, sd)
eca_flax.save_pretrained(target, sys.argv[1], arch="eca_resnet18", attention="eca")
loaded = eca_flax.load_pretrained(sys.argv[1])
logits = nnx.jit(lambda m, x: m(x))(loaded, np.zeros((1, 32, 32, 3), np.float32))
assert logits.shape == (1, 3), logits.shape
after = state()
changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
print("changed:", changed)
"""


@pytest.mark.slow
def test_import_changes_no_process_state(tmp_path):
    """Importing eca_flax (models, weights, data, training), building a model, loading converted
    weights and a jitted forward leave the hooks, signal handlers and loggers unchanged."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "weights")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "changed: {}", proc.stdout


def module_imports() -> dict[str, set[str]]:
    """{module: the eca_flax modules it imports} from the source (every import statement, in
    functions too: one deferred to break a cycle is still an edge; and the packages whose
    __init__ an import runs)."""
    modules = {}
    for file in PACKAGE.rglob("*.py"):
        parts = list(file.relative_to(ROOT).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file

    def known(name: str) -> str:
        while name not in modules:
            name = name.rpartition(".")[0]
        return name

    edges = {}
    for name, file in modules.items():
        out = edges[name] = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                out |= {known(a.name) for a in node.names if a.name.startswith("eca_flax")}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("eca_flax"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    out.add(full if full in modules else known(node.module))
        # Importing eca_flax.data.transforms from outside eca_flax.data runs eca_flax/data's
        # __init__ first: an edge to each package above a target that is not above the importer
        # (the root's names load on first use, so it is left out).
        for target in list(out):
            parts = target.split(".")
            for i in range(2, len(parts)):
                package = ".".join(parts[:i])
                if package in modules and not (name + ".").startswith(package + "."):
                    out.add(package)
        out.discard(name)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the import graph (its modules in order), or None."""
    done, path = set(), []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if cycle := visit(nxt):
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(edges):
        if cycle := visit(start):
            return cycle
    return None


DOWNLOADERS = ("huggingface_hub", "gdown", "filelock")


def test_download_libraries_load_on_use():
    """No module of eca_flax imports huggingface_hub, gdown or filelock at its top level (only
    inside the functions that download): ``import eca_flax`` and a cached load need none."""
    found = []
    for file in PACKAGE.rglob("*.py"):
        for node in ast.parse(file.read_text()).body:  # module level only
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            found += [f"{file.name}: {n}" for n in names if n.split(".")[0] in DOWNLOADERS]
    assert found == []


@pytest.mark.parametrize("module", ["eca_flax.data", "eca_flax.training.config"])
def test_these_modules_import_no_jax(module: str):
    """eca_flax.data imports neither JAX nor Flax: grain's worker processes (spawned) import it
    to run the transforms, and each would otherwise start JAX for nothing (1.9 CPU-s here).
    Nor does the config module: train.py's supervisor of a multi-process run reads the config
    with it and starts nothing else."""
    code = f"import sys, {module}; print(sorted({{'jax', 'flax', 'torch'}} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_run_one_way():
    edges = module_imports()
    assert "eca_flax.weights.description" in edges["eca_flax.weights.orbax_io"]  # it sees them
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_save_pretrained_is_public_beside_load_pretrained() -> None:
    """Issue 31, finding 17: eca_flax.load_pretrained was top-level, save_pretrained not."""
    import eca_flax
    from eca_flax.weights import pretrained

    assert eca_flax.save_pretrained is pretrained.save_pretrained
    assert {"load_pretrained", "save_pretrained"} <= set(eca_flax.__all__) & set(dir(eca_flax))
