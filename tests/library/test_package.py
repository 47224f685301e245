"""The package as a whole: its import graph, Keras internals, ``python -OO``, its metadata."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "tf_gradmix"


def module_name(path):
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules():
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(tree, known, top_level_only=False):
    """The tf_gradmix modules a module's import statements name (all, or only those run at import)."""
    found = set()
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from a import b` imports the module a.b if there is one, else a.
            names = [
                f"{node.module}.{alias.name}"
                if f"{node.module}.{alias.name}" in known
                else node.module
                for alias in node.names
            ]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def import_graph(top_level_only=False):
    known = modules()
    return {
        name: {
            target
            for target in imported(ast.parse(path.read_text()), known, top_level_only)
            if target != name
        }
        for name, path in known.items()
    }


def reachable(graph, start):
    """Every module ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen - {start}


def imports_tensorflow_at_import_time(path, package="tensorflow"):
    return any(
        (isinstance(node, ast.Import) and any(a.name.split(".")[0] == package for a in node.names))
        or (isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == package)
        for node in ast.parse(path.read_text()).body
    )


def find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


@pytest.mark.backend_independent
def test_no_import_cycle_between_tf_gradmix_modules():
    graph = import_graph()
    assert "tf_gradmix.per_example" in graph["tf_gradmix.model"]  # the scan sees deferred imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


@pytest.mark.backend_independent
def test_dependency_direction_transitively():
    """Every import counts, deferred ones too, followed through other modules."""
    graph = import_graph()
    trainers = {f"tf_gradmix.{m}" for m in ("model", "optimizer", "exact", "callbacks")}
    for name in graph:
        if name.startswith("tf_gradmix.diagnostics"):
            assert not reachable(graph, name) & trainers, (name, reachable(graph, name) & trainers)
    bottom = ["noise", "validation", "backend", "schedules", "optimizers", "residual"]
    for name in graph:
        if any(name == f"tf_gradmix.{b}" or name.startswith(f"tf_gradmix.{b}.") for b in bottom):
            above = trainers | {"tf_gradmix.per_example", "tf_gradmix.diagnostics"}
            assert not reachable(graph, name) & above, (name, reachable(graph, name) & above)
    assert reachable(graph, "tf_gradmix.validation") == set()
    # The scan follows deferred imports: the JAX trainer reaches the JAX optimizer through one.
    assert "tf_gradmix.backend.jax.optimizer" in reachable(graph, "tf_gradmix.backend.jax.trainer")


@pytest.mark.backend_independent
def test_tensorflow_modules_load_only_on_tensorflow():
    """``import tf_gradmix`` runs no module that imports TensorFlow; those are imported on first use.

    (test_jax.py checks the same by importing and training with TensorFlow's import blocked.)
    """
    eager = import_graph(top_level_only=True)
    loaded = reachable(eager, "tf_gradmix") | {"tf_gradmix"}
    assert "tf_gradmix.model" in loaded and "tf_gradmix.backend" in loaded  # the scan sees imports
    paths = modules()
    offenders = sorted(name for name in loaded if imports_tensorflow_at_import_time(paths[name]))
    assert not offenders, offenders
    tensorflow_modules = {name for name, path in paths.items() if imports_tensorflow_at_import_time(path)}
    assert {"tf_gradmix.backend.tensorflow", "tf_gradmix.backend.tensorflow.per_example"} <= tensorflow_modules


@pytest.mark.backend_independent
def test_torch_modules_load_only_on_torch():
    """``import tf_gradmix`` runs no module that imports PyTorch: no PyTorch build is forced on anyone."""
    eager = import_graph(top_level_only=True)
    loaded = reachable(eager, "tf_gradmix") | {"tf_gradmix"}
    paths = modules()
    torch_modules = {name for name, path in paths.items() if imports_tensorflow_at_import_time(path, "torch")}
    assert torch_modules == {"tf_gradmix.backend.torch"}
    assert not loaded & torch_modules


def private_accesses(tree):
    """``obj._name`` on another object than ``self``/``cls``, and getattr(obj, "_name")."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            found.append((node.lineno, node.attr))
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and str(node.args[1].value).startswith("_")
        ):
            found.append((node.lineno, node.args[1].value))
    return found


def modules_outside_backend():
    """``(path, parsed tree)`` of every module of the package outside ``tf_gradmix/backend/``."""
    return [(path, ast.parse(path.read_text())) for name, path in modules().items()
            if not name.startswith("tf_gradmix.backend")]


@pytest.mark.backend_independent
def test_keras_private_attributes_only_in_backend():
    offenders = []
    for path, tree in modules_outside_backend():
        for line, attribute in private_accesses(tree):
            if attribute.startswith("_gradmix"):
                continue  # tf_gradmix's own attributes on a model
            offenders.append(f"{path.relative_to(REPO)}:{line} {attribute}")
    assert not offenders, offenders


def backend_name_queries(tree):
    """Lines that ask for the backend's name: ``backend.name()``, ``keras.backend.backend()``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            owner_name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", None)
            if (owner_name, node.func.attr) in (("backend", "name"), ("backend", "backend")):
                found.append(node.lineno)
    return found


FRAMEWORKS = ("tensorflow", "jax", "jaxlib", "torch")


def framework_imports(tree):
    """Line numbers of the imports of TensorFlow, JAX or PyTorch (at import time or deferred)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        if any(name.split(".")[0] in FRAMEWORKS for name in names):
            found.append(node.lineno)
    return found


@pytest.mark.backend_independent
def test_no_framework_import_outside_backend():
    """TensorFlow, JAX and PyTorch code lives in ``tf_gradmix/backend/<name>/``; the rest is ``keras.ops``."""
    offenders = []
    for path, tree in modules_outside_backend():
        offenders += [f"{path.relative_to(REPO)}:{line}" for line in framework_imports(tree)]
    assert not offenders, offenders
    assert framework_imports(ast.parse("import keras\nimport tensorflow as tf\nfrom jax import numpy\n"
                                       "def f():\n    import torch.func\n")) == [2, 3, 5]


@pytest.mark.backend_independent
def test_no_branch_on_the_backend_name_outside_backend():
    """What differs by backend lives in ``tf_gradmix/backend/``; the rest asks ``backend.current()``."""
    offenders = []
    for name, path in modules().items():
        if name.startswith("tf_gradmix.backend"):
            continue
        offenders += [f"{path.relative_to(REPO)}:{line}" for line in backend_name_queries(ast.parse(path.read_text()))]
    assert not offenders, offenders
    assert backend_name_queries(ast.parse("import keras\nkeras.backend.backend()\nbackend.name()\n")) == [2, 3]


@pytest.mark.slow  # a TensorFlow import in a subprocess: tens of seconds
@pytest.mark.backend_independent  # `import tf_gradmix` loads no backend package (the two tests above)
def test_imports_under_python_OO():
    """``-OO`` strips docstrings; nothing may depend on them at import time."""
    import tensorflow as tf

    if tuple(int(part) for part in tf.__version__.split(".")[:2]) < (2, 21):
        # TensorFlow 2.19.1 itself fails to import under -OO (its all_util reads
        # module docstrings; tensorflow/tensorflow#96900); 2.21.0 imports, 2.20 untested.
        pytest.skip(f"TensorFlow {tf.__version__} does not import under python -OO "
                    "(tensorflow/tensorflow#96900; 2.21.0 imports)")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-OO", "-c", "import tf_gradmix; print(tf_gradmix.optimizers.LAMB.__doc__)"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "None"


@pytest.mark.backend_independent
@pytest.mark.parametrize("name", sorted(modules()))
def test_docstrings_with_backslashes_are_raw(name):
    """A math docstring written as ``r\"\"\"...\"\"\"`` reads as it is written."""
    path = modules()[name]
    source = path.read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                segment = ast.get_source_segment(source, first.value) or ""
                if "\\" in segment:
                    assert segment.startswith("r"), f"{path.name}:{first.lineno}"


# -- the wheel ----------------------------------------------------------------------

# What a source checkout needs to build the wheel; nothing else is copied.
BUILD_INPUTS = ["pyproject.toml", "setup.py", "README.md", "LICENSE", "tf_gradmix"]

ONE_STEP = """
import pathlib, sys
import keras, numpy as np
import tf_gradmix as gm
assert pathlib.Path(gm.__file__).resolve().is_relative_to(pathlib.Path(sys.prefix).resolve()), gm.__file__
model = gm.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
model.compile(optimizer=gm.GradientMix(gm.optimizers.LAMB(1e-2), seed=1),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
history = model.fit(np.ones((8, 4), "float32"), np.arange(8) % 3, batch_size=8, verbose=0)
print("trained", gm.__version__, history.history["gradmix_gamma"][0])
"""


def run(args, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-3000:])
    return result


@pytest.mark.slow
def test_wheel_from_a_clean_copy_installs_and_trains_outside_the_source_tree(tmp_path):
    import shutil
    import site
    import zipfile

    import tf_gradmix

    source = tmp_path / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    # The pinned environment's setuptools builds it, offline.
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path / "dist"), str(source)])
    (wheel,) = (tmp_path / "dist").glob("tf_gradmix-*.whl")
    assert wheel.name.startswith(f"tf_gradmix-{tf_gradmix.__version__}-py3-none-any")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        license_text = next(archive.read(n) for n in names if n.endswith("licenses/LICENSE"))
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert b"Apache License" in license_text and b"Version 2.0, January 2004" in license_text
    assert "License-Expression: Apache-2.0" in metadata
    assert "Requires-Dist: keras>=3.15\n" in metadata  # no upper cap
    assert not any(n.startswith(("tests/", "examples/")) for n in names)

    # A fresh environment that sees the pinned packages (TensorFlow, Keras)
    # but not this checkout: the .pth adds their directory without running
    # its .pth files, so the editable install of the source tree stays out.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    (purelib,) = {p for p in site.getsitepackages() if "site-packages" in p}
    fresh = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    pathlib_fresh = Path(fresh.stdout.strip())
    (pathlib_fresh / "pinned_environment.pth").write_text(purelib + "\n")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", str(wheel)])
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH="")
    result = run([str(python), "-c", ONE_STEP], cwd=outside, env=env)
    assert f"trained {tf_gradmix.__version__}" in result.stdout


# -- the repository around the package --------------------------------------------


def python_files(*folders):
    return [p for folder in folders for p in sorted((REPO / folder).rglob("*.py"))]


@pytest.mark.backend_independent
def test_no_test_module_imports_another():
    """Shared test helpers live in conftest.py and helper modules (oracles.py, mwms_cluster.py), not in test modules."""
    tests = {p.stem for p in (REPO / "tests").rglob("test_*.py")}
    offenders = []
    for path in python_files("tests"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name} imports {n}" for n in names if n.split(".")[0] in tests]
    assert not offenders, offenders


@pytest.mark.backend_independent
def test_examples_experiments_benchmarks_and_tests_never_edit_sys_path():
    """Shared example code is imported as the ``examples`` package (``python -m``)."""
    edits = ("sys.path.insert", "sys.path.append")
    offenders = [
        str(path.relative_to(REPO))
        for path in python_files("examples", "experiments", "benchmarks", "tests")
        if path != Path(__file__).resolve() and any(edit in path.read_text() for edit in edits)
    ]
    assert not offenders, offenders


@pytest.mark.backend_independent
def test_the_bare_package_does_not_force_a_tensorflow_build():
    """``pip install tf_gradmix`` leaves the TensorFlow build to the user; the
    ``[cpu]``, ``[gpu]`` and ``[tpu]`` extras pick one, TensorFlow 2.19 to 2.21
    (2.19.1 on TPUs, the last release with TPU support)."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    requirements = [Requirement(r) for r in requires("tf_gradmix")]
    assert not [r for r in requirements if r.name.startswith("tensorflow") and r.marker is None], requirements
    builds = ("tensorflow", "tensorflow-cpu", "tensorflow-tpu")
    build = {str(r.marker): r for r in requirements if r.name in builds}
    assert {extra: (r.name, sorted(r.extras), str(r.specifier)) for extra, r in build.items()} == {
        'extra == "cpu"': ("tensorflow-cpu", [], "<2.22,>=2.19"),
        'extra == "gpu"': ("tensorflow", ["and-cuda"], "<2.22,>=2.19"),
        'extra == "tpu"': ("tensorflow-tpu", [], "==2.19.1"),
    }
