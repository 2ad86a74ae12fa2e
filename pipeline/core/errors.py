"""The one exception type for errors a user can cause; the CLI prints its message as one line."""


class PipelineError(Exception):
    """Something the user can fix: a missing folder, bad data, a model that does not fit."""


class TrainingInterrupted(PipelineError):
    """Ctrl-C (or SIGTERM) during training; the best model so far was saved."""

    exit_code = 130
