"""Test configuration shared by every test module, on either backend.

``make test`` runs this directory once per backend, each in its own pytest
process: ``KERAS_BACKEND=tensorflow``, ``jax`` and ``torch`` (default:
tensorflow). Devices are configured here, once, before the backend
initialises:

* TensorFlow: four logical CPU devices (configured later, TensorFlow refuses);
* JAX: ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before jax is
  imported (with XLA's costly CPU optimisations off);
* PyTorch: one CPU device (Keras's PyTorch ``fit`` trains one device; the
  ``DistributedDataParallel`` test starts its own processes).

On JAX and PyTorch, importing TensorFlow fails, as on a machine without it.

Tests that apply to one backend only say so with one marker,
``@pytest.mark.backends("tensorflow")`` on a test, or
``pytestmark = pytest.mark.backends("tensorflow")`` at the top of a module.
A module marked for other backends is not even imported (so a JAX run never
imports TensorFlow through it): it reports one skipped item whose reason
names the backends it needs and the module's docstring summary; a marked
test is skipped.

Tests that do not depend on the backend at all (static checks of the files,
pure-Python logic of the scripts) say so with
``@pytest.mark.backend_independent``: ``make test`` runs them once, in the
TensorFlow 2.21 suite, and passes ``--skip-backend-independent`` to the other
suites, which deselects them there.
"""

import ast
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The examples find real data through $TF_GRADMIX_DATA; this machine keeps it beside the repository.
_SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared",
                            "data")
if "TF_GRADMIX_DATA" not in os.environ and os.path.isdir(_SHARED_DATA):
    os.environ["TF_GRADMIX_DATA"] = _SHARED_DATA

BACKEND = os.environ["KERAS_BACKEND"]
NUM_DEVICES = 4
NUM_LOGICAL_CPUS = NUM_DEVICES  # the TensorFlow name

if BACKEND == "jax":
    # Four CPU devices, and XLA's CPU code generation without its costly
    # optimisations: the tests compare results, not speed, and compiling is most
    # of their CPU time (test_model.py: 84 s -> 64 s); worker processes inherit it.
    for flag in (f"--xla_force_host_platform_device_count={NUM_DEVICES}",
                 "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"):
        if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
if BACKEND in ("jax", "torch"):
    from workers.no_tensorflow import block_tensorflow

    block_tensorflow(f"the {BACKEND} suite")
elif BACKEND == "tensorflow":
    import tensorflow as tf

    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        _cpu, [tf.config.LogicalDeviceConfiguration()] * NUM_DEVICES
    )

import pytest  # noqa: E402

pytest_plugins = ["cpu_time"]  # tests/cpu_time.py: --record-cpu-time, --max-cpu-time (make test-fast)


def pytest_addoption(parser):
    parser.addoption("--skip-backend-independent", action="store_true",
                     help="deselect the tests marked backend_independent (another suite of `make test` runs them)")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "backends(*names): run only on these Keras backends ('tensorflow', 'jax', 'torch')"
    )
    config.addinivalue_line(
        "markers", "backend_independent: the same on every backend (files, pure Python): `make test` runs it once"
    )


def _marked_backends(call):
    """The backend names of a ``pytest.mark.backends(...)`` call node, or None."""
    if not isinstance(call, ast.Call):
        return None
    func = call.func
    if isinstance(func, ast.Attribute) and func.attr == "backends":
        return {arg.value for arg in call.args if isinstance(arg, ast.Constant)}
    return None


def module_backends(path):
    """The backends of a module's ``pytestmark = pytest.mark.backends(...)``, read without importing it."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets
        ):
            marks = node.value.elts if isinstance(node.value, (ast.List, ast.Tuple)) else [node.value]
            for mark in marks:
                names = _marked_backends(mark)
                if names is not None:
                    return names
    return None


class _OtherBackendModule(pytest.File):
    """A test module marked for other backends: one skipped item, and the module is never imported."""

    def collect(self):
        summary = (ast.get_docstring(ast.parse(self.path.read_text())) or "").strip().split("\n")[0]
        names = ", ".join(sorted(module_backends(self.path)))
        item = _SkippedModule.from_parent(self, name="<module>")
        item.add_marker(pytest.mark.skip(
            reason=f"only on {names}; this run is {BACKEND}" + (f" ({summary})" if summary else "")))
        yield item


class _SkippedModule(pytest.Item):
    def runtest(self):
        pass

    def reportinfo(self):
        return self.path, 0, self.name


def pytest_pycollect_makemodule(module_path, parent):
    if module_path.name.startswith("test_"):
        names = module_backends(module_path)
        if names is not None and BACKEND not in names:
            return _OtherBackendModule.from_parent(parent, path=module_path)
    return None


def pytest_collection_modifyitems(config, items):
    if config.getoption("--skip-backend-independent"):
        independent = [item for item in items if item.get_closest_marker("backend_independent")]
        if independent:
            config.hook.pytest_deselected(items=independent)
            items[:] = [item for item in items if not item.get_closest_marker("backend_independent")]
    for item in items:
        for mark in item.iter_markers("backends"):
            if BACKEND not in mark.args:
                item.add_marker(pytest.mark.skip(reason=f"only on {', '.join(mark.args)}; this run is {BACKEND}"))


@pytest.fixture(scope="session")
def mirrored_strategy():
    """The one MirroredStrategy of the test process (several misbehave)."""
    import tensorflow as tf

    devices = [f"/cpu:{i}" for i in range(NUM_DEVICES)]
    return tf.distribute.MirroredStrategy(devices)


@pytest.fixture(autouse=True)
def _clear_keras_session(request):
    import keras

    # Without its gc.collect(), which walks the whole heap (TensorFlow's alone:
    # 0.2-0.3 s a test); Python's collector still frees cycles as it goes.
    keras.backend.clear_session(free_memory=False)
    keras.config.set_dtype_policy("float32")
    yield
    if "mirrored_strategy" in request.fixturenames:
        # A distributed dataset's iterator (tf.data's MultiDeviceIterator)
        # ends up in reference cycles. Freed by a later collection, wherever
        # that runs (inside another test's tracing), its destructor waits for
        # tf.data's autotuning thread, which sleeps up to a minute between
        # rounds: seen to stall a test 20-120 s while the machine sat idle.
        # Collected here, at the end of the test that made it, it is young.
        import gc

        gc.collect()


def pytest_collection_finish(session):
    # Everything imported so far (the backend, Keras, the test modules) lives
    # as long as the process: move it out of the collector's reach, so that
    # the collections a test triggers walk only what tests create.
    import gc

    gc.collect()
    gc.freeze()
