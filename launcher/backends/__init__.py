"""Backends (local, sky, ssh) implement `launcher.backends.base.Backend`; verbs don't know which."""
