"""The one exception type for mistakes a user can fix (bad flags, files, configs).

The CLI turns it into a single line and exit code 2; anything else is a bug and keeps its traceback.
"""


class MiniLlamaError(Exception):
    """A problem with the user's input, with a message that says what is wrong and how to fix it."""
