"""The exceptions the CLI turns into one line: MiniLlamaError for mistakes a user can fix (bad flags, files,
configs), exit code 2; TrainingStopped for a run ended by a signal, exit code 128 + the signal's number.
Anything else is a bug and keeps its traceback.
"""

import signal
import string
from pathlib import Path


class MiniLlamaError(Exception):
    """A problem with the user's input, with a message that says what is wrong and how to fix it."""


class ArgumentError(MiniLlamaError):
    """A bad argument to a library function. The template names arguments as {parameter} fields and holds `values`
    as other fields: a Python caller reads the parameters' names (`shard_tokens is 0`), while the CLI names the
    flags that set them (`--shard-tokens is 0`), since that is what its user typed."""

    def __init__(self, template: str, **values: object):
        self.template, self.values = template, values
        super().__init__(self.naming({}))

    def naming(self, flags: dict[str, str]) -> str:
        """The message with each argument named as `flags` maps it ({parameter: flag}), else by its parameter name."""
        arguments = {field for _, field, _, _ in string.Formatter().parse(self.template) if field and field not in self.values}
        return self.template.format(**{name: flags.get(name, name) for name in arguments}, **self.values)


class TrainingStopped(Exception):
    """The run ended early on a signal, after saving a checkpoint of its last finished step."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        done = f"steps 0 to {step - 1:,}" if step else "no step"
        super().__init__(f"stopped by {signal.Signals(signum).name} after {step:,} steps ({done}, as the log numbers them); "
                         f"saved {checkpoint}; run the same command to resume")
        self.signum = signum
