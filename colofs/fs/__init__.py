"""The FUSE face of colofs: ``MOUNTPOINT/VM/DISK.raw`` served from a store.

``daemon`` runs a mount (one process per store), ``operations`` adapts pyfuse3
requests to the core, ``inodes`` numbers the tree, ``control`` answers the
``user.colofs.*`` extended attributes that ``mountctl`` drives (``vmcontrol``:
checkpoint, failover and mode; ``snapshots``: snapshots and clones;
``values``: parsing their values), ``replication`` runs the replication
engine inside the daemon, ``pagecache`` keeps the kernel's cache in step
with checkpoints, and ``errnos`` decides what each failure looks like to a
client.
"""
