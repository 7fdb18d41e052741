"""mountctl: the command-line client that mounts and controls colofs."""
