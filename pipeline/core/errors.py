"""The one exception type for errors a user can cause; the CLI prints its message as one line.

`full_disk` says what a full disk is, whichever library ran into it.
"""

import errno


class PipelineError(Exception):
    """Something the user can fix: a missing folder, bad data, a model that does not fit."""


class TrainingInterrupted(PipelineError):
    """Ctrl-C (or SIGTERM) during training; the best model so far was saved."""

    exit_code = 130


# A full disk (or quota, or file-size limit) is the user's to fix, whichever library hit it:
# Python's OSError, or TensorFlow's own error types, which carry the system's words.
_FULL = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large",
}


def full_disk(error: BaseException) -> str | None:
    """The one line for an error that is a full disk at bottom (its cause or context
    included), or None. Every artifact is written under a temporary name and swapped in
    only when whole, so what was there before is intact."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        reason = _FULL.get(getattr(error, "errno", None)) if isinstance(error, OSError) else None
        if reason is None and ("No space left on device" in str(error) or "Disk quota exceeded" in str(error)):
            reason = _FULL[errno.ENOSPC] if "No space" in str(error) else _FULL[errno.EDQUOT]
        if reason:
            where = f" writing {error.filename}" if getattr(error, "filename", None) else ""
            return (
                f"{reason}{where}: nothing was replaced, the earlier artifacts are as they were; "
                "free some space (or choose another --out) and run it again"
            )
        error = error.__cause__ or error.__context__
    return None
