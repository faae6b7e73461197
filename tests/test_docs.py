"""The documentation covers what the code offers: every config key, command and option
appears in the man pages, and the pages render without a warning."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from smarthost import config
from smarthost.cli import build_parser
from smarthost.sendmail import _IGNORED

MAN = Path(__file__).resolve().parent.parent / "man"


def page(name: str) -> str:
    """A man page's text with roff escapes for '-' and fonts removed."""
    text = (MAN / name).read_text()
    return re.sub(r"\\f[BIRP]|\\&", "", text).replace("\\-", "-").replace("\\(em", "-")


def config_keys() -> list[str]:
    keys = [f"[{table}]" for table in config._TABLES]
    keys += [f"[[{array}]]" for array in config._ARRAYS]
    tables = [config._TOP, config._BACKEND, config._ROUTE]
    tables += [schema for schema, _ in config._TABLES.values()]
    for table in tables:
        keys += list(table)
    return sorted(set(keys))


@pytest.mark.parametrize("key", config_keys())
def test_every_config_key_is_in_smarthost_toml_5(key):
    assert re.search(rf"(^|[^\w]){re.escape(key)}($|[^\w])", page("smarthost.toml.5"), re.M), key


def commands() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    names = list(sub.choices)
    queue = sub.choices["queue"]
    actions = next(a for a in queue._actions if a.dest == "action")
    return names + [f"queue {name}" for name in actions.choices]


@pytest.mark.parametrize("command", commands())
def test_every_command_is_in_smarthost_8(command):
    text = " ".join(page("smarthost.8").split())
    assert command in text, command


@pytest.mark.parametrize(
    "option", ["-C", "-t", "-i", "-oi", "-f", "-F", "-v", "--", *sorted(_IGNORED)]
)
def test_every_sendmail_option_is_in_smarthost_sendmail_8(option):
    assert option in page("smarthost-sendmail.8"), option


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
@pytest.mark.parametrize("name", ["smarthost.8", "smarthost-sendmail.8", "smarthost.toml.5"])
def test_man_pages_render_without_warnings(name):
    done = subprocess.run(
        ["groff", "-man", "-ww", "-z", str(MAN / name)],
        capture_output=True,
        text=True,
        env={"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr


EXAMPLES = sorted((MAN.parent / "examples").rglob("*.toml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_config_is_valid(path):
    loaded = config.load_config(path)
    assert loaded.backends, path
