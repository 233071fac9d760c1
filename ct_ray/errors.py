"""User-facing errors: raised for bad input, shown by the CLI as one line with a non-zero exit."""


class CTRayError(Exception):
    """A problem with the user's input or environment (not a bug in ct_ray)."""


class ModelError(CTRayError):
    pass


class CLTError(CTRayError):
    pass


class PromptError(CTRayError):
    pass


class StorageError(CTRayError):
    pass


def one_line(e: BaseException, limit: int = 500) -> str:
    """An exception as the one line the CLI prints: its message's first line (its type when it has none)."""
    s = str(e).strip()
    return s.splitlines()[0][:limit] if s else type(e).__name__
