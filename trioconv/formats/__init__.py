"""Image formats: how the bytes of a transport map to a virtual disk."""
