"""The one error type for checkpoints that cannot be loaded or written."""


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used: the message names the file, what is wrong
    with it and what to do (often: the previous complete checkpoint to load instead). The CLI
    prints it as one line."""
