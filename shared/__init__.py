"""Baton's shared library: settings, auth, errors, logging, metrics, clients."""

__version__ = "0.1.0"
