import re
import sys

"""The one exception type for bad user input: the CLI prints its message and exits non-zero, with no traceback."""


class UserError(Exception):
    """A problem the user can fix (a bad config key, a missing file, an existing run directory...).

    The message must name the offending file/key/value and, where possible, what to do instead.
    """


def plain(text: str) -> str:
    """Text without terminal colour codes (Ultralytics colours the messages we quote)."""

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def warn(message: str) -> None:
    """A one-line warning on stderr (rank 0's and every other rank's: they see the same inputs)."""

    print(f"yoloscale: warning: {plain(message)}", file=sys.stderr, flush=True)
