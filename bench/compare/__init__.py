"""Side-by-side comparison of colofs with the pyfuse3 floor, QEMU's block replication and a raw file, in one run.

``python -m bench.compare`` (see ``__main__``); modules: ``runner`` (setup,
the SVM rows, cleanup), ``rows_repl`` (the primary and ingest rows),
``rows_control`` (checkpoint, failover, memory), ``state`` (what a run
holds), ``colofs_pair``, ``qemu_chain``, ``qemu_quorum`` and ``floor`` (the
systems), ``memory`` (peak RSS and PSS), ``fio``, ``workloads`` (the rows),
``report`` (table and JSON), ``qmp`` and ``proc`` (helpers).
"""
