"""Who may replicate into a secondary: keys, keyless loopback, reflection, frames before auth, epochs."""

from __future__ import annotations

import logging
import secrets
import struct

import pytest
import trio
import xxhash

from colofs.core import PrimaryWrite
from colofs.core.state import SECONDARY
from colofs.repl import PrimaryReplicator, ReplConfigError, serve_secondary
from colofs.repl.config import require_key_or_loopback
from colofs.wire import FrameStream
from colofs.wire.auth import PROTO_VERSION
from colofs.wire.messages import Attach, DiskInfo, Error, Hello, MessageType, Role
from tests.repl.conftest import wait_until

SIZE = 256 << 10


async def _setup(pair, *, secondary_key: bytes | None | str = "same", primary_key: bytes | None | str = "same"):
    await pair.open_stores()
    await pair.primary.create_disk("vm", "d0", SIZE)
    await pair.primary.vm("vm").disk("d0").write(0, b"secret data")
    await pair.start_secondary(key=secondary_key)
    await pair.start_primary(key=primary_key)
    return pair.link()


def _messages(caplog, logger: str) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(logger))


async def test_right_key_replicates(pair) -> None:
    await _setup(pair)
    await pair.link("vm").replicate_checkpoint()
    await pair.assert_identical()


@pytest.mark.parametrize(
    ("secondary_key", "primary_key", "secondary_says", "primary_says"),
    [
        (b"k" * 32, b"x" * 32, "shared keys differ", "peer rejected our key"),
        (None, b"x" * 32, "this node has none", "peer rejected our key"),
        (b"k" * 32, None, "peer rejected our key", "this node has none"),
    ],
    ids=["wrong-key", "keyed-primary-keyless-secondary", "keyless-primary-keyed-secondary"],
)
async def test_refused_without_the_right_key(pair, caplog, secondary_key, primary_key, secondary_says,
                                             primary_says) -> None:
    caplog.set_level(logging.INFO, logger="colofs")
    link = await _setup(pair, secondary_key=secondary_key, primary_key=primary_key)
    await wait_until(lambda: link.stats["connects"] == 0 and pair.server.stats["refused"] >= 2,
                     what="two refused attempts")
    assert secondary_says in _messages(caplog, "colofs.repl.receiver")
    assert primary_says in (link.last_error or "")
    assert "vm" not in pair.secondary.vms  # nothing created, nothing applied
    # A key mismatch is a refusal: retried slowly, shown as refused between attempts.
    assert link.state in ("refused", "connecting", "attaching")


async def test_keyless_loopback_replicates(pair) -> None:
    await _setup(pair, secondary_key=None, primary_key=None)
    await pair.link("vm").replicate_checkpoint()
    await pair.assert_identical()


async def test_keyless_only_on_loopback(pair) -> None:
    await pair.open_stores()
    for host in ("0.0.0.0", "192.0.2.7", "::"):
        with pytest.raises(ReplConfigError, match="without a shared key"):
            await serve_secondary(pair.secondary, (host, 0), None)
    repl = PrimaryReplicator(pair.primary, ("192.0.2.7", 7789), None)
    with pytest.raises(ReplConfigError, match="--peer 192.0.2.7"):
        await repl.run()
    for host in ("127.0.0.1", "::1", "localhost"):
        await require_key_or_loopback(host, None, "--listen")
    await require_key_or_loopback("192.0.2.7", b"k" * 32, "--listen")


async def _raw(port: int) -> tuple[trio.SocketStream, FrameStream]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    return stream, FrameStream(stream)


async def _closed_with_error(fs: FrameStream) -> Error | None:
    """Read until the peer closes; the ERROR it sent first, if any."""
    err = None
    with trio.fail_after(5):
        try:
            while True:
                msg = await fs.receive()
                if isinstance(msg, Error):
                    err = msg
        except Exception:
            return err


async def test_reflected_challenge_and_frames_before_auth_are_refused(pair, caplog) -> None:
    caplog.set_level(logging.INFO, logger="colofs")
    await pair.open_stores()
    await pair.start_secondary()
    # Frames before the handshake: an ATTACH straight away.
    s1, fs1 = await _raw(pair.port)
    await fs1.send(Attach("vm", 1, 1, (DiskInfo("d0", SIZE, 4096),)))
    err = await _closed_with_error(fs1)
    assert err is not None and "nothing is accepted before the handshake" in err.message
    # Reflection: hand the secondary its own challenge from a parallel connection.
    s2, fs2 = await _raw(pair.port)
    await fs2.send(Hello(PROTO_VERSION, "attacker", Role.PRIMARY, secrets.token_bytes(32), 1))
    theirs = await fs2.receive()
    assert isinstance(theirs, Hello)
    s3, fs3 = await _raw(pair.port)
    await fs3.send(Hello(PROTO_VERSION, "attacker", Role.PRIMARY, theirs.nonce, 1))
    err = await _closed_with_error(fs3)
    assert err is not None and "issued on another connection" in err.message
    # Claiming the secondary's own node id.
    s4, fs4 = await _raw(pair.port)
    await fs4.send(Hello(PROTO_VERSION, pair.secondary.node_id, Role.PRIMARY, secrets.token_bytes(32), 1))
    err = await _closed_with_error(fs4)
    assert err is not None and "our own node id" in err.message
    for s in (s1, s2, s3, s4):
        await s.aclose()
    assert pair.secondary.vms == {}
    text = _messages(caplog, "colofs.repl.receiver")
    # Refusal lines are rate-limited per kind: the first one is logged, later ones counted.
    assert "expected HELLO during authentication, got ATTACH" in text


async def test_stale_epoch_refused_and_newer_epoch_adopted(pair, caplog) -> None:
    caplog.set_level(logging.INFO, logger="colofs")
    await pair.open_stores()
    await pair.primary.create_disk("vm", "d0", SIZE)
    await pair.primary.vm("vm").disk("d0").write(0, b"epoch one")
    # The secondary knows a newer epoch of this VM: a primary with epoch 1 is stale.
    await pair.secondary.create_disk("vm", "d0", SIZE, role=SECONDARY)
    svm = pair.secondary.vm("vm")
    await svm.adopt_epoch(3)
    await pair.start_secondary()
    link = (await pair.start_primary()).links["vm"]
    await wait_until(lambda: link.state == "refused", what="a refusal")
    assert "epoch 1, older than this node's 3" in (link.last_error or "")
    assert svm.state.last_applied == 0 and svm.state.epoch == 3
    assert "older than this node's 3" in _messages(caplog, "colofs.repl.receiver")
    await pair.stop_primary()

    # The reverse: a secondary with an older epoch adopts the primary's and gets a full sync.
    await svm.adopt_epoch(1)  # never lowers
    assert svm.state.epoch == 3
    pvm2 = await pair.primary.create_vm("vm2", role=SECONDARY)
    await pvm2.add_disk("d0", SIZE)
    await pvm2.failover()  # now primary with epoch 2
    assert pvm2.state.epoch == 2
    await pvm2.disk("d0").write(4096, b"new primary")
    await pair.secondary.create_disk("vm2", "d0", SIZE, role=SECONDARY)
    stale = pair.secondary.vm("vm2")
    await stale.apply_primary(1, [PrimaryWrite("d0", 0, b"old")])
    await stale.checkpoint(1)
    await pair.start_primary()
    await pair.link("vm2").replicate_checkpoint()
    assert stale.state.epoch == 2
    await pair.assert_identical("vm2")
    assert pair.repl.status("vm2")["resync"]["full"]


@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "keyless"])
async def test_big_frame_before_authentication_refused_from_its_header(pair, keyed: bool) -> None:
    """A stranger announcing a 32 MiB HELLO is closed on from the 24-byte header: nothing buffered."""
    await pair.open_stores()
    await pair.start_secondary(key="same" if keyed else None)
    stream = await trio.open_tcp_stream("127.0.0.1", pair.port)
    prefix = struct.pack("<4sBBHII", b"COLF", 1, MessageType.HELLO, 0, 32 << 20, 32 << 20)
    await stream.send_all(prefix + struct.pack("<Q", xxhash.xxh3_64_intdigest(prefix)))
    err = await _closed_with_error(FrameStream(stream))  # the payload is never sent
    await stream.aclose()
    assert err is not None and "exceeds the limit of 4096" in err.message
    assert "handshake frames are limited to 4096 bytes" in (pair.server.last_refusal or "")
