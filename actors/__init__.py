"""Thin Ray actor shells over the core in :mod:`vela`."""
