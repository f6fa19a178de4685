"""The bench's structure, without running a figure: the registry, the command line's choices, the helper
subcommands, results.json's keys, and the results page written from it."""

import subprocess
import sys

from federated.tools.bench import registry
from tests.support.processes import ROOT


def test_an_unknown_helper_subcommand_says_so():
    done = subprocess.run(
        [sys.executable, "bench.py", "_nothing"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1 and "no helper subcommand _nothing" in done.stderr


def test_help_lists_every_setting():
    output = subprocess.run(
        [sys.executable, "bench.py", "--help"], check=True, cwd=ROOT, capture_output=True, text=True, timeout=120
    ).stdout
    assert all(setting.flag in output for setting in registry.SETTINGS)
    assert all(flag in output for flag in ("--out", "--only", "--headline", "--list", "--page"))
