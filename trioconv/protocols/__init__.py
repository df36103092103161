"""Transports: where the bytes of an image live (local files, memory, later the network)."""
