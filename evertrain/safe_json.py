"""JSON that every parser reads: no bare NaN or Infinity in what evertrain writes.

Python's json writes float('nan') as `NaN`, which is not JSON (jq, JavaScript, Go and most others
refuse the whole file). `dumps` writes a non-finite number as null and names it in a "nonfinite" list
of its top-level object, so the record stays valid and the fact is not lost:

    {"step": 40, "loss": null, "nonfinite": ["loss"]}
"""

from __future__ import annotations

import json
import math


def finite(obj, path: str = "", found: list[str] | None = None):
    """A copy of `obj` with every non-finite float replaced by None; their dotted paths go to `found`."""
    if isinstance(obj, float) and not math.isfinite(obj):
        if found is not None:
            found.append(path)
        return None
    if isinstance(obj, dict):
        return {k: finite(v, f"{path}.{k}" if path else str(k), found) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v, f"{path}[{i}]", found) for i, v in enumerate(obj)]
    return obj


def dumps(obj, **kwargs) -> str:
    """json.dumps with non-finite numbers as null (listed under "nonfinite" when `obj` is a dict)."""
    found: list[str] = []
    clean = finite(obj, found=found)
    if found and isinstance(clean, dict):
        clean["nonfinite"] = sorted(set(clean.get("nonfinite") or []) | set(found))
    return json.dumps(clean, allow_nan=False, **kwargs)
