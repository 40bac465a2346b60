"""User-facing errors: one line on stderr and exit code 2, never a traceback."""


class UsageError(Exception):
    """Bad input from the user (flag, path, model); the CLI prints it and exits 2."""
