"""TLS under the frames: a pair with certificates from one CA replicates, and nobody reads the data;
another CA, an expired certificate and a plain-TCP peer are refused, with the reason."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from colofs.repl import ReplConfigError
from colofs.repl.tls import TlsConfig
from tests.pki import HAVE_OPENSSL, make_pki
from tests.repl.conftest import FAST
from tests.repl.proxy import FaultProxy
from tests.waiting import wait_until

SIZE = 256 << 10

pytestmark = pytest.mark.skipif(not HAVE_OPENSSL, reason="needs the openssl command")


@dataclass
class Certs:
    dir: Path

    def tls(self, node: str, ca: str = "ca") -> TlsConfig:
        d = self.dir
        return TlsConfig.load(str(d / f"{node}.pem"), str(d / f"{node}.key"), str(d / f"{ca}.pem"))


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    return Certs(make_pki(tmp_path_factory.mktemp("pki")))


async def _start(pair, secondary_tls: TlsConfig | None, primary_tls: TlsConfig | None,
                 *, tap: bool = False) -> FaultProxy | None:
    pair.cfg = replace(FAST, tls=secondary_tls)
    await pair.open_stores()
    await pair.primary.create_disk("vm", "d0", SIZE)
    await pair.start_secondary()
    proxy = None
    port = pair.port
    if tap:
        proxy = FaultProxy(pair.port, record=True)
        await pair.nursery.start(proxy.run)
        port = proxy.port
    await pair.start_primary(peer_port=port, config=replace(FAST, tls=primary_tls))
    return proxy


@pytest.mark.parametrize("use_tls", [True, False], ids=["tls", "plain-control"])
async def test_tls_pair_replicates_and_nobody_on_the_path_reads_the_data(pair, certs, use_tls) -> None:
    proxy = await _start(pair, certs.tls("secondary") if use_tls else None,
                         certs.tls("primary") if use_tls else None, tap=True)
    secret = os.urandom(8192)  # incompressible: a plaintext BATCH carries it verbatim
    await pair.primary.vm("vm").disk("d0").write(4096, secret)
    await pair.link("vm").replicate_checkpoint()
    await pair.assert_identical()
    assert pair.link().stats["connects"] == 1
    seen = bytes(proxy.recorded)
    assert len(seen) > len(secret)
    if use_tls:
        assert secret[:64] not in seen and b"COLF" not in seen
    else:  # the control: the MAC authenticates, it does not hide
        assert secret[:64] in seen


def _refusals(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "colofs.repl.receiver")


@pytest.mark.parametrize(
    ("secondary", "primary", "secondary_says", "primary_says"),
    [
        ("secondary", "stranger", "refused our certificate", "does not verify against --tls-ca"),
        ("secondary", "expired", "certificate has expired", "refused our certificate"),
        ("secondary", None, "does not speak TLS", ""),
        (None, "primary", "the peer starts TLS", "does not speak TLS"),
    ],
    ids=["other-ca", "expired", "plain-primary", "plain-secondary"],
)
async def test_refused_with_the_reason(pair, certs, caplog, secondary, primary, secondary_says,
                                       primary_says) -> None:
    caplog.set_level(logging.INFO, logger="colofs")
    tls_p = None if primary is None else certs.tls(primary, "other-ca" if primary == "stranger" else "ca")
    await _start(pair, None if secondary is None else certs.tls(secondary), tls_p)
    link = pair.link()
    await wait_until(lambda: pair.server.stats["refused"] >= 1 and link.last_error,
                     60, "a refused attempt on both sides")
    assert link.stats["connects"] == 0
    assert "vm" not in pair.secondary.vms  # nothing created, nothing applied
    assert secondary_says in (pair.server.last_refusal or ""), pair.server.last_refusal
    assert secondary_says in _refusals(caplog)
    assert primary_says in link.last_error, link.last_error


def test_unusable_certificate_files_refused_at_start(certs, tmp_path) -> None:
    d = certs.dir
    with pytest.raises(ReplConfigError, match="--tls-cert .*primary.pem / --tls-key .*secondary.key"):
        TlsConfig.load(str(d / "primary.pem"), str(d / "secondary.key"), str(d / "ca.pem"))
    with pytest.raises(ReplConfigError, match="--tls-ca .*missing.pem"):
        TlsConfig.load(str(d / "primary.pem"), str(d / "primary.key"), str(tmp_path / "missing.pem"))
