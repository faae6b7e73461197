"""Packaging for smarthost: a store-and-forward SMTP relay for minimal servers."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / "smarthost" / "__init__.py").read_text(), re.M
).group(1)

setup(
    name="smarthost",
    version=VERSION,
    description="A store-and-forward SMTP relay that never loses an accepted message",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["smarthost", "smarthost.*"]),
    install_requires=[
        "aiosmtpd>=1.4.4,<1.5",  # smtp_server.py relies on its internals: see its tests
        "tenacity>=8.2,<10",  # retry.failover shares one Retrying: see tests/test_retry.py
        "watchdog>=4.0",
        "python-json-logger>=3.1",
        'tomli>=1.1; python_version < "3.11"',
    ],
    extras_require={
        "dev": [
            "pytest>=7",
            "pytest-xdist>=3",
            "ruff",
            "vermin",
            "mypy<2",  # mypy 2 cannot check for Python 3.9 (pyproject.toml: python_version)
            'tomli; python_version >= "3.11"',  # for mypy: config.py's Python 3.9 import
            "trustme",
            "flufl.bounce",
            "hypothesis",
            "redis>=5.0,<8",
            "prometheus_client>=0.17,<1",
        ],
        # Relays sharing provider limits through Redis or Valkey (SPEC §12).
        "fleet": ["redis>=5.0,<8"],
        # Multiprocess mode (PROMETHEUS_MULTIPROC_DIR) and choose_encoder: documented
        # since 0.17; the files' layout changes between versions, so an upper bound.
        "metrics": ["prometheus_client>=0.17,<1"],
    },
    entry_points={
        "console_scripts": [
            "smarthost = smarthost.cli:main",
            "smarthost-sendmail = smarthost.cli:sendmail_main",
        ],
    },
    data_files=[
        ("share/man/man8", ["man/smarthost.8", "man/smarthost-sendmail.8"]),
        ("share/man/man5", ["man/smarthost.toml.5"]),
    ],
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Topic :: Communications :: Email :: Mail Transport Agents",
        "Environment :: No Input/Output (Daemon)",
    ],
)
