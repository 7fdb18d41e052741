"""Serving each VM from a process of its own: the supervisor, the zygote, the workers and the channel between them."""
