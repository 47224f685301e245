"""What a test does when the real data under ../shared/data is missing.

CI always has the data (a copy of shared/ beside the clone), so there a
missing copy is a failure, never a silent skip. On a developer machine
without it, the test is skipped with the reason.
"""

import os

import pytest


def missing(what):
    message = f"No {what} copy: set TF_GRADMIX_DATA or provide ../shared/data"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI must have the real data)")
    pytest.skip(message)
