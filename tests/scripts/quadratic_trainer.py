"""A trainer for the runner's tests: gradient descent on ``(w - target)^2``, in milliseconds.

It follows the trainers' contract (a ``Config``, ``run(config) -> dict``, the
result as the last line of standard output) and lets a test see and steer
each process: ``--log`` gets one line per start, ``--gate`` makes the run
wait while that file exists, ``--rendezvous`` makes it wait until
``--rendezvous-count`` runs have started, ``--fail`` exits with an error.

    python -m tests.scripts.quadratic_trainer --target 2 --steps 10
"""

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from examples.config import config_from_argv, option


@dataclasses.dataclass(frozen=True)
class Config:
    target: float = option(1.0, help="the minimum of (w - target)^2")
    lr: float = option(0.1, help="step size")
    steps: int = option(20, help="gradient steps from w = 0")
    fail: bool = option(False, help="exit with status 3 after starting")
    log: Optional[str] = option(None, affects_result=False, help="append a line per start here")
    gate: Optional[str] = option(None, affects_result=False, help="wait while this file exists")
    rendezvous: Optional[str] = option(None, affects_result=False, help="folder: wait for the other runs here")
    rendezvous_count: int = option(2, affects_result=False)
    threads: Optional[int] = option(None, affects_result=False, help="recorded only")

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"--steps must be non-negative, got {self.steps}")


def _wait(condition, what, seconds=120):
    deadline = time.time() + seconds
    while not condition():
        if time.time() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def run(config):
    if config.log:
        with open(config.log, "a") as f:
            f.write(json.dumps({"target": config.target, "pid": os.getpid()}) + "\n")
    if config.rendezvous:
        Path(config.rendezvous, str(os.getpid())).touch()
        _wait(lambda: len(os.listdir(config.rendezvous)) >= config.rendezvous_count, "the other runs")
    if config.gate:
        _wait(lambda: not os.path.exists(config.gate), f"{config.gate} to go")
    if config.fail:
        raise SystemExit(3)
    w = 0.0
    for _ in range(config.steps):
        w -= config.lr * 2 * (w - config.target)
    return {"w": w, "loss": (w - config.target) ** 2, "threads_seen": config.threads}


def main(argv=None):
    print("starting")  # the result is the last line, whatever comes before
    print(json.dumps(run(config_from_argv(Config, sys.argv[1:] if argv is None else argv))))


if __name__ == "__main__":
    main()
