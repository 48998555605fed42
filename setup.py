"""jmoss: run MOSS (moss-moon-003) and CodeGen models with Jittor on ordinary hardware.

``converters/`` and ``kernels/`` live at the top of the repository but install as
``jmoss.converters`` and ``jmoss.kernels``, so nothing called plain ``converters`` or
``kernels`` lands in site-packages.
"""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "jmoss" / "__init__.py").read_text()).group(1)

# The test references are pinned exactly, in one file that CI installs through this extra.
TEST_REQUIREMENTS = [
    line.split("#", 1)[0].strip()
    for line in (HERE / "tests" / "reference-versions.txt").read_text(encoding="utf-8").splitlines()
    if line.split("#", 1)[0].strip()
]

setup(
    name="jmoss",
    version=VERSION,
    description="A Jittor inference runtime for MOSS and CodeGen: safe conversion, memory-budgeted "
    "execution, chat with plugins, HTTP server",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["jmoss", "jmoss.engine", "jmoss.plugins", "jmoss.server", "jmoss.web", "jmoss.converters", "jmoss.kernels"],
    package_dir={"jmoss": "jmoss", "jmoss.converters": "converters", "jmoss.kernels": "kernels"},
    package_data={"jmoss.kernels": ["*.h", "*.cc", "cpu_kernels/*.h", "cpu_kernels/*.md"], "jmoss": ["data/*"], "jmoss.web": ["*.html", "*.css", "*.js"]},
    install_requires=[
        "jittor==1.3.11.0",
        "numpy>=1.24",
        "tokenizers>=0.15",
        "safetensors>=0.4",
        "huggingface_hub>=0.20",
        "click>=8.1",
        "tqdm>=4.66",
        "sympy>=1.12",
        "psutil>=5.9",
        "xxhash>=4.1",
        "bm25s>=0.2",
        "fastapi>=0.110",  # jmoss serve is a core command, so its stack is in the default install
        "uvicorn>=0.29",
        "prometheus-client>=0.20",  # GET /metrics
        "llguidance>=1.9",  # JSON-schema output and tool_choice: token masks (no Python dependencies, no torch)
        "prompt_toolkit>=3.0.36",  # jmoss chat's prompt: line editing and history
    ],
    extras_require={
        "test": TEST_REQUIREMENTS,
    },
    entry_points={"console_scripts": ["jmoss=jmoss.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
