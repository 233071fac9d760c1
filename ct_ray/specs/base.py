"""The base of every spec, and how spec files are read: untrusted YAML, one-line errors, the `kind:` key."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import CTRayError


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def digest(self, n: int = 8, **dump) -> str:
        """The first `n` hex digits of a SHA-256 over the spec's JSON (keys sorted; `dump`: model_dump options)."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json", **dump), sort_keys=True).encode()).hexdigest()[:n]

    @classmethod
    def field_default(cls, name: str):
        """The default of field `name`: a setting's one default, which the library's signatures and the CLI's flags
        read instead of repeating it."""
        return cls.model_fields[name].get_default(call_default_factory=True)


def first_error(e: ValidationError, root: str = "spec") -> str:
    """The first of pydantic's errors as 'field.path: message' (`root` when the whole object is at fault)."""
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or root
    return f"{loc}: {err['msg']}"


def parse(spec_cls: type[Spec], data, where: str = "spec", error: type[CTRayError] = CTRayError, root: str = "spec"):
    """`data` validated as `spec_cls`; any problem is one `error` line: 'invalid {where}: field: message'."""
    try:
        return spec_cls.model_validate(data)
    except ValidationError as e:
        raise error(f"invalid {where}: {first_error(e, root)}") from e


MAX_SPEC_BYTES = 4 << 20  # the largest real spec (10^4 inline prompts) is ~1 MB; prompt sets go in prompt files


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader without anchors/aliases: an 851-byte file of nested aliases expands to hundreds of MB ("billion
    laughs"); specs never need them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            ev = self.peek_event()
            raise yaml.YAMLError(f"YAML aliases (*{ev.anchor}) are not allowed in ct_ray files "
                                 f"(line {ev.start_mark.line + 1})")
        return super().compose_node(parent, index)


def safe_yaml(text: str | bytes, where: str):
    """Parse untrusted YAML (or JSON): no aliases, no Python tags, bounded size; one-line `CTRayError` otherwise."""
    if len(text) > MAX_SPEC_BYTES:
        raise CTRayError(f"{where} is too large ({len(text)} bytes > {MAX_SPEC_BYTES})")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise CTRayError(f"{where} is not a UTF-8 text file") from None
    try:
        return yaml.load(text, Loader=_NoAliasLoader)
    except yaml.YAMLError as e:
        raise CTRayError(f"{where} is not valid YAML: {' '.join(str(e).split())[:300]}") from None
    except RecursionError:
        raise CTRayError(f"{where} is nested too deeply") from None


def read_yaml(path: str | Path) -> dict:
    """A spec file's mapping, unvalidated."""
    p = Path(path)
    if not p.is_file():
        raise CTRayError(f"spec file not found: {p}" if not p.exists() else f"spec path is not a file: {p}")
    try:
        size = p.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise CTRayError(f"{p} is too large ({size} bytes > {MAX_SPEC_BYTES})")
        raw = p.read_bytes()
    except OSError as e:
        raise CTRayError(f"cannot read spec file {p}: {e.strerror}") from None
    data = safe_yaml(raw, str(p)) or {}
    if not isinstance(data, dict):
        raise CTRayError(f"{p} must hold a mapping of spec fields")
    return data


def load_yaml(path: str | Path, spec_cls: type[Spec]) -> Spec:
    """A spec file validated as `spec_cls`. An optional top-level `kind:` must name that class (see SPEC_KINDS)."""
    from . import SPEC_KINDS

    p = Path(path)
    data = read_yaml(p)
    kind = data.pop("kind", None)
    if kind is not None and SPEC_KINDS.get(str(kind)) is not spec_cls:
        raise CTRayError(f"{p} is a `kind: {kind}` spec, not a {spec_cls.__name__}")
    return parse(spec_cls, data, where=str(p))
