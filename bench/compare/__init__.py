"""Side-by-side comparison of colofs with QEMU's block-replication chain and a raw file, in one run.

``python -m bench.compare`` (see ``__main__``); modules: ``runner`` (the run),
``colofs_pair`` and ``qemu_chain`` (the systems), ``fio``, ``workloads``
(the rows), ``report`` (table and JSON), ``qmp`` and ``proc`` (helpers).
"""
