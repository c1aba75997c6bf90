"""The run directory and the machine-readable results written into it."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import math
import platform
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pandas as pd

from interp.errors import UserError

_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
STAGES_DIR = "stages"  # the run directory's stored stages (interp.stages), kept with the finished run


def sanitize_name(name: str) -> str:
    """Make `name` safe for a file name: runs of other characters become `_`."""
    return _UNSAFE_NAME_CHARS.sub("_", name).strip("_") or "unnamed"


def prepare_output_dir(
    path: str | Path | None, analysis: str, model_label: str, force: bool = False
) -> Path:
    """Return the run directory (default `runs/<analysis>-<model>-<timestamp>`), checked but not created:
    `write_run` creates it whole at the end, the stored stages (`interp.stages`) go into it as they finish.
    An unfinished run (only stored stages, no results.json) is resumed; any other non-empty directory, a
    finished run included, is refused unless `force` (its stored stages are then still reused)."""
    if path is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{sanitize_name(analysis)}-{sanitize_name(model_label)}-{stamp}"
    else:
        out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a directory; choose another --out")
    entries = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if entries == {STAGES_DIR}:
        print(f"resuming the unfinished run in {out}: its stored stages are reused where their keys match",
              file=sys.stderr)
    elif entries and not force:
        finished = "holds a finished run" if "results.json" in entries else "already exists and is not empty"
        raise UserError(f"output directory {out} {finished}; pass --force to replace it or choose another --out")
    elif path is None:
        print(f"run directory {out} (if the run is interrupted, rerun with --out {out} to resume it)",
              file=sys.stderr)
    return out


def write_run(out_dir: str | Path, result, report) -> Path:
    """Write a finished run atomically: `results.json`, the CSV tables, the result's extra files and
    `report.html` go into a temporary sibling directory, which is then renamed to `out_dir` (an
    existing `out_dir`, allowed by `--force`, is replaced only then). A run killed before this
    leaves nothing that looks complete and nothing that blocks the rerun."""
    import shutil
    import tempfile

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        write_results(tmp, result.to_dict(), result.tables())
        if hasattr(result, "write_extras"):
            result.write_extras(tmp)
        report.write(tmp / "report.html")
        if (out / STAGES_DIR).is_dir():
            (out / STAGES_DIR).rename(tmp / STAGES_DIR)  # the stored stages stay with the run
        if out.is_dir():
            old = out.with_name(f".{out.name}.replaced")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        if (tmp / STAGES_DIR).is_dir() and out.is_dir() and not (out / STAGES_DIR).exists():
            (tmp / STAGES_DIR).rename(out / STAGES_DIR)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment_info() -> dict[str, Any]:
    """Versions of Python and the key packages, the platform, the CUDA device if any, and the data-parallel world
    (`world_size`, `rank`, `backend`: 1, 0, None without torchrun; `interp.distributed`)."""
    import torch

    from interp.distributed import world

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
        **world().to_dict(),
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


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` under a temporary name beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def write_results(
    out_dir: str | Path, results: dict[str, Any], tables: dict[str, pd.DataFrame]
) -> dict[str, Path]:
    """Write `results.json` and one `<name>.csv` per table; return {file name: path}."""
    out = Path(out_dir)
    written: dict[str, Path] = {}
    json_path = out / "results.json"
    text = json.dumps(to_jsonable(results), indent=2, allow_nan=False)
    atomic_write_text(json_path, text + "\n")
    written[json_path.name] = json_path
    for name, df in tables.items():
        csv_path = out / f"{sanitize_name(name)}.csv"
        df.to_csv(csv_path, index=not isinstance(df.index, pd.RangeIndex))
        written[csv_path.name] = csv_path
    return written
