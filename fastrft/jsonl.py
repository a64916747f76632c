"""JSON-lines files: one JSON object per line, blank lines skipped, errors naming the file and the line; and what
JSON can hold of a record (json_safe), and which of its values are numbers (finite_number)."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path


def read_jsonl(path, torn_end_ok: bool = False) -> list[tuple[int, dict]]:
    """(1-based line number, object) for each non-blank line of path. torn_end_ok: a last line that is no JSON
    object (a crash or a full disk while fastrft appended it) is dropped with a warning, not an error; a bad line
    elsewhere still is one."""
    path = Path(path)
    lines = [(number, raw) for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1) if raw.strip()]
    records = []
    for line_number, raw in lines:
        try:
            record = json.loads(raw.decode("utf-8"))
            if not isinstance(record, dict):
                raise TypeError(f"expected a JSON object, got {type(record).__name__}")
        except (ValueError, TypeError) as e:
            if torn_end_ok and line_number == lines[-1][0]:
                warnings.warn(f"{path}:{line_number}: dropped a torn last line (a crash while it was written): "
                              f"{raw[:60]!r}", stacklevel=2)
                continue
            if isinstance(e, UnicodeDecodeError):
                raise ValueError(f"{path}:{line_number}: not UTF-8 text (byte {e.start} of the line)") from None
            if isinstance(e, json.JSONDecodeError):
                where = " in the middle of the file" if torn_end_ok else ""
                raise ValueError(f"{path}:{line_number}: malformed JSON{where} ({e.msg}): "
                                 f"{raw.decode('utf-8', 'replace').strip()[:80]!r}") from None
            raise ValueError(f"{path}:{line_number}: {e}") from None
        records.append((line_number, record))
    return records


def json_safe(obj):
    """Floats that JSON cannot hold become null; numpy and torch scalars become Python numbers; int keys (steps)
    become strings, as json would make them."""
    if getattr(obj, "ndim", None) == 0 and callable(getattr(obj, "item", None)):   # np.float32(1.0), a 0-d tensor
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def finite_number(value) -> bool:
    """A finite number as a metrics record holds one: not null, not a flag (bool), not NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
