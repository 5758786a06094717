"""Run directories, manifests and fingerprints.

A stage writes into `<run_dir>/<stage>.partial/` and, once everything is saved, writes `manifest.json` there and
renames the folder to `<run_dir>/<stage>/`. So a finished stage is exactly a stage folder with a manifest; a stage
killed mid-way leaves only a `.partial` folder, which the next run of the same inputs resumes from (trainer
checkpoints; kept if that run stops on bad input, e.g. a hub offline) or, if the inputs changed, wipes.

The fingerprint of a stage hashes what it was asked to do: its section of the recipe, the run seed, the
fingerprints of the checkpoints it starts from (a finished stage's manifest, a folder's file listing, a hub id)
and of its data. The runner skips a stage whose manifest carries the fingerprint it would write now. The package's
code is recorded beside it, not hashed in (an edited comment must not retrain a stage): a stage trained by other
code is still skipped, and up_to_date says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from pipeline import cost, faults, integrity, locks, log, preemption, safe_resume, threads
from pipeline.cli import PipelineError
from pipeline.fingerprints import code_hash, hash_file, hash_folder, hash_obj
from pipeline.key_checks import key_prefix, source_of
from pipeline.references import reference_kind
from pipeline.stages import STAGES, model_loading, tool_sources
from pipeline.vllm_engine import uses_vllm

MANIFEST = "manifest.json"
METRICS = "metrics.json"
ATTEMPTS = "cost_attempts.json"  # in a stage's .partial folder: what its unfinished attempts cost (StageRun)
LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "tokenizers", "deepspeed", "diffusers",
             "bitsandbytes")


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def read_attempts(path: Path) -> list[dict]:
    """The ATTEMPTS file's records; a damaged file (cut short by a kill) counts as none."""
    try:
        records = json.loads(Path(path).read_text())
    except (OSError, ValueError):  # ValueError: bad JSON, or bytes that are not UTF-8
        return []
    return [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []


def read_manifest(stage_dir: Path) -> dict | None:
    """A stage folder's manifest; None (no finished stage) where none reads as one: missing, damaged, no object."""
    try:
        manifest = json.loads((Path(stage_dir) / MANIFEST).read_text())
    except (OSError, ValueError):  # ValueError: bad JSON, or bytes that are not UTF-8
        return None
    return manifest if isinstance(manifest, dict) else None


@dataclasses.dataclass
class Checkpoint:
    """Where a stage's model comes from. path None: a new model built from the recipe's `model.config`."""

    ref: str
    path: str | None
    fingerprint: str | None   # None: an upstream stage that has not finished yet
    source: str               # "stage", "config", "local" or "hub"


def resolve_checkpoint(recipe, ref: str | None, must_exist: bool = True, key: str = "checkpoint") -> Checkpoint:
    """The checkpoint `ref` names (references.reference_kind tells which kind), with its fingerprint."""
    kind = reference_kind(recipe, ref, key)
    if kind == "model":
        m = recipe.model
        if m.name_or_path:
            return dataclasses.replace(resolve_checkpoint(recipe, m.name_or_path, must_exist, "model.name_or_path"),
                                       ref="model")
        if not m.config:
            raise PipelineError(f"{source_of(recipe, 'model', 'name_or_path', 'config')}: the model section needs "
                                f"`name_or_path` or `config`")
        fp = hash_obj({"model": dataclasses.asdict(m), "tokenizer": tokenizer_inputs(recipe)})
        return Checkpoint("model", None, fp, "config")
    if kind == "stage":
        stage_dir = recipe.stage_dir(ref)
        manifest_path = stage_dir / MANIFEST
        if not manifest_path.is_file():
            if must_exist:
                raise PipelineError(f"stage '{ref}' has not finished ({manifest_path} is missing): run it first, "
                                    f"e.g. python pipeline/run.py {recipe.path} --only {ref}")
            return Checkpoint(ref, str(stage_dir.resolve()), None, "stage")
        if must_exist and (problem := integrity.model_folder_problem(stage_dir, need_tokenizer=True)):
            raise PipelineError(f"stage '{ref}' is damaged ({problem}): rerun it, e.g. python pipeline/run.py "
                                f"{recipe.path} --only {ref} --force")
        return Checkpoint(ref, str(stage_dir.resolve()), hash_file(manifest_path), "stage")
    if kind == "local":
        path = Path(ref).expanduser()
        if must_exist and path.is_dir() and (problem := integrity.model_folder_problem(path)):
            raise PipelineError(f"checkpoint '{ref}' is damaged: {problem}")
        return Checkpoint(ref, str(path.resolve()), hash_folder(path) if path.is_dir() else hash_file(path), "local")
    return Checkpoint(ref, ref, hash_obj({"hub": ref, "revision": recipe.model.revision}), "hub")


def tokenizer_inputs(recipe) -> dict:
    """The tokenizer section as a new model's fingerprint sees it, with the contents of the chat data it trains on
    (left out when unset, as before the key; its corpus is pretrain's dataset, in pretrain's fingerprint) or of the
    folder it loads: a rewrite reruns the stages."""
    from pipeline import data

    tcfg, key = recipe.tokenizer, f"{key_prefix(recipe, 'tokenizer', 'chat_dataset')}chat_dataset"
    out = {k: v for k, v in dataclasses.asdict(tcfg).items() if k != "chat_dataset"}
    if tcfg.chat_dataset:
        out["chat_dataset"] = data.fingerprint(tcfg.chat_dataset, recipe, key=key)
    if not tcfg.train and tcfg.name_or_path and (folder := Path(tcfg.name_or_path).expanduser()).is_dir():
        out["folder_contents"] = hash_folder(folder)
    return out


def portable(recipe, checkpoint: Checkpoint) -> dict:
    """A checkpoint as the manifest records it: a path in the run folder relative to it (a moved run stays valid)."""
    out = dataclasses.asdict(checkpoint)
    if checkpoint.path and checkpoint.source in ("stage", "local"):
        path, run_dir = Path(checkpoint.path), recipe.run_dir.resolve()
        if path == run_dir or run_dir in path.parents:
            out["path"] = path.relative_to(run_dir).as_posix()
            out["in_run_dir"] = True
    return out


def usable(recipe, recorded: dict) -> Checkpoint:
    """The Checkpoint a stage loads from a recorded (portable) one."""
    values = {k: v for k, v in recorded.items() if k != "in_run_dir"}
    if recorded.get("in_run_dir"):
        values["path"] = str((recipe.run_dir / recorded["path"]).resolve())
    return Checkpoint(**values)


def trained_from(folder) -> str | None:
    """The absolute path of the model a finished stage folder started from (its manifest's `init_from`), or None
    (not a stage folder, or a model built from `model.config`). A path recorded relative to the run folder is read
    against the folder's own run folder, so a moved run still answers."""
    recorded = ((read_manifest(Path(folder)) or {}).get("inputs", {}).get("checkpoints", {}).get("init_from"))
    if not recorded or not recorded.get("path"):
        return None
    path = Path(folder).parent / recorded["path"] if recorded.get("in_run_dir") else Path(recorded["path"])
    return str(path.resolve()) if recorded.get("source") != "hub" else recorded["path"]


def stage_inputs(recipe, stage: str, must_exist: bool = True) -> dict:
    """Everything a stage's result depends on, as recorded in its manifest and hashed into its fingerprint."""
    from pipeline import data

    keys = recipe.keys(stage)
    checkpoints, datasets = {}, {}
    for f in dataclasses.fields(keys):
        value, ref = getattr(keys, f.name), f.metadata.get("ref")
        if ref == "checkpoint" and (value or f.name == "init_from"):
            checkpoints[f.name] = portable(recipe, resolve_checkpoint(recipe, value, must_exist, f"{stage}.{f.name}"))
        elif ref == "checkpoints" and value:
            checkpoints[f.name] = [portable(recipe, resolve_checkpoint(recipe, v, must_exist, f"{stage}.{f.name}"))
                                   for v in value]
        elif ref == "data" and value and not (f.metadata.get("out_at_default") and value == f.default):
            fp = data.fingerprint(value, recipe, "diffusion" in stage,
                                  key=f"{key_prefix(recipe, stage, f.name)}{f.name}")  # its override, if any
            datasets[f.name] = {"spec": value, "fingerprint": fp}
    for name, ref in tool_sources(recipe, stage).items():  # the folders the stage's tools load
        folder = recipe.run_dir / ref
        if ref not in recipe.stages and folder.is_dir():  # a folder in the run folder, where the tools look first
            checkpoints[name] = portable(recipe, Checkpoint(ref, str(folder.resolve()), hash_folder(folder), "local"))
        else:
            checkpoints[name] = portable(recipe, resolve_checkpoint(recipe, ref, must_exist))
    settings = {"section": recipe.section(stage), "seed": recipe.run.seed}
    if STAGES[stage].runs_tools and recipe.tools.tools:
        settings["tools"] = dataclasses.asdict(recipe.tools)
    if uses_vllm(recipe, stage):  # hf: the settings as before the section existed
        settings["generation"] = dataclasses.asdict(recipe.generation)
    if (own := getattr(keys, "world_settings", None)) and (names := own(recipe)):  # its datasets' are in theirs
        settings["world"] = {name: getattr(recipe.world, name) for name in names}
    if (loading := model_loading(recipe, stage)):
        settings["loading"] = loading
    return {"settings": settings, "checkpoints": checkpoints, "data": datasets}


def up_to_date(recipe, stage: str) -> tuple[bool, str]:
    manifest = read_manifest(recipe.stage_dir(stage))
    if manifest is None:
        return False, "not run yet"
    if (problem := integrity.model_folder_problem(recipe.stage_dir(stage), need_tokenizer=True)):
        return False, f"damaged: {problem}"
    inputs = stage_inputs(recipe, stage, must_exist=False)
    pending = [c["ref"] for c in _flat_checkpoints(inputs) if c["fingerprint"] is None]
    if pending:
        return False, f"input stage {pending[0]} has not finished"
    if manifest.get("fingerprint") != hash_obj(inputs):
        changed = [k for k in ("settings", "checkpoints", "data") if manifest.get("inputs", {}).get(k) != inputs[k]]
        return False, f"{', '.join(changed) or 'inputs'} changed"
    # a manifest from before `code` was recorded says nothing: else every older run would read as other code
    if manifest.get("code") not in (None, stage_code(stage)):
        return True, f"up to date, but trained by other pipeline code: --only {stage} --force retrains it"
    return True, "up to date"


def stage_code(stage: str) -> str:
    """The hash of the code that trains `stage` (its manifest's `code`): its script's import closure, and the module of
    the config class the recipe imports by name (pipeline/fingerprints.py)."""
    spec = STAGES[stage]
    config = (spec.config_class or "").split(":")[0]
    return code_hash(spec.module, *[config] * config.startswith("pipeline."))


def _flat_checkpoints(inputs: dict):
    for v in inputs["checkpoints"].values():
        yield from (v if isinstance(v, list) else [v])


def library_versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for lib in LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[lib] = metadata.version(lib)
    return out


class StageRun:
    """Context manager around one stage's output folder (see the module docstring)."""

    def __init__(self, recipe, stage: str):
        from pipeline import cluster

        cluster.check_environment()  # e.g. ZeRO-3 that would not save a loadable model: stop before any work
        self.recipe, self.stage = recipe, stage
        # a stage's use_cpu: on the CPU from the start (its processes join over gloo), whatever the machine has
        self.state = cluster.process_group(cpu=bool(recipe.section(stage).get("use_cpu")))
        log.setup(stage, self.state.is_main_process)
        if line := cluster.cpu_processes_line():  # a GPU launch config on a machine without one says so too
            log.info(line)
        threads.configure()  # this process's share of the CPUs it was given; OMP_NUM_THREADS wins (logged)
        self.inputs = stage_inputs(recipe, stage)
        self.fingerprint = hash_obj(self.inputs)
        self.code = stage_code(stage)  # at the start: an edit or a pull during training is not the code that trained it
        self.final_dir = recipe.stage_dir(stage)
        self.out = recipe.run_dir / f"{stage}.partial"
        self._new_dirs = [d for d in (recipe.run_dir, recipe.run_dir.parent) if not d.exists()]  # removed on bad input
        self._started = time.time()
        # wall/CPU time of the whole process; energy from prepare() (README "Cost per stage"); main process only
        self.meter = cost.Meter(recipe.run.carbon_country, recipe.run.carbon_intensity_g_per_kwh, whole_process=True)
        self.resumed_from: str | None = None
        self.data: dict[str, dict] = {}  # what each dataset key read: source, rows, detected format

    def note_data(self, key: str, info: dict) -> None:
        """Record (in the manifest) and log what a dataset key read, e.g. {source, rows or pairs, format}."""
        self.data[key] = info
        size = f"{info['pairs']} pairs" if "pairs" in info else f"{info.get('rows')} rows"
        log.info(f"{key}: {size} from {info.get('source')} (format {info.get('format')})")

    def checkpoint(self, name: str = "init_from") -> Checkpoint:
        return usable(self.recipe, self.inputs["checkpoints"][name])

    def checkpoints(self, name: str) -> list[Checkpoint]:
        """The checkpoints of a list-valued key (empty when unset)."""
        return [usable(self.recipe, d) for d in self.inputs["checkpoints"].get(name, [])]

    def record_attempt(self) -> None:
        """This attempt stops before finishing (an error, a preemption): add its cost so far to the staging
        folder's ATTEMPTS file, which the run that finishes adds to its own (README "Cost per stage")."""
        if not (self.state.is_main_process and (self.out / ".fingerprint").is_file()) or self._attempt_recorded:
            return
        self._attempt_recorded = True
        cuda = self.state.device.type == "cuda"
        path = self.out / ATTEMPTS
        write_json(path, [*read_attempts(path), self.meter.attempt(gpus=self.state.num_processes if cuda else 0)])

    def __enter__(self):
        self._attempt_recorded = False
        preemption.BEFORE_PREEMPTED_EXIT.append(self.record_attempt)
        preemption.watch_for_preemption()  # SIGUSR1/SIGTERM: checkpoint into self.out and exit (pipeline/preemption.py)
        faults.install_trainer_hooks()  # tests only (PIPELINE_FAULT)
        self._lock = None
        if self.state.is_main_process:
            ensure_writable(self.recipe.run_dir)
            # one writer per stage folder: taken before anything in it is touched (README "Run directory")
            self._lock = locks.Lock(self.recipe.run_dir / f"{self.stage}.lock", f"stage {self.stage}",
                                    target=str(self.final_dir)).acquire()
            if self.out.exists() and not safe_resume.keeps(self.out, self.fingerprint):
                shutil.rmtree(self.out)  # leftovers of a run with other inputs: nothing to resume
        self._resuming = self.out.exists()  # a killed attempt's folder: kept whatever stops this one (a hub offline)
        self.state.wait_for_everyone()
        return self

    def prepare(self) -> Path:
        """Create the staging folder; call once inputs are validated, so bad input writes nothing."""
        if self.state.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / ".fingerprint").write_text(self.fingerprint)
            log.attach_file(self.out)
            self.meter.start_energy()  # in a background thread; never stops the stage
        self.state.wait_for_everyone()
        faults.point("loading")
        return self.out

    def last_checkpoint(self) -> str | None:
        """The newest trainer checkpoint a killed run of the same inputs left behind."""
        # the newest one that is complete, intact and safe to load; an unsafe file stops the stage (exit 2)
        ckpt = safe_resume.find_checkpoint(self.out)
        if ckpt is not None:
            self.resumed_from = ckpt.name
            log.info("resuming from %s", ckpt)
        return str(ckpt) if ckpt else None

    def finish(self, metrics: dict, config=None, global_batch_size: int | None = None, resume_only=()) -> Path:
        """Write metrics and manifest, then publish the folder atomically. Returns the final folder. What only a
        resume reads goes after that: the trainer's checkpoints, the resume marker and `resume_only` (globs in the
        folder, e.g. the rounds' policies)."""
        self.state.wait_for_everyone()
        if self.state.is_main_process:
            write_json(self.out / METRICS, metrics)
            from pipeline import cards

            cards.write(self.out, stage=self.stage, run=self.recipe.run.name, recipe_path=str(self.recipe.path),
                        section=self.recipe.section(self.stage), inputs=self.inputs, data=self.data, metrics=metrics)
            share_with_group(self.out)
            manifest = self._manifest(config, global_batch_size)
            manifest["cost"] = self._cost()
            write_json(self.out / MANIFEST, manifest)
            log.close()  # log.txt is complete: the folder is published next
            faults.point("publish")
            old = self.final_dir.with_name(f"{self.stage}.old")
            if old.exists():
                shutil.rmtree(old)
            if self.final_dir.exists():
                os.replace(self.final_dir, old)
            os.replace(self.out, self.final_dir)
            shutil.rmtree(old, ignore_errors=True)
            # what only a resume reads goes once the folder is published: killed before, the same command resumes
            # from the last checkpoint (and counts the earlier attempts' cost), not from step 0
            for pattern in ("checkpoint-*", ".fingerprint", ATTEMPTS, *resume_only):
                for path in self.final_dir.glob(pattern):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.state.wait_for_everyone()
        return self.final_dir

    def _manifest(self, config, global_batch_size) -> dict:
        from pipeline import cluster

        return {
            "stage": self.stage,
            "run": self.recipe.run.name,
            "fingerprint": self.fingerprint,
            "code": self.code,  # the package's sources, for up_to_date's note (not in the fingerprint)
            "recipe": str(self.recipe.path),
            "overrides": self.recipe.overrides,
            "inputs": self.inputs,
            "config": config.to_dict() if hasattr(config, "to_dict") else config,
            "num_processes": self.state.num_processes,
            "global_batch_size": global_batch_size,
            "launch": cluster.launch_here(),
            "resumed_from": self.resumed_from,
            "data": self.data,
            "versions": library_versions(),
            "command": sys.argv,
            "host": socket.gethostname(),
            "started": datetime.fromtimestamp(self._started, timezone.utc).isoformat(timespec="seconds"),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_time_s": round(time.time() - self._started, 1),
        }

    def _cost(self) -> dict:
        """The manifest's `cost` block (pipeline/cost.py); one line of it in the log."""
        import torch

        cuda = self.state.device.type == "cuda"
        parameters, of = cost.saved_parameters(self.out)
        attempts = self.out / ATTEMPTS  # runs of this stage that stopped before finishing, resumed by this one
        earlier = read_attempts(attempts)  # the file goes once the stage is published (finish)
        block = self.meter.stop(gpus=self.state.num_processes if cuda else 0, parameters=parameters,
                                parameters_of=of, earlier=earlier,
                                peak_gpu_mem_mb=torch.cuda.max_memory_allocated() / (1 << 20) if cuda else None)
        kwh, co2e = block.get("energy_kwh"), block.get("co2e_kg")
        how = "estimate" if block.get("energy_estimate") else "CPU from counters"
        energy = (f"energy not recorded: {block.get('energy_error')}" if kwh is None else f"{kwh:.3g} kWh ({how})"
                  + ("" if co2e is None else f", {co2e:.3g} kg CO2e"))
        log.info(f"cost: {block['wall_s']:.0f} s wall, {block['cpu_s']:.0f} s CPU, {block['gpu_hours']:.3g} GPU-h, "
                 f"peak RSS {block['peak_rss_mb']:.0f} MiB, {energy}"
                 + (f" ({len(block['attempts'])} attempts)" if "attempts" in block else ""))
        return block

    def __exit__(self, exc_type, exc, tb):
        lock = getattr(self, "_lock", None)  # None: not the main process, or the folder is another process's
        bad_input = exc_type is not None and issubclass(exc_type, PipelineError) and lock is not None
        if exc_type is not None and not bad_input and lock is not None:
            self.record_attempt()  # an error or a signal after the staging folder was made: its cost so far
        if self.record_attempt in preemption.BEFORE_PREEMPTED_EXIT:
            preemption.BEFORE_PREEMPTED_EXIT.remove(self.record_attempt)
        self.meter.abandon()  # after finish() a no-op; otherwise stop tracking without waiting
        log.close()
        if bad_input and exc_type is not integrity.UnsafeFile and not self._resuming:  # a refused checkpoint stays
            shutil.rmtree(self.out, ignore_errors=True)  # bad input: leave nothing behind (still under the lock)
        if lock is not None:
            lock.release()  # before the empty folders go: its file is in the run folder
        if bad_input:
            for folder in self._new_dirs:  # the run folder, then the output folder, if this stage made them
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
        return False


def share_with_group(folder: Path) -> None:
    """Files as the umask allows (safetensors' writer creates weights 0600, unlike every other file)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o666 & ~mask)


def global_batch_size(args, num_processes: int) -> int:
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * num_processes


def ensure_writable(folder: Path) -> None:
    """Create the run folder, and check a file can be written in it: one line (exit 2) instead of a traceback."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise PipelineError(f"output folder {folder}: a file is in the way (not a folder)") from None
    except NotADirectoryError:
        raise PipelineError(f"output folder {folder}: a part of the path is a file, not a folder") from None
    except OSError as err:
        raise PipelineError(f"output folder {folder}: cannot create it ({err.strerror})") from None
    probe = folder / f".write-test-{os.getpid()}"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise PipelineError(f"output folder {folder}: cannot write in it ({err.strerror})") from None


def train_loss(trainer) -> float:
    """The mean training loss of the whole run, also when it was resumed (safe_resume.train_loss)."""
    return safe_resume.train_loss(trainer.state.log_history)
