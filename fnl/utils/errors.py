"""The one base of every error a user causes (a wrong file, flag or config value).

A command ends on a ``UserError`` with one line naming what to change, exit status 2 (``fnl.cli.common.run_cli``);
any other exception is a bug in fnl and keeps its traceback. Each subclass also derives from the builtin type that
callers of the Python API caught before it existed (``ValueError`` mostly), so ``except ValueError`` still works."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user gave; the message names the file, flag or key and what to do."""


class InvalidArgumentError(UserError, ValueError):
    """A command-line flag or function argument is out of range, or conflicts with another one."""
