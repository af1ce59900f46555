"""Errors a user can act on. Every layer raises these; only the consoles turn them into one line and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: printed as one line `infalign <cmd>: error: ...`, exit code 2."""
