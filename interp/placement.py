"""One model across devices: `--device-map` (a strategy or a JSON file) and `--max-memory`, checked before loading.

Both are handed to `TransformerBridge.boot_transformers`, which passes them to Hugging Face's `from_pretrained`
(accelerate places the blocks; activations cross devices between blocks). A JSON map is checked against the
checkpoint's modules (built on the meta device, no weights read) and the devices this machine has.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from interp.errors import UserError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_SIZE = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B)?$", re.IGNORECASE)


def parse_max_memory(spec: str) -> dict[int | str, str]:
    """`0=70GiB,1=70GiB,cpu=100GiB` → {0: "70GiB", 1: "70GiB", "cpu": "100GiB"} (accelerate's `max_memory`)."""
    budget: dict[int | str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, size = part.partition("=")
        key, size = key.strip(), size.strip()
        if not sep or not _SIZE.match(size):
            raise UserError(f"--max-memory {part!r}: use DEVICE=SIZE pairs, e.g. 0=70GiB,1=70GiB,cpu=100GiB")
        if key.isdigit():
            _check_gpu(int(key), "--max-memory")
            budget[int(key)] = size
        elif key in ("cpu", "disk", "mps"):
            budget[key] = size
        else:
            raise UserError(f"--max-memory: unknown device {key!r}; use a GPU index (0, 1, ...), cpu or disk")
    if not budget:
        raise UserError("--max-memory is empty; use DEVICE=SIZE pairs, e.g. 0=70GiB,1=70GiB,cpu=100GiB")
    return budget


def _check_gpu(index: int, where: str) -> None:
    if not torch.cuda.is_available():
        raise UserError(f"{where} names GPU {index} but CUDA is not available; use cpu, or run on a GPU machine")
    if index >= torch.cuda.device_count():
        raise UserError(f"{where} names GPU {index} but this machine has {torch.cuda.device_count()} "
                        "(indices start at 0)")


def _check_device(value, where: str):
    """A device-map value as accelerate takes it: a GPU index, "cpu" or "disk"."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise UserError(f"{where}: device {value!r} is not a GPU index, 'cpu' or 'disk'")
    if isinstance(value, str) and re.fullmatch(r"cuda(:\d+)?", value):
        value = int(value.partition(":")[2] or 0)
    if isinstance(value, int):
        _check_gpu(value, where)
        return value
    if value == "meta":
        raise UserError(f"{where}: 'meta' holds no weights; place the module on a GPU index, 'cpu' or 'disk'")
    if value not in ("cpu", "disk", "mps"):
        raise UserError(f"{where}: unknown device {value!r}; use a GPU index (0, 1, ...), 'cpu' or 'disk'")
    return value


def module_names(path: Path, trust_remote_code: bool = False) -> tuple[set[str], list[str]]:
    """(module names, parameter names) of the checkpoint's model class, built on the meta device (no weights)."""
    import transformers
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    declared = (getattr(config, "architectures", None) or [""])[0]
    cls = getattr(transformers, declared, None) or transformers.AutoModelForCausalLM
    with init_empty_weights():
        model = (cls.from_config(config) if cls is transformers.AutoModelForCausalLM
                 else cls._from_config(config))
    return {n for n, _ in model.named_modules()}, [n for n, _ in model.named_parameters()]


def read_device_map(spec: str, path: Path, trust_remote_code: bool = False) -> str | dict[str, int | str]:
    """A strategy name as it is, or a JSON file's {module: device} checked against the checkpoint and machine:
    every module named exists, every device exists here, and every parameter is placed."""
    if spec in STRATEGIES:
        return spec
    file = Path(spec).expanduser()
    if not file.is_file():
        raise UserError(f"--device-map {spec!r}: not one of {', '.join(STRATEGIES)} and not a JSON file")
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"--device-map {spec!r} is not readable JSON ({type(exc).__name__})") from None
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"--device-map {spec!r}: expected a JSON object {{module name: device}}")
    placed = {str(k): _check_device(v, f"--device-map {file.name}: {k!r}") for k, v in raw.items()}
    modules, params = module_names(path, trust_remote_code)
    unknown = [k for k in placed if k and k not in modules]
    if unknown:
        layers = sorted(m for m in modules if m.count(".") <= 2 and m)[:6]
        raise UserError(f"--device-map {file.name}: no module {unknown[0]!r} in this model "
                        f"(names look like {', '.join(layers)})")
    missing = [p for p in params if not any(not k or p == k or p.startswith(k + ".") for k in placed)]
    if missing:
        raise UserError(f"--device-map {file.name}: parameter {missing[0]!r} is on no device "
                        f"({len(missing)} unplaced); map its module or a parent")
    return placed
