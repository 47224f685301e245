"""Each test's CPU time: recorded per backend, and used to choose the fast tier.

A test's cost is the CPU time (user + system) of the pytest process and of
every subprocess it waited for, over its setup, call and teardown. CPU time,
unlike wall time, hardly moves with the machine's load, so a record made on a
busy machine still ranks the tests.

* ``--record-cpu-time`` writes each test's cost into :data:`RECORD`
  (``{backend: {test id: seconds}}``), replacing the entries of the tests that
  ran and keeping the others; ``make cpu-time`` records every suite's.
* ``--max-cpu-time SECONDS`` deselects the tests whose recorded cost on this
  backend exceeds ``SECONDS``; a test with no record (a new one) runs.
  ``make test-fast`` uses it: the tests it leaves out run in ``make test``.

Both work with pytest-xdist: a worker attaches each test's cost to its
teardown report, and the controller writes the record.
"""

import json
import os
from pathlib import Path

import pytest

RECORD = Path(__file__).resolve().parent / "cpu_time.json"
_PROPERTY = "cpu_seconds"
_COSTS = {}  # test id -> CPU seconds, filled on the controller (or the only process)


def pytest_addoption(parser):
    group = parser.getgroup("cpu time")
    group.addoption("--record-cpu-time", action="store_true",
                    help=f"write each test's CPU time (this backend) into {RECORD.name}")
    group.addoption("--max-cpu-time", type=float, default=None, metavar="SECONDS",
                    help=f"deselect tests whose CPU time recorded in {RECORD.name} exceeds SECONDS")
    group.addoption("--cpu-time-record", type=Path, default=RECORD, metavar="PATH",
                    help=f"the record to read and write (default: tests/{RECORD.name})")


def _backend():
    return os.environ.get("KERAS_BACKEND", "tensorflow")


def _cpu_seconds():
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def read_record(path=RECORD):
    """``{backend: {test id: seconds}}``; empty if there is no record yet."""
    return json.loads(path.read_text()) if path.exists() else {}


def pytest_configure(config):
    limit = config.getoption("--max-cpu-time")
    if limit is not None and limit <= 0:
        raise pytest.UsageError(f"--max-cpu-time must be positive, got {limit}")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    limit = config.getoption("--max-cpu-time")
    if limit is None:
        return
    record = read_record(config.getoption("--cpu-time-record")).get(_backend(), {})
    slow = [item for item in items if record.get(item.nodeid, 0.0) > limit]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if record.get(item.nodeid, 0.0) <= limit]


def _measure(item):
    start = _cpu_seconds()
    yield
    item._cpu_time = getattr(item, "_cpu_time", 0.0) + _cpu_seconds() - start


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    yield from _measure(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield from _measure(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    yield from _measure(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if call.when == "teardown":
        outcome.get_result().user_properties.append((_PROPERTY, round(getattr(item, "_cpu_time", 0.0), 3)))


def pytest_runtest_logreport(report):
    if report.when != "teardown":
        return
    for name, value in report.user_properties:
        if name == _PROPERTY:
            _COSTS[report.nodeid] = value



def pytest_sessionfinish(session):
    config = session.config
    if not config.getoption("--record-cpu-time") or hasattr(config, "workerinput") or not _COSTS:
        return
    path = config.getoption("--cpu-time-record")
    record = read_record(path)
    backend = record.setdefault(_backend(), {})
    backend.update(_COSTS)
    record[_backend()] = dict(sorted(backend.items()))
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=0, sort_keys=True) + "\n")
    os.replace(tmp, path)  # atomic: a reader never sees half a record
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"cpu time: {len(_COSTS)} tests, {sum(_COSTS.values()):.0f} s, written to {path}")
