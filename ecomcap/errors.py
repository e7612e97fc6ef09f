"""One exception type for problems a user can fix: the CLI prints its message, no traceback."""


class EcomcapError(Exception):
    """Bad input, unusable source, failed gate: a one-line, actionable message."""
