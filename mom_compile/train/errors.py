"""The training command's user-facing failure: printed as one `error:` line, no traceback."""


class TrainError(Exception):
    """Bad input or an unusable setup, stated as the argument at fault and what was expected."""


class Interrupted(Exception):
    """Ctrl-C (SIGINT) or SIGTERM during a run; the message says where to resume from."""
