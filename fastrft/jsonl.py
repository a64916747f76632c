"""JSON-lines files: one JSON object per line, blank lines skipped, errors naming the file and the line; and what
JSON can hold of a record (json_safe), and which of its values are numbers (finite_number)."""
from __future__ import annotations

import json
import math
from pathlib import Path


def read_jsonl(path) -> list[tuple[int, dict]]:
    """(1-based line number, object) for each non-blank line of path."""
    path = Path(path)
    records = []
    with path.open("rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{line_number}: not UTF-8 text (byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: malformed JSON ({e.msg}): {line.strip()[:80]!r}") from e
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
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
