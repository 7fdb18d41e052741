"""An NBD server over the core: disks, snapshots and clones of the store served to QEMU and NBD tools."""
