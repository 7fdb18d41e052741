"""Each node's handshake challenges live in a registry its builder hands it, not in the process."""

from __future__ import annotations

SIZE = 256 << 10


async def test_two_keyed_nodes_in_one_process_without_given_registries_replicate(pair) -> None:
    """A replicator and a listener built without a registry each own one: their handshake is no reflection.

    With one registry for the whole process, the secondary would find the
    primary's outstanding challenge in it and refuse the handshake.
    """
    pair.primary_nonces = None
    pair.secondary_nonces = None
    await pair.open_stores()
    await pair.primary.create_disk("vm", "d0", SIZE)
    server = await pair.start_secondary()
    repl = await pair.start_primary()
    assert repl.nonces is not server.nonces
    await pair.primary.vm("vm").disk("d0").write(0, b"n" * 5000)
    res = await pair.link("vm").replicate_checkpoint()  # confirmed by the secondary: the keyed session stands
    assert pair.secondary.vm("vm").state.last_checkpoint == res.seq
    await pair.assert_identical()
