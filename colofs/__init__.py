"""colofs: block replication for COLO fault-tolerant VM pairs, served over FUSE."""

__version__ = "0.1.0"
