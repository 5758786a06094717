"""Checking files before trusting them: a saved model folder is whole, a checkpoint holds nothing that runs code.

`model_folder_problem(path)` says what is wrong with a finished stage's folder (None: nothing found): every
`*.safetensors` file has a readable header and exactly the bytes it announces, `config.json` (and the other JSON
files) parse, and a folder that holds a tokenizer holds a loadable one (`tokenizer.json` parses; a
`tokenizer_config.json` without any vocabulary file is a missing tokenizer). The runner and every stage run it on
the stage folders they read, so a truncated or garbled upstream stage is found before any work is planned or done.

`file_problem(path)` does the same for one file of a checkpoint and raises `UnsafeFile` for a file that could run
code when loaded: torch files (`.bin`, `.pt`, `.pth`, `.pkl`) must load with `torch.load(weights_only=True)`
(tensors, numbers, strings, containers and numpy arrays; the unpickler refuses every other global *without calling
it*), and a file of any type not listed here is refused unread.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

from pipeline import cluster
from pipeline.cli import PipelineError, first_line, typed_line

TEXT_SUFFIXES = {".json", ".jinja", ".txt", ".md", ".yaml", ".yml", ".model", ".tiktoken"}  # .model: sentencepiece
TORCH_SUFFIXES = {".bin", ".pt", ".pth", ".pkl"}
VOCAB_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt", "tiktoken.model")
# files without a telling suffix that nothing loads as code: DeepSpeed's `latest` (a tag), `zero_to_fp32.py` and
# `zero_to_torch.py` (scripts for people, never imported on resume)
NAMED_TEXT = ("log.txt", ".fingerprint", "latest", "zero_to_fp32.py", "zero_to_torch.py")
MAX_HEADER = 100 << 20


class UnsafeFile(PipelineError):
    """A file that would be unpickled with arbitrary globals, or of a type nothing here knows how to read safely."""


def safetensors_problem(path: Path) -> str | None:
    """A safetensors file is 8 bytes of header length, the JSON header, then the tensor bytes it lists."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "shorter than a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER):
                return "truncated or not safetensors (header length past the end of the file)"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as err:
        return f"unreadable safetensors header ({type(err).__name__})"
    if not isinstance(header, dict):
        return "safetensors header is not a mapping"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
               and "data_offsets" in v), default=0)
    if size != 8 + n + end:
        return f"truncated: {size} bytes where the header announces {8 + n + end}"
    return None


def json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"not valid JSON ({type(err).__name__})"
    return None


def torch_safe_globals() -> list:
    """numpy's array reconstruction and dtypes: data, not code (what transformers and accelerate allow too)."""
    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)), *deepspeed_safe_globals()]


def deepspeed_safe_globals() -> list:
    """DeepSpeed's optimizer checkpoints hold its ZeRO stage (an Enum), loss scaler (plain attributes) and the
    fragment addresses of ZeRO's flat buffers (a dataclass of two ints): data classes, allowed by name when the stage
    runs under DeepSpeed (which then loads them itself, unchecked). Checked before the stage's trainer has imported
    DeepSpeed, hence the launch's environment and not sys.modules."""
    if not (cluster.launched_with_deepspeed() or "deepspeed" in sys.modules):
        return []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except Exception:  # pragma: no cover - another DeepSpeed layout: its checkpoints are then refused
        return []
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def torch_problem(path: Path) -> str | None:
    """Load with weights_only=True: a pickle naming any other global is refused before anything is called."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(torch_safe_globals()):
            torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err) or "Unsupported" in str(err) or "global" in str(err).lower():
            raise UnsafeFile(f"{path}: refusing to load: it is a pickle that names code, not only tensors and "
                             f"numbers ({first_line(err, 120)}); delete the checkpoint to start over")
        return f"unreadable torch file ({first_line(err, 80)})"
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        return f"unreadable torch file ({typed_line(err, 80)})"
    return None


def file_problem(path: Path) -> str | None:
    """None if the file is whole and safe to load; a reason if it is damaged; UnsafeFile if it could run code."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return safetensors_problem(path)
    if suffix == ".json":
        return json_problem(path)
    if suffix in TORCH_SUFFIXES:
        return torch_problem(path)
    if suffix in TEXT_SUFFIXES or path.name in NAMED_TEXT:
        return None
    raise UnsafeFile(f"{path}: refusing to load a checkpoint holding a file of unknown type (only safetensors, "
                     f"JSON, text and torch files that load with weights_only=True are read; FSDP's sharded .distcp "
                     f"checkpoints are not: use FULL_STATE_DICT); delete the checkpoint to start over")


def model_folder_problem(path, need_tokenizer: bool = False) -> str | None:
    """What is wrong with a saved model folder (a stage's output), or None. Reads headers, not whole weights.
    need_tokenizer: the folder must hold a tokenizer (every stage saves one next to its model)."""
    path = Path(path)
    if not path.is_dir():
        return f"{path} is not a folder"
    if (path / "model_index.json").is_file():
        return diffusers_folder_problem(path)
    configs = [p for p in ("config.json", "adapter_config.json") if (path / p).is_file()]
    if not configs:
        return None  # not a model folder (e.g. the eval stage's report): nothing more to check
    weights = sorted(path.glob("*.safetensors"))
    if not weights and not list(path.glob("*.bin")):
        return f"{path}: no weights (*.safetensors) next to {configs[0]}"
    for p in sorted(path.glob("*.json")):
        if (problem := json_problem(p)):
            return f"{p}: {problem}"
    for p in weights:
        if (problem := safetensors_problem(p)):
            return f"{p}: {problem}"
    has_vocab = any((path / v).is_file() for v in VOCAB_FILES)
    if ((path / "tokenizer_config.json").is_file() or need_tokenizer) and not has_vocab:
        return f"{path}: tokenizer files missing (none of {', '.join(VOCAB_FILES[:3])}, ...)"
    merged = path / "merged"
    if (merged / "config.json").is_file():
        return model_folder_problem(merged)
    return None


def language_model_problem(path) -> str | None:
    """What is wrong with a folder a stage loads a language model and its tokenizer from (`init_from`, a reward
    model, an eval checkpoint), or None: it must be a saved model, whole, with its tokenizer files (an adapter
    without them takes its base model's)."""
    path = Path(path)
    if path.is_dir() and not any((path / c).is_file() for c in ("config.json", "adapter_config.json")):
        return f"{path}: no config.json or adapter_config.json (not a saved model)"
    return model_folder_problem(path, need_tokenizer=not (path / "adapter_config.json").is_file())


def diffusers_folder_problem(path: Path) -> str | None:
    """A diffusers pipeline folder (the image stages' output): `model_index.json` parses and every component it
    names is whole (a model subfolder: config and safetensors; a tokenizer: its vocabulary; a scheduler: its JSON);
    the image judge beside it (`judge/`) too."""
    if (problem := json_problem(path / "model_index.json")):
        return f"{path / 'model_index.json'}: {problem}"
    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    parts = [name for name, value in index.items() if isinstance(value, list) and len(value) == 2 and value[1]]
    for name in [*parts, *(["judge"] if (path / "judge").is_dir() else [])]:
        sub = path / name
        if not sub.is_dir():
            return f"{path}: component '{name}' missing (model_index.json names it)"
        for p in sorted(sub.glob("*.json")):
            if (problem := json_problem(p)):
                return f"{p}: {problem}"
        if name.startswith("tokenizer") and not any((sub / v).is_file() for v in VOCAB_FILES):
            return f"{sub}: tokenizer files missing (none of {', '.join(VOCAB_FILES[:3])}, ...)"
        weights = sorted(sub.glob("*.safetensors"))
        if (sub / "config.json").is_file() and not weights:
            return f"{sub}: no weights (*.safetensors) next to config.json"
        for p in weights:
            if (problem := safetensors_problem(p)):
                return f"{p}: {problem}"
    return None
