"""Load a model as a TransformerLens `TransformerBridge`: alias, Hugging Face id or local directory."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch

import interp.bridge  # noqa: F401  (TransformerLens work-arounds, applied on import)
from interp.errors import UserError


@dataclass(frozen=True)
class Alias:
    hf_id: str
    note: str
    analysis_defaults: dict = field(default_factory=dict)  # analysis → recommended settings


# Reasoning models think for thousands of tokens; the refusal-cliff paper samples 8192 new tokens at T=0.7.
_REASONING = {"refusal_cliff": {"max_new_tokens": 8192, "temperature": 0.7}}


# DeepSeek-R1-Distill-Qwen-1.5B is the default real `qwen`: a Qwen2-architecture reasoning model
# whose chat template opens `<think>`, small enough (28 x 12 = 336 heads) for one GPU or a CPU
# (the refusal-cliff paper's smallest family member).
ALIASES: dict[str, Alias] = {
    "qwen": Alias("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "small Qwen2 reasoning model (R1 distill)", _REASONING),
    "qwen3": Alias("Qwen/Qwen3-0.6B", "Qwen3 0.6B, thinking mode via its chat template", _REASONING),
    "r1-7b": Alias("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "refusal-cliff paper: R1-7B", _REASONING),
    "r1-8b": Alias("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "refusal-cliff paper: R1-8B", _REASONING),
    "r1-14b": Alias("deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", "refusal-cliff paper: R1-14B", _REASONING),
    "qwq-32b": Alias("Qwen/QwQ-32B", "refusal-cliff paper: QwQ-32B", _REASONING),
    "or1-7b": Alias("Skywork/Skywork-OR1-7B", "refusal-cliff paper: OR1-7B", _REASONING),
    "phi4-mini-reasoning": Alias("microsoft/Phi-4-mini-reasoning", "refusal-cliff paper: Phi-4-mini-R", _REASONING),
    "qwen3-4b-thinking": Alias("Qwen/Qwen3-4B-Thinking-2507", "refusal-cliff paper: well-aligned control", _REASONING),
    "realsafe-r1-7b": Alias("RealSafe/RealSafe-R1-7B", "refusal-cliff paper: safety-aligned control", _REASONING),
    "realsafe-r1-8b": Alias("RealSafe/RealSafe-R1-8B", "refusal-cliff paper: safety-aligned control", _REASONING),
    "qwen3.5": Alias("Qwen/Qwen3.5-0.8B", "gated attention (Qwen3-Next-style gate), smallest real one"),
    "qwen3-next": Alias("Qwen/Qwen3-Next-80B-A3B-Instruct", "gated attention, hybrid, MoE"),
    "gpt2": Alias("openai-community/gpt2", "GPT-2 small"),
    "pythia-160m": Alias("EleutherAI/pythia-160m", "Pythia 160M"),
}

# Shipped with (or built by) the package, so they load with no network.
EMBEDDED = {
    "organism": "model organism: 4-layer Qwen3 trained by interp on a synthetic chat corpus (default)",
    "organism-gated": "its gated-attention twin (Qwen3-Next-style sigmoid gate), same data, seed and steps",
    "organism-sink": "2-layer Qwen3 trained on Bigram-Backcopy (64-token vocabulary): forms an attention sink",
    "organism-sink-gated": "its gated twin (Qwen3.5 sigmoid output gate), same task, seed and steps",
    "tiny": "random-weight 2-layer Qwen2 with a thinking chat template, built on first use",
}
_ORGANISM_DIRS = {"organism": "standard", "organism-gated": "gated",
                  "organism-sink": "sink_standard", "organism-sink-gated": "sink_gated"}
DEFAULT_MODEL = "organism"

_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "tokenizer*"]


@dataclass(frozen=True)
class ModelInfo:
    """Where a loaded model came from; reports print it."""

    name: str
    source: str
    architecture: str
    n_layers: int
    n_heads: int
    d_model: int
    device: str
    dtype: str
    random_weights: bool
    # per-analysis option defaults from the model's card (interp_model.json), e.g. probe settings
    analysis_defaults: dict = field(default_factory=dict)
    # --device-map: the strategy or file asked for and where accelerate put each module (None: one device)
    device_map: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def cache_dir() -> Path:
    return Path(os.environ.get("INTERP_CACHE", Path.home() / ".cache" / "interp"))


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` → CUDA when available, else CPU; `cuda` without CUDA is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} was asked for but CUDA is not available; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` → bfloat16 on CUDA, float32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise UserError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return names[dtype]


def embedded_model_dir(name: str) -> Path:
    """The directory of an embedded model (organisms ship in the package; `tiny` is built once)."""
    from interp.tiny import write_tiny_checkpoint

    if name in _ORGANISM_DIRS:
        return Path(str(resources.files("interp") / "organisms" / _ORGANISM_DIRS[name]))
    path = cache_dir() / "models" / f"{name}-v1"
    if not (path / "config.json").exists():
        write_tiny_checkpoint(path, "qwen2", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, seed=0)
    return path


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def _check_local_dir(path: Path, allow_pickle: bool) -> None:
    if not path.is_dir():
        raise UserError(f"model directory {str(path)!r} not found")
    if not (path / "config.json").exists():
        raise UserError(f"{str(path)!r} has no config.json; pass a Hugging Face model directory")
    if not list(path.glob("*.safetensors")):
        hint = "" if allow_pickle else " (pickle .bin weights are refused unless you pass --allow-pickle)"
        if allow_pickle and list(path.glob("*.bin")):
            return
        raise UserError(f"{str(path)!r} has no .safetensors weights{hint}")


def _download(hf_id: str, allow_pickle: bool, trust_remote_code: bool, revision: str | None) -> Path:
    """Fetch (or find in the cache) only the files a safe load needs; return the snapshot directory."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    patterns = _WEIGHT_PATTERNS + (["*.bin"] if allow_pickle else []) + (["*.py"] if trust_remote_code else [])
    try:
        return Path(snapshot_download(hf_id, allow_patterns=patterns, revision=revision))
    except (RepositoryNotFoundError, HFValidationError):
        raise UserError(f"unknown model {hf_id!r}: not an alias ({', '.join(all_model_names())}), "
                        "not a local directory and not a Hugging Face model id") from None
    except Exception as exc:  # network errors come in many types; all mean "not reachable, not cached"
        raise UserError(f"could not fetch {hf_id!r} from the Hugging Face hub and it is not cached "
                        f"({type(exc).__name__}); pass a local directory with config.json, "
                        "safetensors weights and tokenizer") from None


def all_model_names() -> list[str]:
    return list(EMBEDDED) + list(ALIASES)


def locate_model(name_or_path: str, *, allow_pickle: bool = False, trust_remote_code: bool = False,
                 revision: str | None = None) -> tuple[Path, str]:
    """Return (local directory, source label) for an embedded name, alias, local directory or hub id."""
    if name_or_path in EMBEDDED:
        return embedded_model_dir(name_or_path), f"embedded:{name_or_path}"
    if name_or_path in ALIASES:
        hf_id = ALIASES[name_or_path].hf_id
        return _download(hf_id, allow_pickle, trust_remote_code, revision), hf_id
    if _looks_like_path(name_or_path):
        path = Path(name_or_path).expanduser()
        _check_local_dir(path, allow_pickle)
        return path, str(path)
    if name_or_path.count("/") != 1:
        raise UserError(f"unknown model {name_or_path!r}: use an alias ({', '.join(all_model_names())}), "
                        "a Hugging Face id (org/name) or a local directory")
    return _download(name_or_path, allow_pickle, trust_remote_code, revision), name_or_path


def check_architecture(path: Path, name: str) -> None:
    """Refuse configs whose `architectures` neither TransformerLens nor transformers knows
    (TransformerLens would otherwise fall back to `model_type` and load a different class)."""
    import transformers
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    try:
        declared = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{name!r}: config.json is not readable JSON ({type(exc).__name__})") from None
    unknown = [a for a in declared if a not in SUPPORTED_ARCHITECTURES and not hasattr(transformers, a)]
    if declared and len(unknown) == len(declared):
        raise UserError(f"{name!r}: architecture {unknown[0]} is not supported by TransformerLens "
                        "TransformerBridge or transformers")


def load_model(name_or_path: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto", *,
               trust_remote_code: bool = False, allow_pickle: bool = False, revision: str | None = None,
               device_map: str | None = None, max_memory: str | None = None):
    """Load a model as a `TransformerBridge` (raw HF numerics; tokenizer at `.tokenizer`).

    `name_or_path`: an embedded name (`tiny`), an alias (`qwen`, `r1-8b`, ... see `ALIASES`), a
    Hugging Face id or a local directory (config + safetensors + tokenizer). Only safetensors
    weights and no remote code are loaded unless `allow_pickle` / `trust_remote_code` are set.
    `model_info(model)` tells where it came from. `device_map` (auto, balanced, sequential or a JSON file
    {module: device}) and `max_memory` ("0=70GiB,1=70GiB,cpu=100GiB") split the model across devices
    (`interp.placement`); `device` must then stay "auto".
    """
    from transformer_lens.model_bridge import TransformerBridge

    from interp.placement import parse_max_memory, read_device_map

    if device_map is None and max_memory is not None:
        device_map = "auto"
    if device_map is not None and device != "auto":
        raise UserError(f"--device {device} and --device-map both place the model; pass one")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    budget = parse_max_memory(max_memory) if max_memory is not None else None
    path, source = locate_model(name_or_path, allow_pickle=allow_pickle,
                                trust_remote_code=trust_remote_code, revision=revision)
    if not trust_remote_code:
        check_architecture(path, name_or_path)
    placement = {} if device_map is None else \
        {"device_map": read_device_map(device_map, path, trust_remote_code), "max_memory": budget}
    try:
        bridge = TransformerBridge.boot_transformers(str(path), device=None if placement else torch_device,
                                                     dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                     **placement)
    except (ValueError, NotImplementedError, KeyError) as exc:
        if "architecture" in str(exc).lower() or "not supported" in str(exc).lower() or isinstance(exc, KeyError):
            raise UserError(f"{name_or_path!r}: architecture not supported by TransformerLens "
                            f"TransformerBridge ({str(exc).splitlines()[0][:160]})") from None
        raise
    bridge.eval()
    _note_added_head(bridge, path)
    tok = checked_tokenizer(bridge.tokenizer, path, name_or_path)
    if tok is not bridge.tokenizer:
        tok = interp.bridge.replace_tokenizer(bridge, tok)
    if tok.pad_token_id is None or tok.pad_token_id >= bridge.cfg.d_vocab:  # e.g. a class default added at load
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    from interp.tokens import record_trained_bos

    record_trained_bos(tok, path, trust_remote_code=trust_remote_code)  # the BOS rule of its own files (interp.tokens)
    card = _model_card(path)
    cfg = bridge.cfg
    info = ModelInfo(name=name_or_path, source=source,
                     architecture=type(bridge.original_model).__name__,
                     n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_model=cfg.d_model,
                     device=str(bridge.cfg.device if placement else torch_device),
                     dtype=str(torch_dtype).removeprefix("torch."),
                     random_weights=bool(card.get("random_weights")),
                     analysis_defaults=_recommended_settings(name_or_path, card),
                     device_map=None if not placement else
                     {"asked": device_map, "placed": {k: str(v) for k, v in
                                                      (getattr(bridge.original_model, "hf_device_map", None)
                                                       or {"": bridge.cfg.device}).items()}})
    object.__setattr__(bridge, "_interp_info", info)
    return bridge


def _note_added_head(bridge, path: Path) -> None:
    """A one-line note on stderr when the checkpoint is a base model without the head the bridge loads it with: a
    sentence-transformers `BertModel` becomes `BertForMaskedLM` with a newly initialised (random) masked-LM head."""
    try:
        declared = json.loads((Path(path) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return
    loaded = type(bridge.original_model).__name__
    if declared and declared[0] != loaded and declared[0].endswith("Model"):
        print(f"note: the checkpoint is a {declared[0]} (no LM head); it is loaded as {loaded} with a newly "
              "initialised head, so its logits are random (hidden states and attention are the checkpoint's)",
              file=sys.stderr)


TOKENIZER_PROBE = "The quick brown fox, 42 times: hello world!\nWhy? Because <think> it's 3.14 </think> done."


def checked_tokenizer(tok, path: Path, name: str):
    """`tok` if it encodes like the checkpoint's own `tokenizer.json`; otherwise that file loaded as it is.

    The comparison ignores the file's padding and truncation settings (a call pads only when asked).

    transformers 5 rebuilds a tokenizer from the architecture's class (a word-level `tokenizer.json`
    on a Qwen2 config comes back as a BPE that produces other tokens); this catches it at load.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    file = path / "tokenizer.json"
    if tok is None or not file.exists():
        return tok
    try:
        raw = Tokenizer.from_file(str(file))
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        raise UserError(f"{name!r}: tokenizer.json is not readable ({str(exc).splitlines()[0][:120]})") from None
    raw.no_padding()  # a file may pad every encoding to a fixed length (sentence-transformers: 128)
    raw.no_truncation()
    expected = raw.encode(TOKENIZER_PROBE, add_special_tokens=False).ids
    if tok(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"] == expected:
        return tok
    specials = {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)}
    fixed = PreTrainedTokenizerFast(tokenizer_file=str(file), **specials)
    fixed.chat_template = tok.chat_template
    if fixed(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"] != expected:
        raise UserError(f"{name!r}: the tokenizer transformers builds ({type(tok).__name__}) encodes differently "
                        "from tokenizer.json and the file cannot be loaded as it is; fix the tokenizer files")
    import sys

    print(f"note: {name}: transformers rebuilt the tokenizer as {type(tok).__name__}, which encodes differently "
          "from tokenizer.json; using tokenizer.json as it is", file=sys.stderr)
    return fixed


def _recommended_settings(name: str, card: dict) -> dict:
    """analysis → settings: the organisms' (one place, `interp.organisms.defaults`), an alias's, or the card's own."""
    if card.get("organism") or card.get("sink_organism"):
        from interp.organisms.defaults import ANALYSIS_DEFAULTS, SINK_ANALYSIS_DEFAULTS

        return SINK_ANALYSIS_DEFAULTS if card.get("sink_organism") else ANALYSIS_DEFAULTS
    if name in ALIASES:
        return ALIASES[name].analysis_defaults
    return card.get("analysis_defaults", {})


def _model_card(path: Path) -> dict:
    """interp's own notes about a checkpoint (`interp_model.json`), if it has them."""
    card = path / "interp_model.json"
    try:
        return json.loads(card.read_text()) if card.exists() else {}
    except json.JSONDecodeError:
        raise UserError(f"{str(card)!r} is not valid JSON") from None


def analysis_defaults(model, analysis: str) -> dict:
    """Option defaults the model's card recommends for `analysis` (empty for most models)."""
    values = model_info(model).analysis_defaults.get(analysis, {})
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def model_info(model) -> ModelInfo:
    """The `ModelInfo` recorded by `load_model` (a minimal one for bridges built elsewhere)."""
    info = getattr(model, "_interp_info", None)
    if info is not None:
        return info
    cfg = model.cfg
    return ModelInfo(name=getattr(cfg, "model_name", "?"), source="?", architecture="?",
                     n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_model=cfg.d_model,
                     device=str(cfg.device), dtype=str(cfg.dtype), random_weights=False)


def model_label(name_or_path: str) -> str:
    """A short name for output directories."""
    return Path(name_or_path.rstrip("/")).name or "model"
