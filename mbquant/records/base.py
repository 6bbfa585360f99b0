"""What every record shares: reading a JSON file within bounds, typed field access that names the file, the key,
the value and the fix on any problem, and the format/version header.

A record file is a JSON object whose ``format`` is ``"<kind>/<version>"`` (``mbquant-report/2``). A reader accepts
the versions it lists in ``READS`` (files of format 1, written before the records module, carry no ``format`` or
the old one and are read where their fields suffice) and refuses anything else with the command that writes a
current one. Nothing here imports torch.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, TypeVar

from ..errors import DataError

MAX_FILE_BYTES = 64 << 20           # no record mbquant writes comes near this; larger files are refused unread
MAX_TEXT = 100_000                  # characters in one string value
MAX_ITEMS = 1_000_000               # elements in one list
MAX_DEPTH = 32                      # nesting of free-form JSON sections

T = TypeVar("T")


class RecordError(DataError):
    """A file mbquant reads is missing, malformed, or holds a value that cannot be right."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def read_json(path: Path | str, what: str, fix: str) -> Any:
    """The JSON value in ``path``: refused when absent, larger than :data:`MAX_FILE_BYTES`, not UTF-8 JSON, or
    holding NaN/Infinity literals."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{what} '{path}' does not exist" + (" (it is a folder)" if path.is_dir() else "")
                          + f"; {fix}")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise RecordError(f"{what} '{path}' is {size:,} bytes, more than any mbquant record ({MAX_FILE_BYTES:,}); "
                          f"{fix}")
    try:
        return json.loads(path.read_bytes().decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RecordError(f"{what} '{path}' is not valid JSON ({str(exc)[:160]}); {fix}") from exc


def check_json(value: Any, where: str, depth: int = 0) -> Any:
    """A free-form JSON value, bounded: finite numbers, strings and lists within bounds, limited nesting."""
    if depth > MAX_DEPTH:
        raise RecordError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise RecordError(f"{where}: {value!r} is not a finite number")
        return value
    if isinstance(value, str):
        if len(value) > MAX_TEXT:
            raise RecordError(f"{where}: a string of {len(value):,} characters (at most {MAX_TEXT:,})")
        return value
    if isinstance(value, list):
        if len(value) > MAX_ITEMS:
            raise RecordError(f"{where}: a list of {len(value):,} items (at most {MAX_ITEMS:,})")
        return [check_json(v, where, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): check_json(v, f"{where}.{k}", depth + 1) for k, v in value.items()}
    raise RecordError(f"{where}: {type(value).__name__} is not a JSON value")


class Fields:
    """Typed access to one JSON object of a record. Every problem raises :class:`RecordError` naming the file,
    the key (dotted), the value and the fix."""

    def __init__(self, data: Any, source: str, fix: str, prefix: str = ""):
        self.source, self.fix, self.prefix = source, fix, prefix
        if not isinstance(data, dict):
            raise RecordError(f"{source}: {prefix or 'the file'} is {type(data).__name__} {_show(data)}, expected a "
                              f"JSON object; {fix}")
        self.data = data

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, value: Any, expected: str) -> RecordError:
        return RecordError(f"{self.source}: '{self.key(name)}' is {_show(value)}, expected {expected}; {self.fix}")

    def has(self, name: str) -> bool:
        return name in self.data and self.data[name] is not None

    def _get(self, name: str, optional: bool, expected: str) -> Any:
        if name not in self.data or self.data[name] is None:
            if optional:
                return None
            raise RecordError(f"{self.source}: '{self.key(name)}' is missing ({expected}); {self.fix}")
        return self.data[name]

    def str(self, name: str, *, optional: bool = False, choices: Iterable[str] | None = None,
            max_len: int = MAX_TEXT, nonempty: bool = False) -> Any:
        choices = tuple(choices) if choices is not None else None
        expected = f"one of {', '.join(choices)}" if choices else "a string"
        v = self._get(name, optional, expected)
        if v is None:
            return None
        if not isinstance(v, str) or len(v) > max_len or (nonempty and not v) or (choices and v not in choices):
            raise self.error(name, v, expected + (f" of at most {max_len:,} characters" if isinstance(v, str)
                                                  and len(v) > max_len else ""))
        return v

    def number(self, name: str, *, optional: bool = False, lo: float | None = None, hi: float | None = None,
               integer: bool = False) -> Any:
        kind = "an integer" if integer else "a finite number"
        rng = f" in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]" if lo is not None or \
            hi is not None else ""
        v = self._get(name, optional, kind + rng)
        if v is None:
            return None
        ok = isinstance(v, int) if integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok or not math.isfinite(v) or (lo is not None and v < lo) or \
                (hi is not None and v > hi):
            raise self.error(name, v, kind + rng)
        return v

    def int(self, name: str, **kw: Any) -> Any:
        return self.number(name, integer=True, **kw)

    def bool(self, name: str, *, optional: bool = False) -> Any:
        v = self._get(name, optional, "true or false")
        if v is not None and not isinstance(v, bool):
            raise self.error(name, v, "true or false")
        return v

    def list(self, name: str, item: Callable[[Any], bool], expected: str, *, optional: bool = False,
             length: int | None = None, max_items: int = MAX_ITEMS) -> Any:
        what = f"a list of {expected}" + (f" ({length} items)" if length is not None else "")
        v = self._get(name, optional, what)
        if v is None:
            return None
        if not isinstance(v, list) or len(v) > max_items or (length is not None and len(v) != length) \
                or not all(item(x) for x in v):
            raise self.error(name, v, what)
        return v

    def strs(self, name: str, **kw: Any) -> Any:
        return self.list(name, lambda x: isinstance(x, str) and len(x) <= MAX_TEXT, "strings", **kw)

    def numbers(self, name: str, *, positive: bool = False, integer: bool = False, **kw: Any) -> Any:
        def ok(x: Any) -> bool:
            good = isinstance(x, int) if integer else isinstance(x, (int, float))
            return good and not isinstance(x, bool) and math.isfinite(x) and (not positive or x > 0)
        return self.list(name, ok, ("positive " if positive else "finite ") + ("integers" if integer else "numbers"),
                         **kw)

    def sub(self, name: str, *, optional: bool = False) -> Any:
        v = self._get(name, optional, "a JSON object")
        if v is None:
            return None
        if not isinstance(v, dict):
            raise self.error(name, v, "a JSON object")
        return Fields(v, self.source, self.fix, self.key(name))

    def subs(self, name: str, *, optional: bool = False, max_items: int = MAX_ITEMS) -> Any:
        v = self.list(name, lambda x: isinstance(x, dict), "JSON objects", optional=optional, max_items=max_items)
        if v is None:
            return None
        return [Fields(x, self.source, self.fix, f"{self.key(name)}[{i}]") for i, x in enumerate(v)]

    def json(self, name: str, *, optional: bool = False, default: Any = None) -> Any:
        """A free-form (bounded) JSON value."""
        if name not in self.data:
            if optional:
                return default
            raise RecordError(f"{self.source}: '{self.key(name)}' is missing; {self.fix}")
        return check_json(self.data[name], f"{self.source}: '{self.key(name)}'")

    def hexdigest(self, name: str, *, length: int | None = None, optional: bool = False) -> Any:
        v = self.str(name, optional=optional)
        if v is None:
            return None
        if (length is not None and len(v) != length) or not v or any(c not in "0123456789abcdef" for c in v):
            raise self.error(name, v, f"a lowercase hex digest" + (f" of {length} characters" if length else ""))
        return v


class Record:
    """Base of the typed, versioned records: ``KIND`` (e.g. ``mbquant-sidecar``), ``VERSION`` written, ``READS``
    versions read, ``WHAT`` (how messages name the file) and ``FIX`` (what to do about a bad one)."""

    KIND: ClassVar[str]
    VERSION: ClassVar[int] = 1
    READS: ClassVar[tuple[int, ...]] = (1,)
    WHAT: ClassVar[str] = "record"
    FIX: ClassVar[str] = "write it again with mbquant"

    @classmethod
    def format(cls) -> str:
        return f"{cls.KIND}/{cls.VERSION}"

    @classmethod
    def version_of(cls, data: Any, source: str) -> int:
        """The format version of a file's data; files without a ``format`` key are version 1."""
        fmt = data.get("format") if isinstance(data, dict) else None
        if fmt is None and 1 in cls.READS and isinstance(data, dict) and cls.unversioned_v1(data):
            return 1
        kind, _, ver = str(fmt).rpartition("/")
        if kind != cls.KIND or not ver.isdigit():
            raise RecordError(f"{source} is not {cls.WHAT_ARTICLE()} {cls.WHAT} (format {_show(fmt)}, expected "
                              f"{cls.format()}); {cls.FIX}")
        if int(ver) not in cls.READS:
            raise RecordError(f"{source} has format {fmt}, which this mbquant does not read (it reads "
                              f"{', '.join(f'{cls.KIND}/{v}' for v in cls.READS)}); {cls.FIX}")
        return int(ver)

    @classmethod
    def unversioned_v1(cls, data: dict) -> bool:
        """Whether a file without ``format`` is a version-1 file of this kind (files of format 1 had none)."""
        return False

    @classmethod
    def WHAT_ARTICLE(cls) -> str:  # noqa: N802 - used inside messages only
        return "an" if cls.WHAT[:1] in "aeiou" else "a"

    @classmethod
    def parse(cls: type[T], data: Any, source: str) -> T:
        """The record from a JSON value read from ``source`` (a path, for messages)."""
        version = cls.version_of(data, source)  # type: ignore[attr-defined]
        return cls.from_fields(Fields(data, source, cls.FIX), version)  # type: ignore[attr-defined]

    @classmethod
    def from_fields(cls: type[T], f: Fields, version: int) -> T:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def document(self) -> dict[str, Any]:
        return {"format": self.format(), **self.to_dict()}

    @classmethod
    def read(cls: type[T], path: Path | str) -> T:
        return cls.parse(read_json(path, cls.WHAT, cls.FIX), f"{cls.WHAT} '{path}'")  # type: ignore[attr-defined]

    def write(self, path: Path | str) -> Path:
        from ..atomic import write_json

        return write_json(Path(path), self.document())
