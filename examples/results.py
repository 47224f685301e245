"""How the example trainers hand back their result: a JSON file and the last line of stdout.

Sweeps run a trainer as a subprocess and read its result dict from the last
line it prints; the file keeps it beside the run's logs.
"""

import json
import sys
from pathlib import Path

__all__ = ["write_result", "print_result", "fit_verbose", "main"]


def fit_verbose(verbose):
    """Keras fit's ``verbose``: ``verbose`` if given, else a progress bar on a terminal, else a line an epoch."""
    if verbose is not None:
        return verbose
    return 1 if sys.stdout.isatty() else 2


def write_result(result, path):
    """Writes ``result`` (a JSON-ready dict) to the file ``path``, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")


def print_result(result):
    """Prints ``result`` as one JSON line; a trainer's ``main`` does this last, for the sweeps to read."""
    print(json.dumps(result, ensure_ascii=False), flush=True)


def main(run, parse_args, argv=None):
    """A trainer's ``main``: ``run(parse_args(argv))``, its result printed as the last stdout line; returns it."""
    result = run(parse_args(argv))
    print_result(result)
    return result
