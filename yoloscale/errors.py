"""The one exception type for bad user input: the CLI prints its message and exits non-zero, with no traceback."""


class UserError(Exception):
    """A problem the user can fix (a bad config key, a missing file, an existing run directory...).

    The message must name the offending file/key/value and, where possible, what to do instead.
    """


def warn(message: str) -> None:
    """A one-line warning on stderr (rank 0's and every other rank's: they see the same inputs)."""
    import sys

    print(f"yoloscale: warning: {message}", file=sys.stderr, flush=True)
