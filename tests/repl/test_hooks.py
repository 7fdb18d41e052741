"""What a mount plugs into the engine: the secondary's checkpoint, new disks, closing a VM for failover."""

from __future__ import annotations

from colofs.core.vm import VM
from colofs.repl import SecondaryHooks
from colofs.repl.errors import ReplCode
from tests.repl.conftest import wait_until

SIZE = 256 << 10


async def test_the_checkpoint_hook_runs_the_whole_checkpoint(pair) -> None:
    calls: list[tuple[str, int, int]] = []
    added: list[tuple[str, str]] = []

    async def checkpoint(vm: VM, seq: int) -> None:
        before = vm.state.last_checkpoint
        await vm.checkpoint(seq)
        calls.append((vm.name, seq, before))

    async def disk_added(vm: str, disk: str) -> None:
        added.append((vm, disk))

    await pair.open_stores()
    await pair.primary.create_disk("vm", "d0", SIZE)
    await pair.start_secondary(hooks=SecondaryHooks(take_checkpoint=checkpoint, on_disk_added=disk_added))
    await pair.start_primary()
    pvm = pair.primary.vm("vm")
    await pvm.disk("d0").write(0, b"a" * 5000)
    res = await pair.link("vm").replicate_checkpoint()
    assert calls == [("vm", res.seq, 0)]
    assert pair.secondary.vm("vm").state.last_checkpoint == res.seq
    # A disk created on the primary is announced at once, before any write to it.
    await pair.primary.create_disk("vm", "d1", SIZE)
    pair.repl.attach_vm("vm")
    await wait_until(lambda: ("vm", "d1") in added, what="the new disk on the secondary")
    assert pair.secondary.vm("vm").disk("d1").size == SIZE
    await pair.assert_identical()


async def test_exclusive_closes_the_session_and_holds_off_the_primary(pair, caplog) -> None:
    await pair.open_stores()
    await pair.primary.create_disk("vm", "d0", SIZE)
    await pair.start_secondary()
    await pair.start_primary()
    await pair.link("vm").replicate_checkpoint()
    link = pair.link()
    svm = pair.secondary.vm("vm")
    async with pair.server.exclusive("vm", "VM vm fails over", ReplCode.FAILED_OVER):
        assert "vm" not in pair.server.sessions
        await pair.primary.vm("vm").disk("d0").write(0, b"after the session closed")
        await svm.failover()
    await wait_until(lambda: link.state == "refused", what="the old primary to be refused")
    assert "has failed over" in (link.last_error or "")
    assert bytes(await svm.disk("d0").read(0, 24)) == bytes(24), "no primary write after the close"
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "closing the session of primary" in text and "VM vm fails over (error 101)" in text
