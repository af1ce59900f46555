"""Tiny local models and data for the CPU demo and the tests (built on the spot: no hub download)."""
