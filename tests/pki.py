"""Test certificates made with the ``openssl`` command: two CAs, node certificates, an expired one."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

OPENSSL = "/usr/bin/openssl"
HAVE_OPENSSL = os.path.exists(OPENSSL)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True)


def _ec_key_args() -> list[str]:
    return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def new_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", *_ec_key_args(), "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-days", "30", "-subj", f"/CN={name}", cwd=d)


def new_cert(d: Path, name: str, ca: str, days: int) -> None:
    """``name``.pem and .key, signed by ``ca``; ``days=-1`` makes one that expired yesterday."""
    _openssl("req", *_ec_key_args(), "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
             cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", str(days), cwd=d)
    os.chmod(d / f"{name}.key", 0o600)


def make_pki(d: Path) -> Path:
    """In ``d``: CA ``ca`` with ``primary``, ``secondary`` and ``expired``; CA ``other-ca`` with ``stranger``."""
    d.mkdir(parents=True, exist_ok=True)
    new_ca(d, "ca")
    new_ca(d, "other-ca")
    new_cert(d, "primary", "ca", 30)
    new_cert(d, "secondary", "ca", 30)
    new_cert(d, "stranger", "other-ca", 30)
    new_cert(d, "expired", "ca", -1)
    return d


def tls_options(d: Path, node: str, ca: str = "ca") -> list[str]:
    """The mount options of ``node``'s certificate and the CA it trusts."""
    return ["--tls-cert", str(d / f"{node}.pem"), "--tls-key", str(d / f"{node}.key"), "--tls-ca", str(d / f"{ca}.pem")]
