"""The run directory and the machine-readable results written into it."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import math
import platform
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pandas as pd

from interp.errors import UserError

_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def sanitize_name(name: str) -> str:
    """Make `name` safe for a file name: runs of other characters become `_`."""
    return _UNSAFE_NAME_CHARS.sub("_", name).strip("_") or "unnamed"


def prepare_output_dir(
    path: str | Path | None, analysis: str, model_label: str, force: bool = False
) -> Path:
    """Create and return the run directory (default `runs/<analysis>-<model>-<timestamp>`).

    An existing non-empty directory is refused unless `force`; its files are then overwritten, not deleted.
    """
    if path is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{sanitize_name(analysis)}-{sanitize_name(model_label)}-{stamp}"
    else:
        out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(
            f"output directory {out} already exists and is not empty; "
            "pass --force to overwrite its files or choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment_info() -> dict[str, Any]:
    """Versions of Python and the key packages, the platform, and the CUDA device if any."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _package_version("transformers"),
        "transformer_lens": _package_version("transformer-lens"),
        "interp": _package_version("interp"),
        "cuda_available": cuda,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
    }


def to_jsonable(obj: Any) -> Any:
    """Convert `obj` into plain JSON data; NaN and infinities become None.

    Handles dataclasses, enums, dates, Paths, pandas DataFrames (as records) and Series,
    and anything with `.tolist()` (numpy/torch scalars and arrays). Other types raise TypeError.
    """
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(to_jsonable(k)): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, (dt.date, dt.time)):
        return obj.isoformat()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, pd.DataFrame):
        return to_jsonable(obj.to_dict(orient="records"))
    if isinstance(obj, pd.Series):
        return to_jsonable(obj.to_dict())
    if hasattr(obj, "tolist"):
        return to_jsonable(obj.tolist())
    raise TypeError(f"cannot convert {type(obj).__name__} to JSON")


def write_results(
    out_dir: str | Path, results: dict[str, Any], tables: dict[str, pd.DataFrame]
) -> dict[str, Path]:
    """Write `results.json` and one `<name>.csv` per table; return {file name: path}."""
    out = Path(out_dir)
    written: dict[str, Path] = {}
    json_path = out / "results.json"
    text = json.dumps(to_jsonable(results), indent=2, allow_nan=False)
    json_path.write_text(text + "\n", encoding="utf-8")
    written[json_path.name] = json_path
    for name, df in tables.items():
        csv_path = out / f"{sanitize_name(name)}.csv"
        df.to_csv(csv_path, index=not isinstance(df.index, pd.RangeIndex))
        written[csv_path.name] = csv_path
    return written
