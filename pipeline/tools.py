"""Tools the policy calls: the image model, the image judge and Python functions, attached by a recipe, and the
store of the images they make. Parsing, schema checks and running with a timeout are in `pipeline.tool_calls`,
re-exported here: `from pipeline.tools import ToolBox, parse_tool_calls, ...`.

A call whose arguments break its tool's schema never runs (valid=False; the reason is the tool message). A tool that
raises or runs past `timeout_s` gives ok=False: a `python` tool's process is killed, an in-process model call runs on
in the background and the next call of that tool waits for it. Loading a model (once, before its first call) is not
timed; a model that does not load stops with PipelineError. Recipe section::

    tools:
      timeout_s: 30              # per call
      max_chars: 500             # a tool message is cut to this many characters
      allow_code: false          # `python` tools only when true: they import and run code the recipe names
      tools:
        - name: draw_image
          backend: diffusion
          source: diffusion      # a stage of this recipe (<run>/<stage>), a local pipeline folder, or a hub id
          steps: 100             # sampler steps; guidance: 1.0; seed: 0 (call k = 0, 1, ... is seeded seed + k)
          description: "..."    # optional: replaces the default description (any backend)
        - name: read_image
          backend: image_judge
          source: diffusion      # a folder holding judge/ (the diffusion stage writes <stage>/judge/) or a judge
        - name: add
          backend: python
          function: mymodule:add # imported in a subprocess (the recipe's folder and the working directory on its
                                 # path); schema from its signature and Google-style docstring
"""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.cli import PipelineError
from pipeline.key_checks import long_name, number_problem, source_of, where_set
from pipeline.tool_calls import (Tool, ToolBox, ToolCall, ToolError, ToolOutput, ToolResult, ToolTimeout,
                                 check_deadline, describe_error, parse_tool_calls)
from pipeline.values import Mismatch, closest, coerce, field_types, type_name

__all__ = ["Tool", "ToolBox", "ToolCall", "ToolError", "ToolOutput", "ToolResult", "ToolTimeout", "parse_tool_calls",
           "ImageStore", "diffusion_tool", "judge_tool", "python_tool", "tools_from_config", "judge_source",
           "judge_folder", "tool_name", "unknown_tool", "draw_schema", "read_schema", "drawn_text", "read_text",
           "recipe_python_tool"]


# ---------------------------------------------------------------------------------------------- images


class ImageStore:
    """Images the tools make and read (tensors C x H x W in [0, 1]) by string id: "1", "2", ... after `prefix`
    (e.g. "r0-" per process). With a folder, each is also saved as <folder>/<id>.png, its meta appended to
    <folder>/images.jsonl."""

    def __init__(self, folder: Path | None, prefix: str = ""):
        self.folder, self.prefix = (Path(folder) if folder is not None else None), prefix
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        self._images, self._meta, self._next, self._lock = {}, {}, 1, threading.Lock()
        self._fixed: set[str] = set()  # ids given explicitly (a gallery): kept by `restart`

    def add(self, image, meta: dict | None = None, image_id: str | None = None) -> str:
        image = image.detach().float().cpu().clamp(0, 1)
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"expected an image C x H x W with 1 or 3 channels, got shape {tuple(image.shape)}")
        auto = image_id is None
        with self._lock:
            while image_id is None or (auto and image_id in self._images):  # skip ids given explicitly (a gallery)
                image_id, self._next = f"{self.prefix}{self._next}", self._next + 1
            image_id = str(image_id)
            if image_id in self._images or not re.fullmatch(r"[\w.-]+", image_id):
                raise ValueError(f"image id {image_id!r} is taken or not a file name")
            self._images[image_id], self._meta[image_id] = image, dict(meta or {})
            if not auto:
                self._fixed.add(image_id)
            if self.folder is not None:
                from PIL import Image

                self.folder.mkdir(parents=True, exist_ok=True)
                pixels = (image * 255).round().byte().permute(1, 2, 0).numpy()
                Image.fromarray(pixels[..., 0] if len(image) == 1 else pixels).save(self.folder / f"{image_id}.png")
                with open(self.folder / "images.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps({"id": image_id, **self._meta[image_id]}, default=str) + "\n")
        return image_id

    def restart(self, folder: Path | None) -> None:
        """Forget the images with automatic ids and number new ones from the first free id again (ids given
        explicitly, e.g. the gallery, stay); images added from now on are saved in `folder` (None: memory only).
        Online RL restarts the store before each step: a step's image ids depend on the step alone."""
        with self._lock:
            for image_id in [i for i in self._images if i not in self._fixed]:
                del self._images[image_id], self._meta[image_id]
            self._next, self.folder = 1, (Path(folder) if folder is not None else None)  # made at its first image

    def drawn(self) -> dict:
        """The images with automatic ids, by id: what `restart` forgets (the fixed ones stay)."""
        with self._lock:
            return {i: image for i, image in self._images.items() if i not in self._fixed}

    def get(self, image_id: str):
        if image_id not in self:
            raise KeyError(f"no image {image_id}")
        return self._images[str(image_id)]

    def meta(self, image_id: str) -> dict:
        return dict(self._meta[str(image_id)]) if image_id in self else self.get(image_id)

    def __contains__(self, image_id) -> bool:
        return str(image_id) in self._images

    def __len__(self) -> int:
        return len(self._images)


def _function_schema(name: str, description: str, properties: dict) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": list(properties)}}}


# What the image tools look like to the policy and what they answer: one definition, used by the tools and by the
# world's demonstrations (pipeline/tool_world.py), so SFT data shows exactly what the tools say. Short: a small
# model reads the schemas in its system prompt in every conversation.
DRAW_DESCRIPTION = "Draw an image from a caption; returns the image id."
READ_DESCRIPTION = "Say what an image shows."


def draw_schema(name: str = "draw_image", description: str | None = None) -> dict:
    return _function_schema(name, description or DRAW_DESCRIPTION, {"prompt": {"type": "string"}})


def read_schema(name: str = "read_image", description: str | None = None) -> dict:
    return _function_schema(name, description or READ_DESCRIPTION, {"image_id": {"type": ["string", "integer"]}})


def drawn_text(image_id: str) -> str:
    return f"Drew image {image_id}."


def read_text(image_id: str, reading: dict) -> str:
    """"Image 12 shows a small thick 4 on the right." from a reading (or truth) {digit, size, thickness, position}."""
    from pipeline.images import caption

    shown = caption(reading["digit"], reading.get("size"), reading.get("thickness"), reading.get("position"))
    return f"Image {image_id} shows {shown}."


def diffusion_tool(name: str, source: str, store: ImageStore, *, steps: int = 100, guidance: float = 1.0,
                   seed: int = 0, description: str | None = None) -> Tool:
    """draw_image(prompt): one image from the text-to-image pipeline at `source` (loaded once), kept in `store`."""
    state = {"pipe": None, "calls": 0}

    def setup():
        if state["pipe"] is None:
            from pipeline import cluster
            from pipeline.images import load_pipeline

            pipe = load_pipeline(source)
            pipe.set_progress_bar_config(disable=True)
            state["pipe"] = pipe.to(cluster.training_device())  # the device the stages train on
            # what this pipeline's __call__ takes: the deadline after every sampler step (IF's pipelines take
            # `callback`, the others `callback_on_step_end`), and IF's caption cleaning off
            state["call_kw"] = (
                {"callback_on_step_end": lambda _pipe, _step, _t, tensors: check_deadline() or tensors}
                if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters
                else {"callback": lambda *_: check_deadline(), "callback_steps": 1})
            if pipe.__class__.__name__.startswith("IF"):
                state["call_kw"]["clean_caption"] = False
        return state["pipe"]

    def run_batch(batch: list[dict]) -> list[ToolOutput]:
        """As images.generate draws, but with a generator per image (an image depends on its seed, not on its batch)
        and no progress bar per call."""
        import numpy as np
        import torch

        pipe, prompts = setup(), [args["prompt"] for args in batch]
        seeds = [seed + state["calls"] + k for k in range(len(batch))]
        state["calls"] += len(batch)
        drawn = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                     generator=[torch.Generator().manual_seed(s) for s in seeds], **state["call_kw"]).images
        drawn = torch.from_numpy(np.asarray(drawn, dtype=np.float32)).permute(0, 3, 1, 2)
        ids = [store.add(img, {"tool": name, "prompt": p, "seed": s}) for img, p, s in zip(drawn, prompts, seeds)]
        return [ToolOutput(drawn_text(i), i) for i in ids]

    return Tool(name, draw_schema(name, description), lambda args: run_batch([args])[0], setup=setup, run_batch=run_batch,
                restart=lambda k: state.update(calls=k), on_calling_thread=True)


def judge_tool(name: str, folder: Path, store: ImageStore, *, description: str | None = None) -> Tool:
    """read_image(image_id): what the image judge at `folder` reads in a stored image."""
    state = {}

    def setup():
        if "judge" not in state:
            from pipeline.image_judge import ImageJudge

            try:
                state["judge"] = ImageJudge.load(folder)
            except (OSError, ValueError, KeyError, RuntimeError) as err:
                raise PipelineError(f"image judge '{folder}': cannot load it ({describe_error(err)})") from None
        return state["judge"]

    def run(args: dict) -> ToolOutput:
        image_id = str(args["image_id"])
        if image_id not in store:
            raise ToolError(f"no image {image_id}")
        return ToolOutput(read_text(image_id, setup().predict(store.get(image_id)[None])[0]), image_id)

    return Tool(name, read_schema(name, description), run, setup=setup, on_calling_thread=True)  # one small forward


# ---------------------------------------------------------------------------------------------- user code

_CHILD = """
import contextlib, importlib, json, sys
try:
    with contextlib.redirect_stdout(sys.stderr):  # the function's own prints must not mix with the answer
        module, _, name = sys.argv[2].partition(":")
        fn = getattr(importlib.import_module(module), name)
        if sys.argv[1] == "schema":
            from transformers.utils import get_json_schema
            out = {"value": get_json_schema(fn)}
        else:
            out = {"value": str(fn(**json.loads(sys.stdin.read())))}
except Exception as err:
    out = {"error": f"error: {type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"}
print(json.dumps(out))
"""


def _child(mode: str, spec: str, args: dict | None, timeout_s: float, path: list[Path]):
    """Run `spec` (module:function) in a fresh Python process, killed (with anything it started) at the timeout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, mode, spec], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(json.dumps(args or {}), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise ToolTimeout(f"timeout after {timeout_s:g} s") from None
    try:
        answer = json.loads(out.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        last = (err.strip().splitlines() or [""])[-1]
        raise ToolError(f"error: the process exited with code {proc.returncode}" + (f" ({last})" if last else ""))
    if "error" in answer:
        raise ToolError(answer["error"])
    return answer["value"]


def python_tool(name: str, spec: str, *, timeout_s: float, path: list[Path] = (), description: str | None = None):
    """A Python function (module:function) run in a new subprocess per call; its return value str()'d."""
    schema = _child("schema", spec, None, max(60.0, timeout_s), list(path))
    schema["function"].update(name=name, **({"description": description} if description else {}))
    return Tool(name, schema, lambda args: _child("call", spec, args, timeout_s, list(path)))


# ---------------------------------------------------------------------------------------------- recipes

@dataclass
class ToolsSection:
    """The recipe's `tools` section (module docstring): the tools every stage that runs them attaches."""

    timeout_s: float = 30.0          # per call
    max_chars: int = 500             # a tool message is cut to this many characters
    allow_code: bool = False         # `python` tools only when true: they import and run code the recipe names
    world_gallery: bool = False      # the world's gallery images (pipeline/tool_world.py) in the store as "1".."200"
    tools: list = field(default_factory=list)  # the tools: name, backend and the backend's keys

    @property
    def names(self) -> list[str]:
        """The tools' names, as the ToolBox built from them names them (checked unique on loading)."""
        return [t["name"] for t in self.tools]


SECTION_KEYS = field_types(ToolsSection)
BACKEND_KEYS = {"diffusion": {"source": str, "steps": int, "guidance": float, "seed": int},
                "image_judge": {"source": str}, "python": {"function": str}}


def _keys(values, types: dict, key: str, where: str) -> dict:
    if not isinstance(values, dict):
        raise PipelineError(f"{where}: {key}: expected a mapping, got {type(values).__name__}")
    out = {}
    for k, v in values.items():
        if k not in types:
            raise PipelineError(f"{where}: unknown key '{k}' in {key}{closest(str(k), types)}")
        try:
            out[k] = coerce(v, types[k])
        except Mismatch:
            raise PipelineError(f"{where}: {key}.{k}: expected {type_name(types[k])}, got {v!r}") from None
        if problem := number_problem(out[k]):  # steps: .inf, guidance: .nan
            raise PipelineError(f"{where}: {key}.{k} {problem}, got {v!r}")
    return out


def _folder(source: str, run_root: Path, key: str, where: str, hub_ok: bool) -> Path | str:
    """A stage's folder under run_root, a local folder, or (hub_ok) a hub id: the first that exists."""
    for path in (Path(run_root) / source, Path(source).expanduser()):
        if path.is_dir():
            return path
    if hub_ok and source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return source
    raise PipelineError(f"{where}: {key}: '{source}' is not a stage folder ({Path(run_root) / source} is missing: "
                        f"run that stage first) or a local folder" + (" or a hub id" if hub_ok else ""))


def tool_name(schema: dict) -> str | None:
    """The name in a tool schema, HF's {type: function, function: {...}} or a bare {name, parameters}."""
    return (schema.get("function") or schema).get("name")


def unknown_tool(schemas: list[dict] | None, names) -> str | None:
    """The first tool a row offers (its schemas) that is not among `names`, the recipe's tools; None if all are."""
    return next((n for n in map(tool_name, schemas or []) if n not in names), None)


def judge_source(section: ToolsSection, override: str | None = None) -> str | None:
    """Where the image judge that checks drawn images lives (a stage or a folder): `override`, else the image_judge
    tool's source, else the diffusion tool's source (the diffusion stages write <stage>/judge/); None without
    either tool. The one rule the eval and ppo stages and the runner's inputs share."""
    if override:
        return override
    for backend in ("image_judge", "diffusion"):
        for tool in section.tools:
            if tool.get("backend") == backend and tool.get("source"):
                return tool["source"]
    return None


def judge_folder(source: str, run_root: Path, key: str, where: str) -> Path:
    """The image judge's folder for `source` (a stage of the run or a local folder, holding judge/ or a judge
    itself); one line naming `key` when there is none."""
    folder = _folder(source, run_root, key, where, hub_ok=False)
    folder = folder / "judge" if (folder / "judge" / "config.json").is_file() else folder
    if not ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()):
        raise PipelineError(f"{where}: {key}: no image judge in {folder} (config.json and model.safetensors)")
    return folder


def stage_sources(section: ToolsSection, image_judge: str | None = None) -> dict[str, str]:
    """The folders (stages, local folders, hub ids) a stage that runs these tools reads, by input name: the
    `source` of each model tool ("tools.draw_image": "diffusion") and the image judge that checks drawn images
    ("image_judge": see `judge_source`)."""
    out = {f"tools.{t['name']}": t["source"] for t in section.tools
           if t.get("backend") in ("diffusion", "image_judge") and t.get("source")}
    if (judge := judge_source(section, image_judge)):
        out["image_judge"] = judge
    return out


def check_section(section: dict, where: str, recipe=None) -> list[dict]:
    """The section's tool entries, checked without touching the file system (a stage folder may not exist yet).
    With the `recipe` it is from, a line names the override that set the key, if one did, rather than `where`."""
    cfg = _keys(section, SECTION_KEYS, "tools", where)
    if cfg.get("timeout_s", 30.0) <= 0 or cfg.get("max_chars", 500) < 20:
        src = source_of(recipe, "tools", "timeout_s", "max_chars") if recipe else where
        raise PipelineError(f"{src}: tools: timeout_s must be > 0 and max_chars >= 20")
    if recipe is not None:  # every line below is about the list tools.tools
        where = source_of(recipe, "tools", "tools")
    if not cfg.get("tools"):
        raise PipelineError(f"{where}: tools.tools: a non-empty list of tools is needed")
    entries, names = [], set()
    for i, entry in enumerate(cfg["tools"]):
        key = f"tools.tools[{i}]"
        backend = entry.get("backend") if isinstance(entry, dict) else None
        if not isinstance(backend, str) or backend not in BACKEND_KEYS:  # a list or mapping: named, not hashed
            raise PipelineError(f"{where}: {key}.backend: {backend!r} is not one of {', '.join(BACKEND_KEYS)}")
        entry = _keys(entry, {"name": str, "backend": str, "description": str, **BACKEND_KEYS[backend]}, key, where)
        for need in ("name", "function" if backend == "python" else "source"):
            if not entry.get(need):
                raise PipelineError(f"{where}: {key}.{need}: missing")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", entry["name"]) or entry["name"] in names:
            raise PipelineError(f"{where}: {key}.name: '{entry['name']}' is taken or not a tool name (letters, "
                                f"digits, _ -)")
        if entry.get("source") and (problem := long_name(entry["source"])):  # os.stat would raise on it
            raise PipelineError(f"{where}: {key}.source: {problem}")
        if backend == "diffusion" and entry.get("steps", 100) < 1:
            raise PipelineError(f"{where}: {key}.steps: must be at least 1")
        if backend == "python" and not cfg.get("allow_code", False):
            allow = where_set(recipe, [("tools", "tools"), ("tools", "allow_code")]) if recipe is not None else where
            raise PipelineError(f"{allow}: {key}.backend: 'python' runs code the recipe names; set "
                                f"tools.allow_code: true to allow it")
        if backend == "python" and not re.fullmatch(r"[\w.]+:\w+", entry["function"]):
            raise PipelineError(f"{where}: {key}.function: '{entry['function']}' is not module:function")
        names.add(entry["name"])
        entries.append(entry)
    return entries


def tools_from_config(section: dict, *, run_root: Path, store: ImageStore, where: str, recipe=None) -> ToolBox:
    """The ToolBox a recipe's `tools` section describes (see the module docstring); bad keys, and stage folders
    that are not there yet, raise PipelineError. `where`: the recipe file (python tools import from its folder);
    with the `recipe`, a line names the override that set tools.tools, if one did."""
    entries = check_section(section, where, recipe)
    named = source_of(recipe, "tools", "tools") if recipe is not None else where
    timeout_s, max_chars = section.get("timeout_s", 30.0), section.get("max_chars", 500)
    tools = []
    for i, entry in enumerate(entries):
        key, backend = f"tools.tools[{i}]", entry["backend"]
        name, description = entry["name"], entry.get("description")
        if backend == "diffusion":
            source = _folder(entry["source"], run_root, f"{key}.source", named, hub_ok=True)
            if isinstance(source, Path) and not (source / "model_index.json").is_file():
                raise PipelineError(f"{named}: {key}.source: {source} is not a diffusers pipeline (no "
                                    f"model_index.json)")
            tools.append(diffusion_tool(name, str(source), store, steps=entry.get("steps", 100),
                                        guidance=entry.get("guidance", 1.0), seed=entry.get("seed", 0),
                                        description=description))
        elif backend == "image_judge":
            folder = judge_folder(entry["source"], run_root, f"{key}.source", named)
            tools.append(judge_tool(name, folder, store, description=description))
        else:
            tools.append(recipe_python_tool(entry, key, timeout_s, where, named))
    return ToolBox(tools, timeout_s=timeout_s, max_chars=max_chars)


def recipe_python_tool(entry: dict, key: str, timeout_s: float, where: str, named: str | None = None) -> Tool:
    """The tool of a checked `python` entry, its schema made in a subprocess from the function's signature and
    docstring (the folder of the recipe file `where` on the path); one line naming the recipe (or `named`: the
    override that set the entry) and `key` when it cannot be made."""
    try:
        return python_tool(entry["name"], entry["function"], timeout_s=timeout_s, description=entry.get("description"),
                           path=[Path(where).resolve().parent])
    except (ToolError, ToolTimeout) as err:
        raise PipelineError(f"{named or where}: {key}.function: cannot make a tool of '{entry['function']}' ({err})") from None
