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
    if not s and isinstance(e, TimeoutError):  # fsspec's and botocore's timeouts carry no message
        return f"timed out ({type(e).__name__})"
    return s.splitlines()[0][:limit] if s else type(e).__name__


def finite_float(text, what: str, error: type[Exception] = CTRayError) -> float:
    """`text` as a finite float, or one `error` line naming `what` (CLI flags, query parameters)."""
    import math

    try:
        v = float(text)
    except (TypeError, ValueError):
        raise error(f"bad {what}: {text!r} is not a number") from None
    if not math.isfinite(v):
        raise error(f"bad {what}: {text} is not finite")
    return v
