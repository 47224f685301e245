"""tf_gradmix: GradientMix regularization for large-batch training in Keras 3."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'__version__ = "([^"]+)"', (HERE / "tf_gradmix" / "__init__.py").read_text()
).group(1)

setup(
    name="tf_gradmix",
    version=VERSION,
    description=(
        "GradientMix for Keras 3 / TensorFlow: mix per-example or per-replica "
        "gradients with random weights for better large-batch generalization; "
        "LARS and LAMB for Keras 3."
    ),
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["tf_gradmix", "tf_gradmix.*"]),
    python_requires=">=3.10",
    # Any TensorFlow build (CPU, GPU, TPU): the package must not force the
    # CPU wheel on accelerator users. CI pins tensorflow-cpu in
    # requirements/ci.txt. Only the Keras range we test is declared.
    install_requires=["keras>=3.15,<3.16", "numpy"],
    extras_require={
        "cpu": ["tensorflow-cpu>=2.21,<2.22"],
        "gpu": ["tensorflow>=2.21,<2.22"],
        "examples": ["tensorflow-datasets", "matplotlib", "sacrebleu"],
    },
    license="Apache-2.0",
)
