"""Throw-away certificates, made as `make certs SANS=...` makes them (federated/tools/certs.sh), and the
TLS flags of a leader or learner that uses them."""

import subprocess
from pathlib import Path

from tests.support.processes import ROOT

TOKEN = "s3cret-token"  # the shared secret of the tests that require one


def make_certs(directory: Path, sans: str = "") -> Path:
    """Throw-away certificates in directory, as `make certs SANS=...` makes them (certs.sh), also naming sans
    (e.g. "IP:10.47.0.1,IP:10.47.0.2")."""
    subprocess.run(
        ["bash", str(ROOT / "federated" / "tools" / "certs.sh"), str(directory), sans],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return directory


def tls_flags(certs: Path, name: str) -> list[str]:
    """The TLS flags of a leader or learner (name) with certificates from make_certs: mutual TLS."""
    return [
        "--tls-cert",
        str(certs / f"{name}.pem"),
        "--tls-key",
        str(certs / f"{name}.key"),
        "--tls-ca",
        str(certs / "ca.pem"),
    ]
