"""The exceptions the CLI turns into one line: MiniLlamaError for mistakes a user can fix (bad flags, files,
configs), exit code 2; TrainingStopped for a run ended by a signal, exit code 128 + the signal's number.
Anything else is a bug and keeps its traceback.
"""

import signal
from pathlib import Path


class MiniLlamaError(Exception):
    """A problem with the user's input, with a message that says what is wrong and how to fix it."""


class TrainingStopped(Exception):
    """The run ended early on a signal, after saving a checkpoint of its last finished step."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step:,}; saved {checkpoint}; "
                         "run the same command to resume")
        self.signum = signum
