"""Mutation check of the test suite: does it catch deliberate bugs?

Applies one-line mutations of the library, one at a time, each to a fresh
temporary copy of the repository (the working tree is never modified), runs
the tests of the mutated module against that copy and prints a Markdown table:
the mutation, its file and line, and the tests that failed. Every mutation must
be caught; the script exits 1 if one is not, or if a mutation's target line is
gone (the library changed: update the mutation).

Not a pytest module (pytest collects ``test_*.py``); run it from the
repository root with the environment of the suite:

    .venv/bin/python tests/mutations.py                # all mutations
    .venv/bin/python tests/mutations.py --list         # names only
    .venv/bin/python tests/mutations.py --check        # each target text found once, tests exist; runs nothing
    .venv/bin/python tests/mutations.py lamb_trust_ratio exclusion_pattern

Each mutation's tests first run unmutated on the same copy (``--no-baseline``
skips that), so a failure is the mutation's, not a broken test. The backend
of a run is the mutation's (``KERAS_BACKEND``); the TensorFlow 2.21 and JAX
mutations run in this interpreter.
"""

import argparse
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a test run needs of the repository; the rest (virtual environments, git) is left out.
COPIED = ("tf_gradmix", "tests", "examples", "experiments", "benchmarks", "docs", "pyproject.toml",
          "setup.py", "README.md", "CONTRIBUTING.md", "LICENSE", "requirements")


@dataclasses.dataclass
class Mutation:
    name: str
    what: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple  # pytest node ids (or folders) run against the mutant
    backend: str = "tensorflow"


MUTATIONS = [
    Mutation(
        "sample_weight_sign",
        "the sample-level gradient weight's sign: `upstream * -scale`",
        "tf_gradmix/model.py",
        "return upstream * ops.cast(scale, upstream.dtype), ops.zeros_like(scale)",
        "return upstream * ops.cast(-scale, upstream.dtype), ops.zeros_like(scale)",
        ("tests/library/test_model.py::test_fit_update_equals_per_example_mix",),
    ),
    Mutation(
        "sample_weight_index",
        "each example gets another example's weight (weights reversed)",
        "tf_gradmix/model.py",
        "scale = ops.reshape(weights, (-1,) + (1,) * (len(output.shape) - 1))",
        "scale = ops.reshape(ops.flip(weights, 0), (-1,) + (1,) * (len(output.shape) - 1))",
        ("tests/library/test_model.py::test_fit_update_equals_per_example_mix",),
    ),
    Mutation(
        "step_weights_reused",
        "every step draws the weights of raw step 0",
        "tf_gradmix/optimizer.py",
        "return read(self._seed_variable), read(self._iterations) if step is None else step",
        "return read(self._seed_variable), 0 * read(self._iterations) if step is None else step",
        ("tests/library/test_model.py::test_weights_are_redrawn_every_step",),
    ),
    Mutation(
        "accumulation_counter",
        "the raw counter advances twice on an accumulation update step (across replicas)",
        "tf_gradmix/backend/tensorflow/optimizer.py",
        "counter.assign_add(1 - tf.cast(is_update, counter.dtype))",
        "counter.assign_add(1)",
        ("tests/library/test_accumulation.py::test_gradient_accumulation_across_replicas",),
    ),
    Mutation(
        "lamb_trust_ratio",
        "LAMB's trust ratio norm(w) / norm(r) becomes norm(w) / norm(w) (= 1)",
        "tf_gradmix/optimizers/lamb.py",
        "trust = trust_ratio(w_norm, r_norm, r_norm)",
        "trust = trust_ratio(w_norm, r_norm, w_norm)",
        ("tests/library/optimizers/test_lamb.py::test_matches_numpy_reference",),
    ),
    Mutation(
        "exclusion_pattern",
        "exclusion patterns anchored at the start of the path (`re.match` for `re.search`)",
        "tf_gradmix/optimizers/layerwise.py",
        "return any(re.search(pattern, path) is not None for pattern in patterns)",
        "return any(re.match(pattern, path) is not None for pattern in patterns)",
        ("tests/library/optimizers/test_lamb.py::test_keras_golden_weight_decay_exclusions",
         "tests/library/optimizers/test_lars.py::test_matches_numpy_reference"),
    ),
    Mutation(
        "seed_restore",
        "the seed variable is left out of the optimizer's variables (saved state)",
        "tf_gradmix/optimizer.py",
        "return self._variables + self.inner_optimizer.variables",
        "return [v for v in self._variables if v is not self._seed_variable] + self.inner_optimizer.variables",
        ("tests/library/test_model.py::test_default_seed_survives_backup_and_restore",
         "tests/library/test_model.py::test_default_seed_survives_a_keras_file"),
    ),
    Mutation(
        "device_weight_replica_index",
        "every replica applies device weight w_0 (replica index dropped)",
        "tf_gradmix/optimizer.py",
        "weight = self.device_weights()[module.replica_id()]",
        "weight = self.device_weights()[0]",
        ("tests/library/test_optimizer.py::test_device_level_update_is_the_replica_mix",),
    ),
    Mutation(
        "stddev_zero_path",
        "`stddev=0` read as unset (`or DEFAULT_STDDEV`): no plain-training path",
        "tf_gradmix/optimizer.py",
        'stddev = validation.number("stddev", stddev, low=0.0, error=TypeError)',
        'stddev = validation.number("stddev", stddev, low=0.0, error=TypeError) or DEFAULT_STDDEV',
        ("tests/library/test_model.py::test_stddev_zero_reproduces_plain_training_bit_for_bit",),
    ),
    Mutation(
        "gamma_metric",
        "the logged gamma is mean(w), not mean(w^2)",
        "tf_gradmix/optimizer.py",
        "self.gamma_metric.update_state(noise_lib.gamma(weights))",
        "self.gamma_metric.update_state(keras.ops.mean(weights))",
        ("tests/library/test_model.py::test_logged_loss_is_the_plain_loss_and_gamma_the_mean_of_w_squared",),
    ),
    Mutation(
        "masked_token_weighting",
        "the mixed output loses its padding mask (masked tokens weighted)",
        "tf_gradmix/backend/tensorflow/__init__.py",
        "        _keras.set_keras_mask(result, mask)",
        "        pass",
        ("tests/library/test_model.py::test_masked_sequence_loss_mixes_whole_sequences",
         "tests/library/test_keras_patterns.py::test_padding_mask_and_ignore_class_weight_whole_sequences"),
    ),
    Mutation(
        "xla_step",
        "a jit-compiled (XLA) step draws the previous raw step's weights",
        "tf_gradmix/optimizer.py",
        "return read(self._seed_variable), read(self._iterations) if step is None else step",
        "return read(self._seed_variable), read(self._iterations) - 1 if step is None else step",
        ("tests/library/test_jit_compile.py",),
    ),
    Mutation(
        "multi_worker_workaround",
        "the multi-worker fit workaround no longer gives logs a leading axis",
        "tf_gradmix/backend/tensorflow/trainer.py",
        "lambda v: tf.expand_dims(v, 0) if isinstance(v, tf.Tensor) else v, logs",
        "lambda v: v, logs",
        ("tests/library/test_distribute.py::test_multi_worker_fit_equals_global_batch_mix",),
    ),
    Mutation(
        "jax_shard_index",
        "JAX device level: example b gets the weight of shard b mod K, not of its shard",
        "tf_gradmix/noise.py",
        'shard = (ops.arange(batch_size, dtype="int32") * num_shards) // batch_size',
        'shard = ops.arange(batch_size, dtype="int32") % num_shards',
        ("tests/library/backend/test_jax.py::test_data_parallel_device_level_weights_each_shard",),
        backend="jax",
    ),
]


def copy_repository(destination):
    for name in COPIED:
        source = os.path.join(ROOT, name)
        if os.path.isdir(source):
            shutil.copytree(source, os.path.join(destination, name),
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "runs"))
        elif os.path.exists(source):
            shutil.copy2(source, os.path.join(destination, name))


def mutate(copy, mutation):
    """Applies the mutation in ``copy``; returns its 1-based line number."""
    path = os.path.join(copy, mutation.path)
    with open(path) as f:
        text = f.read()
    count = text.count(mutation.old)
    if count != 1:
        raise LookupError(f"{mutation.path}: the target line occurs {count} times (expected once): {mutation.old!r}")
    line = text[: text.index(mutation.old)].count("\n") + 1
    with open(path, "w") as f:
        f.write(text.replace(mutation.old, mutation.new))
    return line


def run_tests(copy, mutation, report):
    env = dict(os.environ, KERAS_BACKEND=mutation.backend, PYTHONPATH=copy, TF_CPP_MIN_LOG_LEVEL="2")
    # conftest.py finds the real data beside the repository; the copy is elsewhere.
    shared = os.path.join(os.path.dirname(ROOT), "shared", "data")
    if "TF_GRADMIX_DATA" not in env and os.path.isdir(shared):
        env["TF_GRADMIX_DATA"] = shared
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
               *mutation.tests]
    process = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True)
    failed = []
    if os.path.exists(report):
        for case in ElementTree.parse(report).getroot().iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname').rsplit('.', 1)[-1]}.py::{case.get('name')}")
    return process.returncode, failed, process.stdout[-3000:] + process.stderr[-3000:]


def check_targets(mutations):
    """Prints each mutation whose file, target text (exactly once) or test file is missing; 1 if any."""
    problems = []
    for mutation in mutations:
        path = os.path.join(ROOT, mutation.path)
        if not os.path.isfile(path):
            problems.append(f"{mutation.name}: no file {mutation.path}")
            continue
        with open(path) as f:
            text = f.read()
        count = text.count(mutation.old)
        if count != 1:
            problems.append(f"{mutation.name}: {mutation.path} holds the target text {count} times (expected once)")
        else:
            print(f"{mutation.name}: {mutation.path}:{text[: text.index(mutation.old)].count(chr(10)) + 1}")
        for test in mutation.tests:
            if not os.path.exists(os.path.join(ROOT, test.split("::")[0])):
                problems.append(f"{mutation.name}: no test file {test.split('::')[0]}")
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{len(mutations) - len({p.split(':')[0] for p in problems})} of {len(mutations)} mutations apply")
    return 1 if problems else 0


def check(mutation, baseline):
    with tempfile.TemporaryDirectory(prefix="tf_gradmix-mutant-") as copy:
        copy_repository(copy)
        if baseline:
            status, failed, output = run_tests(copy, mutation, os.path.join(copy, "baseline.xml"))
            if status != 0:
                return {"error": f"the tests fail without the mutation (pytest exit {status}): {failed}\n{output}"}
        line = mutate(copy, mutation)
        status, failed, output = run_tests(copy, mutation, os.path.join(copy, "mutant.xml"))
    return {"line": line, "status": status, "failed": failed, "output": output}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--check", action="store_true",
                        help="check that each mutation's file, target text (once) and test files exist; run nothing")
    parser.add_argument("--no-baseline", action="store_true", help="do not run each mutation's tests unmutated first")
    args = parser.parse_args(argv)
    by_name = {m.name: m for m in MUTATIONS}
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name}: {m.what} ({m.path}; {m.backend})")
        return 0
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        parser.error(f"unknown mutation(s) {unknown}; --list lists them")
    selected = [by_name[n] for n in args.names] if args.names else MUTATIONS
    if args.check:
        return check_targets(selected)
    # SIGTERM unwinds like Ctrl-C: the running pytest is killed and the copy removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print("| mutation | file:line | backend | caught by (failing tests) |")
    print("|---|---|---|---|", flush=True)
    missed = []
    for mutation in selected:
        start = time.monotonic()
        try:
            result = check(mutation, baseline=not args.no_baseline)
        except LookupError as error:
            result = {"error": str(error)}
        seconds = time.monotonic() - start
        if "error" in result:
            missed.append(mutation.name)
            print(f"{mutation.name}: ERROR {result['error']}", file=sys.stderr, flush=True)
            print(f"| `{mutation.name}`: {mutation.what} | `{mutation.path}` | {mutation.backend} | "
                  "**error** (see stderr) |", flush=True)
            continue
        caught = result["status"] != 0
        if not caught:
            missed.append(mutation.name)
        if caught and not result["failed"]:
            # Collection or import failed: no test ran.
            caught_by = f"pytest exit {result['status']} before any test ran"
            print(f"{mutation.name}:\n{result['output']}", file=sys.stderr, flush=True)
        else:
            caught_by = ", ".join(f"`{t}`" for t in result["failed"]) if caught else "**not caught**"
        print(f"| `{mutation.name}`: {mutation.what} | `{mutation.path}:{result['line']}` | {mutation.backend} "
              f"| {caught_by} |", flush=True)
        print(f"{mutation.name}: {'caught' if caught else 'NOT CAUGHT'} in {seconds:.0f} s", file=sys.stderr,
              flush=True)
    if missed:
        print(f"\nnot caught or not applied: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
