"""The line between the in-process tiers and e2e, enforced: a unit or service test that starts a process
fails, saying it belongs in tests/e2e (tests/unit/conftest.py and tests/service/conftest.py apply it)."""

import subprocess

import pytest


def forbid_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """subprocess.run, check_output and the like all start their process through subprocess.Popen.
    (Sockets are not policed: grpcio's are its C core's, out of Python's reach.)"""

    def refused(*args, **kwargs):
        raise AssertionError(
            f"it starts a process ({args[0] if args else kwargs.get('args')}): this test belongs in tests/e2e/"
        )

    monkeypatch.setattr(subprocess, "Popen", refused)
