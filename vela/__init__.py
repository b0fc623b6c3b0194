"""Vela on Ray: the server + worker queue mode of the Vela CI system on Ray."""

__version__ = "0.1.0"
