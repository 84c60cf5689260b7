"""tb_nanwatch: see README.md."""

import re
from pathlib import Path

from setuptools import setup

here = Path(__file__).resolve().parent
version = re.search(
    r'__version__ = "([^"]+)"', (here / "tb_nanwatch" / "__init__.py").read_text()
).group(1)

setup(
    name="tb_nanwatch",
    version=version,
    description="Find where TensorFlow training first goes NaN or Inf: a Keras callback, a TensorBoard plugin and a postmortem CLI",
    long_description=(here / "README.md").read_text(encoding="utf-8")
    if (here / "README.md").exists()
    else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # frontend/ lives at the top of the repo and ships inside the package.
    packages=["tb_nanwatch", "tb_nanwatch.watch", "tb_nanwatch.frontend"],
    package_dir={"tb_nanwatch.frontend": "frontend"},
    package_data={"tb_nanwatch": ["http_api.md"], "tb_nanwatch.frontend": ["*.js", "*.css"]},
    # Only the writer needs TensorFlow, and users bring their own build (tensorflow,
    # tensorflow-cpu, a GPU build): never pin it here.  Pillow comes with tensorboard.
    # google-crc32c: the CLI checksums every record of a logdir (C, hardware CRC where the
    # CPU has it; TensorBoard's stub checksums in pure Python at ~6 MB/s).
    install_requires=["tensorboard>=2.16", "numpy", "protobuf", "pillow", "google-crc32c>=1.5"],
    extras_require={"tensorflow": ["tensorflow>=2.16"]},
    entry_points={
        "tensorboard_plugins": ["nanwatch = tb_nanwatch.plugin:NanWatchLoader"],
        "console_scripts": ["tb-nanwatch = tb_nanwatch.cli:main"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
