"""`python pipeline/run.py RECIPE --check`: everything that can be known before a job is submitted.

For each stage: the recipe validates (done by loading it), the models and data it reads resolve (stages of the
recipe, local folders and files, world splits, hub ids), processes x per-device batch x accumulation gives the
section's `global_batch_size`, and an estimate of the memory each device needs under the launch config (weights,
gradients, optimizer state, activations, with DDP, FSDP or a DeepSpeed ZeRO stage and CPU offload) is printed,
with a warning when it is more than `--device-memory`. Model sizes come from the model configs, built on the meta
device: no weights are read. The memory estimate is pipeline/memory.py.
"""

from __future__ import annotations

import dataclasses
import glob
from pathlib import Path

from pipeline import cluster, cost_check, integrity, llamafactory, reference_free, runs
from pipeline.memory import estimate_memory, human, model_shape, profile_of
from pipeline.cli import PipelineError, typed_line
from pipeline.stages import SAMPLE_ROWS, STAGES
from pipeline.vllm_engine import uses_vllm

# ---------------------------------------------------------------------------------------------- checking


def _resolve_problem(spec: str, recipe) -> str | None:
    """None when one dataset spec resolves (a world split, a local file, folder or glob, a hub id)."""
    from pipeline import files, hub
    from pipeline.world import SPLITS

    if spec.startswith("world:"):
        split = spec.split(":", 1)[1]
        return None if split in SPLITS else f"unknown world split '{spec}' (splits: {', '.join(SPLITS)})"
    path = Path(spec).expanduser()
    if path.is_file() or path.is_dir():
        return None
    if entry := llamafactory.entry_of(spec):
        return llamafactory.source_problem(entry)
    if glob.has_magic(spec):
        return None if glob.glob(str(path), recursive=True) else f"dataset '{spec}': no file matches"
    if files.names_a_local_file(spec):
        return f"dataset '{spec}': file not found"
    if not hub.reachable():
        return None if hub.offline_by_setting() else f"dataset '{spec}': {hub.unreachable_note()}"
    try:
        from huggingface_hub import HfApi

        HfApi().dataset_info(spec.split(":", 1)[0], timeout=20)
    except Exception as err:  # not found, gated: reported as an error
        return f"dataset '{spec}': cannot resolve on the hub ({typed_line(err, 120)})"
    return None


def _rows_problem(spec, recipe, stage: str, key: str, keys, will_run) -> str | None:
    """Run the first SAMPLE_ROWS rows of a local dataset through the loader the stage uses: a bad row, a missing
    column or an unknown format is found now, not after the upstream stages ran."""
    from pipeline import data, preferences, unpaired
    from pipeline.formats import rename_columns

    rows, where, source, part_of = data.read_rows_by_part(spec, recipe,
                                                          text_split=getattr(keys, "text_split", "paragraph"))
    sampled_all = len(rows) <= SAMPLE_ROWS
    rows, where, part_of = [dict(r) for r in rows[:SAMPLE_ROWS]], where[:SAMPLE_ROWS], part_of[:SAMPLE_ROWS]
    columns = getattr(keys, "columns", None)
    if key == "heldout_prompts":  # every policy stage reads them as eval reads its prompts (pipeline/heldout.py)
        data.CHECKS["eval_prompts"](rows, where, source)
        return None
    if stage == "ppo" and key == "prompts":
        rows, places, _ = preferences.prompt_rows(rename_columns(rows, columns, source, where), where, source,
                                                  part_of, all_rows=sampled_all)
        _reward_reads(recipe, stage, keys, [r["prompt"] for r in rows], spec, will_run)
        return _template_problem(recipe, stage, keys, (rows, places), source, will_run)
    if stage in ("reward", "dpo", "kto"):
        normalize, load = ((unpaired.normalize_unpaired, unpaired.load_unpaired) if stage == "kto" else
                           (preferences.normalize_preferences, preferences.load_preferences))
        examples, _, places = normalize(rename_columns(rows, columns, source, where), where, source, part_of)
        if not examples:  # the sampled pairs all have chosen == rejected: the stage drops them and reads on, to
            load(spec, recipe, columns)  # a pair or its loader's error (PipelineError): read all of it here too
        return _template_problem(recipe, stage, keys, (examples, places), source, will_run)
    kind = {"pretrain": "text", "sft": "chat"}.get(stage, "prompts")
    if key == "perplexity_data":
        kind = "text" if "text" in rows[0] else "chat"
    elif key in ("prompts", "tool_prompts") and stage == "eval":
        kind = "eval_prompts"
    if stage == "sft":
        rows = rename_columns(rows, columns, source, where)
    kw = {"column": keys.text_column} if kind == "text" and stage == "pretrain" else {}
    rows = data.CHECKS[kind](rows, where, source, **kw)
    if key == "prompts" and stage == "eval":
        _reward_reads(recipe, stage, keys, [r.get("prompt") for r in rows], spec, will_run)
    return _template_problem(recipe, stage, keys, (rows, where), source, will_run) if stage == "sft" else None


def _template_problem(recipe, stage: str, keys, sampled: tuple, source: str, will_run) -> str | None:
    """The stage's own chat-template check (models.check_chat_template: a template that refuses a row, leaves out its
    tools, or cannot mask assistant replies) on the sampled rows (`sampled`: the rows and where each is from), with
    the tokenizer of the checkpoint the stage starts from when it is on disk now and not planned to be trained again
    first (a new model's tokenizer: not yet)."""
    from pipeline import models

    ref = keys.init_from
    cp = runs.resolve_checkpoint(recipe, ref, must_exist=False)
    if not sampled[0] or cp.path is None or cp.fingerprint is None or ref in will_run or not Path(cp.path).is_dir():
        return None  # no rows: the first rows were all identical pairs, dropped (the stage reads on)
    conversational = "messages" in sampled[0][0]  # sft's assistant-only loss defaults to it, as the stage sets it
    assistant_only = stage == "sft" and bool(recipe.section(stage).get("assistant_only_loss", conversational))
    try:
        models.check_chat_template(models.load_tokenizer(recipe, cp), {source: sampled}, assistant_only)
    except PipelineError as err:
        return str(err)
    return None


def _reward_reads(recipe, stage: str, keys, prompts: list, spec, will_run) -> None:
    """The stage's own check that its reward models can read its prompts (reward_model.check_reads: a chat template
    for conversational ones), on the sampled rows: tokenizer files only. A reward stage that runs first is left out
    (it trains with the recipe's tokenizer), as is a hub id (nothing is downloaded here)."""
    from pipeline.reward_model import check_reads

    refs = [keys.reward_model] + list(getattr(keys, "reward_ensemble", None) or [])
    checkpoints = [cp for cp in (runs.resolve_checkpoint(recipe, r, must_exist=False) for r in refs
                                 if r and r not in will_run)
                   if cp.source == "local" or (cp.source == "stage" and cp.fingerprint is not None)]
    check_reads(recipe, checkpoints, prompts, spec, f"{stage}.reward_model")


def _data_problem(spec, recipe, stage: str, key: str, keys, will_run=frozenset()) -> str | None:
    """None when a dataset spec resolves and its first rows load as the stage loads them; else what is wrong."""
    from pipeline import data

    try:
        parts, _ = data.mixture_parts(spec)
        for part in parts:
            problem = _resolve_problem(part.name, recipe)
            if problem:
                return problem
        if all(not p.name.startswith("world:") and (Path(p.name).expanduser().exists() or glob.has_magic(p.name)
                                                    or llamafactory.is_local(llamafactory.entry_of(p.name)))
               for p in parts):
            return _rows_problem(spec, recipe, stage, key, keys, will_run)
    except PipelineError as err:
        return str(err)
    return None


def _tool_parser_problem(recipe, stage: str, keys, cp) -> str | None:
    """The stage-start error of a checkpoint whose tokenizer cannot parse the policy's tool calls
    (models.check_tool_parser), read from its tokenizer alone; only for a folder there now. eval with tool_prompts
    stops on it; ppo with a tools section only if its prompts offer tools (unknown here: a warning)."""
    if not ((stage == "eval" and keys.tool_prompts) or (stage == "ppo" and recipe.tools.tools)):
        return None
    if cp.path is None or not Path(cp.path).is_dir():  # a new model gets our tokenizer; hub ids are not fetched
        return None
    from pipeline import models
    from pipeline.tool_formats import tool_parser_problem

    problem = tool_parser_problem(models.load_tokenizer(recipe, cp))
    return problem and (problem if stage == "eval" else f"{problem} (ppo stops at start if its prompts offer tools)")


def _tool_rows_problem(recipe, stage: str, key: str, keys) -> str | None:
    """The stage's own checks of all its prompts that offer tools, by tool name: no tool's stage folder is read."""
    from pipeline import data, eval_tools, ppo, ppo_tools
    here = all(p.name.startswith("world:") or Path(p.name).expanduser().exists()  # read here: nothing is downloaded
               for p in data.mixture_parts(getattr(keys, key))[0])
    try:
        if here and stage == "eval" and key == "tool_prompts":
            eval_tools.checked_rows(recipe, keys)
        elif here and stage == "ppo" and key == "prompts" and (names := recipe.tools.names):
            ppo_tools.check_offers(ppo.load_prompts(keys.prompts, recipe, keys.columns), names, keys.prompts)
    except PipelineError as err:
        return str(err)


def python_tool_problems(recipe) -> list[str]:
    """The recipe's `python` tools made as the stages that run tools make them (the recipe allows their code:
    `tools.allow_code`): a function whose schema cannot be made (no docstring, no such module) is an error now."""
    from pipeline.key_checks import source_of
    from pipeline.tools import check_section, recipe_python_tool

    problems, where = [], str(recipe.path)  # the recipe's folder: where python tools import from
    for i, entry in enumerate(check_section(dataclasses.asdict(recipe.tools), where, recipe)):
        if entry["backend"] == "python":
            try:
                recipe_python_tool(entry, f"tools.tools[{i}]", recipe.tools.timeout_s, where,
                                   source_of(recipe, "tools", "tools"))
            except PipelineError as err:
                problems.append(str(err))
    return problems


def check_stage_config(recipe, stage: str) -> None:
    """A stage's settings checks that hold on any machine (a login node has no GPU): its config class's own, and
    eval's and ppo's key rules. The runner makes them for every planned stage before the first starts, --check for
    each stage; PipelineError on the first problem."""
    recipe.check_config(stage, portable=True)
    if stage == "dpo":
        reference_free.check(recipe, stage)
    if stage == "ppo":  # the keys that stop the stage at its start whatever its data; grpo/rloo: TRL's checks too
        from pipeline.ppo_config import check_key_conflicts

        check_key_conflicts(recipe, cfg := recipe.trainer_config(stage), recipe.keys(stage))
        if cfg.algorithm != "ppo":
            from pipeline.trl_online import trl_config

            trl_config(recipe, cfg, str(recipe.stage_dir(stage)))
    if stage == "eval":
        from pipeline.evaluate import check_keys

        check_keys(recipe, recipe.keys(stage))


@dataclasses.dataclass
class StageCheck:
    stage: str
    lines: list
    errors: list
    warnings: list
    projection: object = None  # cost_check.Projection of a training stage, if its step count is known


def check_stage(recipe, stage: str, launch: cluster.Launch, device_memory: int | None,
                will_run: set = frozenset(), throughput: cost_check.Throughput | None = None) -> StageCheck:
    """`will_run`: the stages planned to run before this one (their outputs need not exist yet). `throughput`:
    what the cost projection assumes of a GPU (default: cost_check's)."""
    if STAGES[stage].check:  # a stage whose models are not causal LMs brings its own check (and launch plan)
        import importlib

        module, name = STAGES[stage].check.split(":")
        check = getattr(importlib.import_module(module), name)
        return StageCheck(stage, *check(recipe, stage, launch, device_memory, will_run))
    lines, errors, warnings = [], [], []
    keys = recipe.keys(stage)
    spec = STAGES[stage]
    config_problem = ""
    try:
        check_stage_config(recipe, stage)
    except PipelineError as err:
        errors.append(config_problem := str(err))
    # inputs
    shape = None
    for f in dataclasses.fields(keys):
        value, ref = getattr(keys, f.name), f.metadata.get("ref")
        if ref in ("checkpoint", "checkpoints") and (value or f.name == "init_from"):
            described = []
            for v in (value if isinstance(value, list) else [value]):
                try:
                    if f.name == "image_judge":  # an image classifier (ppo with tools), not a language model
                        described.append(_judge_described(recipe, v, will_run, f"{stage}.{f.name}"))
                        continue
                    cp = runs.resolve_checkpoint(recipe, v, must_exist=False)
                    if cp.source == "stage" and cp.fingerprint is None and v not in will_run:
                        if f"no `{v}` section" in config_problem:  # said by the stage's own key rule, clearer
                            continue  # (ppo_config.check_key_conflicts: ppo.reward_model, a stage not in the recipe)
                        raise PipelineError(f"reads {v}, which has not finished and is not planned to run "
                                            f"(drop --only, or add {v})")
                    if cp.source in ("stage", "local") and cp.fingerprint is not None and v not in will_run and \
                            (problem := integrity.language_model_problem(cp.path)):  # headers, not whole weights
                        raise PipelineError(f"checkpoint '{v}' is damaged: {problem}")
                    s = model_shape(recipe, v)
                    if f.name in ("init_from", "checkpoints") and \
                            (problem := _tool_parser_problem(recipe, stage, keys, cp)):
                        (errors if stage == "eval" else warnings).append(f"{stage}.{f.name}: {problem}")
                    if f.name == "init_from":
                        shape = s
                    described.append(f"{v or 'model'} ({s.source}, {s.model_type} {s.params / 1e6:.4g}M parameters)")
                except PipelineError as err:  # the image judge's line names the file and key itself
                    errors.append(str(err) if f.name == "image_judge" else f"{stage}.{f.name}: {err}")
            if described:
                lines.append(f"{f.name}: {', '.join(described)}")
        elif ref == "data" and value:
            if problem := _data_problem(value, recipe, stage, f.name, keys, will_run):
                errors.append(f"{stage}.{f.name}: {problem}")
            elif (problem := _tool_rows_problem(recipe, stage, f.name, keys)):
                errors.append(problem)  # the stage's own line: it names the file and the row or key
    data_keys = [f"{f.name} {getattr(keys, f.name)}" for f in dataclasses.fields(keys)
                 if f.metadata.get("ref") == "data" and getattr(keys, f.name)]
    if data_keys:
        lines.append("data: " + ", ".join(data_keys))
    if spec.config_class is None and shape is None:
        lines.append(f"launch: {launch.describe()}")
        return StageCheck(stage, lines, errors, warnings)
    # launch
    if launch.distributed_type == "NO" and launch.num_processes > 1:
        errors.append(f"{stage}: {launch.config} runs a single process (distributed_type NO) but "
                      f"{launch.num_processes} were asked for: use ddp.yaml, fsdp2.yaml or a zero*.yaml config")
    if not launch.save_full_model:
        errors.append(f"{stage}: {launch.config} does not save a full model (ZeRO-3 needs zero3_save_16bit_model: "
                      f"true, FSDP fsdp_state_dict_type: FULL_STATE_DICT); later stages could not load it")
    lines.append(f"launch: {launch.describe()}")
    # batch
    fields = set(_fields(stage))
    per_device = sequences = None
    if {"per_device_train_batch_size", "gradient_accumulation_steps"} <= fields:
        per_device = recipe.config_default(stage, "per_device_train_batch_size")
        accum = recipe.section(stage).get("gradient_accumulation_steps")
        expected = recipe.training_keys(stage).global_batch_size
        try:
            plan = cluster.batch_plan(stage, per_device, accum, launch.num_processes, expected)
            lines.append(f"batch: {plan.describe()}")
            sequences = plan.global_batch
        except PipelineError as err:
            errors.append(str(err))
    elif "batch_size" in fields:
        per_device = recipe.config_default(stage, "batch_size")
        lines.append(f"batch: {per_device} per process (this stage's own batch keys)")
        sequences = per_device * launch.num_processes
    if shape is not None and "max_length" in fields:  # as the stage refuses it, from the config alone
        from pipeline.generation import learned_positions_problem

        max_length = recipe.config_default(stage, "max_length")
        if problem := learned_positions_problem(shape.config, max_length, f"{stage}.max_length"):
            errors.append(problem)
    # memory
    projection = None
    if shape is not None and per_device:
        seq_len = _seq_len(recipe, stage, keys, shape)
        est = estimate_memory(shape, launch, profile=profile_of(recipe, stage), per_device=per_device,
                              seq_len=seq_len, mixed=_mixed(recipe, stage, fields),
                              weight_bytes=_weight_bytes(recipe), peft=recipe.peft_values(stage) if spec.peft else {},
                              grad_ckpt=_checkpointing(recipe, stage),
                              attn=recipe.model.attn_implementation)
        lines.append(f"memory per device: {est.describe()}")
        lines += [f"  {n}" for n in est.notes]
        budget, gen = device_memory, recipe.generation
        if uses_vllm(recipe, stage) and gen.vllm_mode == "colocate":
            share = gen.vllm_gpu_memory_utilization  # vLLM takes this share of each device up front
            budget = device_memory * (1 - share) if device_memory else None
            lines.append(f"  vLLM engine (generation.vllm_gpu_memory_utilization): {share:.0%} of each device"
                         + (f", {human(budget)} left for training" if budget else ""))
        if budget and est.total > budget:
            given = "given" if budget == device_memory else "left beside the vLLM engine"
            warnings.append(f"{stage}: needs about {human(est.total)} per device, more than the {human(budget)}"
                            f" {given}: use more processes with ZeRO-3/FSDP, CPU offload (zero3_offload.yaml), "
                            f"gradient_checkpointing, a smaller per_device_train_batch_size (raise "
                            f"gradient_accumulation_steps), or LoRA")
        # cost: FLOPs from the step count and throughput (pipeline/cost_check.py)
        if sequences:
            peft = bool(spec.peft and recipe.peft_values(stage).get("use_peft"))
            projection = cost_check.project(recipe, stage, keys, shape.params, launch.num_processes, sequences,
                                            seq_len, peft, throughput or cost_check.Throughput())
            lines.append(f"cost: {projection if isinstance(projection, str) else projection.describe()}")
            projection = None if isinstance(projection, str) else projection
    return StageCheck(stage, lines, errors, warnings, projection)


def _fields(stage):
    from pipeline.recipe import stage_fields

    return stage_fields(stage)


def _config_value(recipe, stage, fields, name, default):
    return recipe.config_default(stage, name) if name in fields else default


def _checkpointing(recipe, stage) -> bool:
    """Activation checkpointing by either of transformers' names, as the stage's config resolves them."""
    from pipeline.recipe import stage_config_class
    from pipeline.values import field_value

    return bool(field_value(stage_config_class(stage), recipe.section(stage), "activation_checkpointing"))


def _mixed(recipe, stage, fields) -> bool:
    bf16 = _config_value(recipe, stage, fields, "bf16", False)
    fp16 = _config_value(recipe, stage, fields, "fp16", False)
    if bf16 is None:  # TRL's configs: bf16 unless fp16
        bf16 = not fp16
    if _config_value(recipe, stage, fields, "use_cpu", False):
        return bool(bf16)
    return bool(bf16 or fp16)


def _weight_bytes(recipe) -> int:
    return 2 if recipe.model.dtype in ("bfloat16", "float16") else 4


def _seq_len(recipe, stage, keys, shape) -> int:
    for name in ("block_size", "max_length"):
        value = getattr(keys, name, None) if hasattr(keys, name) else None
        if value is None and name in _fields(stage):
            value = recipe.config_default(stage, name)
        if value:
            return int(value)
    fields = _fields(stage)
    if "max_new_tokens" in fields:  # generating stages: prompt and reply
        prompt = recipe.config_default(stage, "max_prompt_length") if "max_prompt_length" in fields else 256
        return int(prompt or 256) + int(recipe.config_default(stage, "max_new_tokens") or 0)
    return int(shape.max_positions or 2048)


def run_check(recipe, steps, launch_for, device_memory: int | None,
              throughput: cost_check.Throughput | None = None) -> tuple[int, int]:
    """Print the report for the planned stages and their projected cost; returns (errors, warnings)."""
    n_err = n_warn = 0
    throughput = throughput or cost_check.Throughput()
    projections = []
    print(f"check {recipe.path} -> {recipe.run_dir}/"
          + (f" (device memory {human(device_memory)})" if device_memory else ""))
    will_run = {stage for stage, run, _ in steps if run}
    tool_stages = [stage for stage, run, _ in steps if run and STAGES[stage].runs_tools]
    if recipe.tools.tools and tool_stages:  # made once for the stages that run them: one error per broken tool
        tool_errors = python_tool_problems(recipe)
        print(f"  {'tools':<10} {len(recipe.tools.tools)} tool(s), run by {', '.join(tool_stages)}")
        for e in tool_errors:
            print(f"  {'':<10} error: {e}")
        n_err += len(tool_errors)
    for stage, run, why in steps:
        try:
            launch = launch_for(stage)
            result = check_stage(recipe, stage, launch, device_memory, will_run, throughput)
        except PipelineError as err:
            result = StageCheck(stage, [], [str(err)], [])
        if why.startswith("being written now"):  # its lock stops a run started now (README "Kills, signals, locks")
            result.warnings.append(f"{stage}: {why}: a run started now stops at its lock; wait for it to finish")
        print(f"  {stage:<10} {'runs' if run else 'skipped'} ({why})")
        for line in result.lines:
            print(f"  {'':<10} {line}")
        for e in result.errors:
            print(f"  {'':<10} error: {e}")
        for w in result.warnings:
            print(f"  {'':<10} warning: {w}")
        n_err += len(result.errors)
        n_warn += len(result.warnings)
        if run and result.projection is not None:
            projections.append(result.projection)
    for line in cost_check.report(projections, throughput):
        print(line)
    print(f"{n_err} error(s), {n_warn} warning(s)" if n_err or n_warn else "ok: no problems found")
    return n_err, n_warn


def local_device_memory() -> int | None:
    """The memory of this machine's first GPU, if it has one (what --check compares with by default)."""
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def _judge_described(recipe, source: str, will_run, key: str) -> str:
    """The image judge a stage reads (ppo.image_judge): its folder, or that the stage writing it runs first."""
    from pipeline.key_checks import source_of
    from pipeline.tools import judge_folder

    if source in recipe.stages and source in will_run:
        return f"{source} (image judge: judge/ of a stage that runs first)"
    stage, name = key.split(".")  # the stage's own key, else the judge its tools name (tools.judge_source)
    where = source_of(recipe, stage, name) if name in recipe.section(stage) else source_of(recipe, "tools", "tools")
    return f"{source} (image judge: {judge_folder(source, recipe.run_dir, key, where)})"
