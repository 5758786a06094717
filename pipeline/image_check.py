"""`run.py RECIPE --check` for the image stages: inputs resolve, and an estimate of the memory per device.

Sizes come from the components' configs built on the meta device (no weights read): a new model from the section's
`unet` / `text_encoder`, a stage of the recipe from its folder (or, not trained yet, from its own section), a local
pipeline folder from its model_index.json, a hub id from the hub (configs only; offline this is an error).

The estimate: fp32 weights of every component (DPO: plus the frozen reference UNet); for the trained weights
(all of the UNet and, for a new model, the text encoder; or LoRA's rank x (in + out) per targeted attention
projection) fp32 gradients and AdamW's two moments, divided over processes by ZeRO-1/2/3 or FSDP as in
pipeline/check.py; activations ~ 24 stored values per feature-map element of every UNet block (images x channels
x height x width, summed over levels, twice for the skip paths) at 4 bytes (2 with mixed precision), attention
through PyTorch's fused SDPA (no score matrices kept), DPO doubling the batch; a VAE encoding without gradients.
Expect the real peak within some tens of percent.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pipeline import cluster, diffusion_launch, runs
from pipeline.cli import PipelineError, built_from_config, typed_line
from pipeline.diffusion_config import flip_problem
from pipeline.key_checks import source_of
from pipeline.stages import SAMPLE_ROWS

GIB = 1 << 30


def _human(n: float) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def _meta_built(build):
    import torch

    with torch.device("meta"):
        return build()


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta_count(build) -> int:
    return _count(_meta_built(build))


def _components_from_configs(unet_cfg: dict, text_cfg: dict | None, vae_cfg: dict | None, text_model_cfg=None):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from pipeline import images

    unet = _meta_built(lambda: UNet2DConditionModel.from_config(unet_cfg))  # its config: the file's, with defaults
    out = {"unet_config": dict(unet.config), "unet": _count(unet)}
    if text_model_cfg is not None:
        import transformers

        cls_name, config = text_model_cfg
        cls = getattr(transformers, cls_name or "", None) or transformers.AutoModel
        out["text_encoder"] = _meta_count(lambda: cls._from_config(config) if hasattr(cls, "_from_config")
                                          else cls.from_config(config))
    if vae_cfg is not None:
        vae = _meta_built(lambda: AutoencoderKL.from_config(vae_cfg))
        out["vae"], out["vae_factor"] = _count(vae), images.vae_factor(vae.config)
    return out


def components(recipe, ref: str | None, section_cfg: dict, resolution: int, seen=(), stage: str = "") -> dict:
    """Parameter counts (unet, text_encoder, vae) and the UNet config of the pipeline a ref names. A new model
    (`stage`'s section) is built on the meta device as the stage builds it: a bad config is one line naming it."""
    from pipeline import images

    if not ref:  # a new model from the section
        from diffusers import UNet2DConditionModel
        from transformers import T5Config

        tokenizer_size = len(images.SPECIAL_TOKENS) + len(set(images.CAPTION_WORDS) - set(images.STOP_WORDS))
        given = section_cfg.get("unet", {}).get("sample_size", resolution)
        if given != resolution:  # it was replaced by resolution without a word
            raise PipelineError(f"{recipe.path}: {stage}.unet.sample_size ({given!r}) differs from {stage}.resolution "
                                f"({resolution}): a new model's UNet is built at resolution; set resolution only")
        if section_cfg.get("use_lora"):  # LoRA would train adapters over a random, frozen UNet and text encoder
            raise PipelineError(f"{source_of(recipe, stage, 'use_lora')}: {stage}.use_lora: a new model (no "
                                f"pretrained) starts random, and LoRA freezes its UNet and text encoder; train it "
                                f"fully (use_lora false), or set pretrained")
        tcfg = {**images.DEFAULT_TEXT_ENCODER, **section_cfg.get("text_encoder", {})}
        t5 = built_from_config(lambda: T5Config(vocab_size=tokenizer_size, **tcfg),
                               f"{recipe.path}: {stage}.text_encoder")
        ucfg = {**images.DEFAULT_UNET, **section_cfg.get("unet", {}), "sample_size": resolution,
                "cross_attention_dim": tcfg["d_model"]}
        ucfg["out_channels"] = 2 * ucfg["in_channels"]
        if ucfg["in_channels"] not in (1, 3):  # the images it trains on are decoded as grey or RGB
            raise PipelineError(f"{recipe.path}: {stage}.unet: in_channels must be 1 (grey) or 3 (RGB), got "
                                f"{ucfg['in_channels']!r}")
        built_from_config(lambda: _meta_count(lambda: UNet2DConditionModel(**ucfg)), f"{recipe.path}: {stage}.unet")
        return {**_components_from_configs(ucfg, None, None, ("T5EncoderModel", t5)),
                "source": "new model from the section"}
    if ref in recipe.stages and ref not in seen:
        folder = recipe.stage_dir(ref)
        if runs.read_manifest(folder) is not None and (folder / "model_index.json").is_file():
            return {**components(recipe, str(folder), {}, resolution, (*seen, ref)), "source": "finished stage"}
        up = recipe.keys(ref)
        upstream = getattr(up, "pretrained", None) or getattr(up, "init_from", None)
        section = recipe.section(ref)
        out = components(recipe, upstream, section, getattr(up, "resolution", resolution), (*seen, ref), ref)
        return {**out, "source": "stage not trained yet"}
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise PipelineError(f"'{ref}': no model_index.json (not a diffusers pipeline folder)")
        def read(sub):
            file = path / sub / "config.json"
            return json.loads(file.read_text()) if file.is_file() else None

        from transformers import AutoConfig

        index = json.loads((path / "model_index.json").read_text())
        if problem := pipeline_problem(index, read("unet")):
            raise PipelineError(f"'{ref}': {problem}")
        text = ((index.get("text_encoder", [None, None])[1], AutoConfig.from_pretrained(str(path / "text_encoder")))
                if (path / "text_encoder").is_dir() else None)
        return {**_components_from_configs(read("unet"), None, read("vae"), text), "source": "local"}
    cp = runs.resolve_checkpoint(recipe, ref, must_exist=False)
    from pipeline import hub

    online = hub.reachable()  # offline: the cache only, at once
    try:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import AutoConfig

        index_file = hub.repo_file(cp.path, "model_index.json")
        if index_file is None:  # said below with the ref, offline as the hub's absence
            raise PipelineError(hub.load_failure(online, "the hub has no model_index.json for it (no such repo, or "
                                                         "not a diffusers pipeline)"))
        index = json.loads(index_file.read_text())
        unet = UNet2DConditionModel.load_config(cp.path, subfolder="unet") if "unet" in index else None
        if problem := pipeline_problem(index, unet):
            raise PipelineError(problem)  # said below with the ref
        vae = AutoencoderKL.load_config(cp.path, subfolder="vae") if "vae" in index else None
        text = ((index["text_encoder"][1], AutoConfig.from_pretrained(cp.path, subfolder="text_encoder"))
                if "text_encoder" in index else None)
    except PipelineError as err:
        raise PipelineError(f"'{ref}': {err}") from None
    except Exception as err:  # offline, not found, gated
        why = hub.load_failure(online, f"cannot read the pipeline's configs from the hub ({typed_line(err, 120)})")
        raise PipelineError(f"'{ref}': {why}") from None
    return {**_components_from_configs(dict(unet), None, dict(vae) if vae else None, text), "source": "hub"}


UNSUPPORTED_INPUTS = ("addition_embed_type", "class_embed_type", "num_class_embeds", "encoder_hid_dim_type")


def pipeline_problem(index, unet_config) -> str | None:
    """Why the image stages cannot train a pipeline (`index`: its model_index.json, or a loaded pipeline's config;
    `unet_config`: its UNet's), or None. They call a UNet2DConditionModel with the noisy image, the timestep and the
    text encoder's output alone: a transformer (PixArt, SD3) or a UNet that needs more inputs (SDXL's text_time
    embedding, class labels) crashed in training, and --check passed it. The stage and --check ask this one."""
    name = index.get("_class_name", "the pipeline")
    unet = index.get("unet") or [None, None]
    if unet[-1] != "UNet2DConditionModel":
        has = ", ".join(k for k, v in index.items() if not k.startswith("_") and isinstance(v, (list, tuple))
                        and v[-1] is not None)
        return (f"{name} has no UNet2DConditionModel `unet` (its components: {has}); the image stages train only "
                f"a UNet conditioned on the text alone, as SD 1.x / 2.x and IF pipelines are")
    for part in ("tokenizer", "text_encoder"):
        if not (index.get(part) or [None])[-1]:
            return f"{name} has no `{part}`: the image stages train a text-to-image UNet from captions"
    for key in UNSUPPORTED_INPUTS:
        value = (unet_config or {}).get(key)
        if value is not None and not (key == "addition_embed_type" and value == "text") and \
                not (key == "encoder_hid_dim_type" and value == "text_proj"):  # IF's: from the text alone
            return (f"{name}'s UNet has {key}: {value!r}, so it needs inputs besides the text's embeddings "
                    f"(added_cond_kwargs or class labels: SDXL's pooled text and image sizes, for one) that the image "
                    f"stages do not give; they train UNets conditioned on the text alone (SD 1.x / 2.x, IF)")
    return None


def refuse_pipeline(pipe, what: str) -> None:
    """pipeline_problem of a loaded pipeline, as one line naming `what` (the recipe and its key)."""
    unet = getattr(pipe, "unet", None)
    index = {"_class_name": type(pipe).__name__, **pipe.config}  # a loaded pipeline's config has no _class_name
    if problem := pipeline_problem(index, dict(unet.config) if unet is not None else None):
        raise PipelineError(f"{what}: {problem}")


def lora_params(unet_cfg: dict, rank: int, targets: list[str]) -> tuple[int, str | None]:
    """LoRA parameters on a UNet's attention projections, counted on the meta device, and why a target names no
    module (None: each names one)."""
    import torch
    from diffusers import UNet2DConditionModel

    from pipeline.diffusion_train import lora_target_problem

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_cfg)
    total = 0
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith(t) for t in targets):
            total += rank * (module.in_features + module.out_features)
    return total, lora_target_problem(unet, targets)


def activation_values(unet_cfg: dict, latent_res: int) -> int:
    """Feature-map elements of one image through the UNet (rough: see the module docstring)."""
    chans = unet_cfg.get("block_out_channels", [320, 640, 1280, 1280])
    layers = unet_cfg.get("layers_per_block", 2)
    total, res = 0, latent_res
    for c in chans:
        total += c * res * res * (2 * layers + 1) * 2
        res = max(1, res // 2)
    return 24 * total


def first_rows_problem(keys, section: dict) -> str | None:
    """The diffusion stage's own reader (images.load_images) on the first SAMPLE_ROWS rows of its local metadata
    file: a missing column or caption, or an image that does not decode, is the stage's line; the stage reads the
    rest (decoding every image takes some ms each: minutes for a large set)."""
    from pipeline import images

    try:  # a row's verdict is the same at any channels and resolution: the section's own
        channels = {**images.DEFAULT_UNET, **section.get("unet", {})}["in_channels"]
        images.load_images(keys.dataset, keys.resolution, channels, max_rows=SAMPLE_ROWS,
                           image_column=keys.image_column, caption_column=keys.caption_column)
    except PipelineError as err:
        return str(err)
    return None


def caption_and_judge_problems(recipe, stage: str, keys, ref: str | None, will_run=frozenset(),
                               captions: dict | None = None) -> list[str]:
    """What the stage reads besides its model, read as it reads them: caption files (DPO's dataset, held-out
    captions), DPO's pairs of your own (their rows, that their image files exist, and the images of the first
    SAMPLE_ROWS pairs decode) and its image judge, which `--check` passed and the stage then refused after loading its
    model. `captions`, if given, gets each key's (where, caption) rows read here (for caption_word_problems: read
    once)."""
    from pipeline import image_eval, image_files, image_pairs, images

    captions = {} if captions is None else captions

    out, own = [], None
    try:  # a spec that names nothing readable: check_image_stage said dataset_source's line already
        absent = keys.dataset != images.WORLD_SPEC and not image_files.dataset_source(keys.dataset)
    except PipelineError:
        absent = True
    try:
        own = stage == "diffusion_dpo" and not absent and image_pairs.pair_file(keys.dataset)
    except PipelineError as err:
        if not image_files.is_hub_id(keys.dataset):  # a hub dataset's failure is said with the dataset's line
            out.append(f"{stage}.dataset: {err}")
        absent = True
    judged = bool(getattr(keys, "judge_epochs", 1))  # without a judge diffusion draws a file's captions, any words
    specs = [("heldout_captions", keys.heldout_captions)] \
        if judged or keys.heldout_captions != images.WORLD_SPEC else []
    if stage == "diffusion_dpo" and keys.dataset != images.WORLD_SPEC and not (own or out or absent):
        specs.append(("dataset", keys.dataset))
    for key, spec in specs:
        try:
            captions[key] = image_eval.caption_rows(spec, recipe, judged=judged or key != "heldout_captions")
        except PipelineError as err:
            out.append(f"{stage}.{key}: {err}")
    if stage != "diffusion_dpo":
        return out
    try:
        eval_file = image_pairs.pair_file(keys.eval_dataset)
        if problem := image_pairs.section_problem(keys, recipe.section(stage).get("rounds", 1), own, eval_file):
            out.append(f"{stage}.{problem}")

        def check_file(file, where: str):  # only a local file can be missing (not a hub dataset's, stored bytes)
            if lost:  # the first missing file is said: no more stat calls or decoding after it
                return
            if isinstance(file, Path) and not file.is_file():
                lost.append(f"{where}: no image file {file}")
            elif isinstance(path, Path) and len(decoded) < 2 * SAMPLE_ROWS:  # a local file's first pairs, decoded
                # as the stage decodes them; an image's verdict is the same at any channels and resolution
                decoded.append(image_files.check_decodes(file, path, where, channels=3, resolution=16))

        for key, path in (("dataset", own), ("eval_dataset", eval_file)):
            lost, decoded = [], []  # this file's missing image files and decoded images, in the pass over its rows
            try:  # pair_file read the columns only: a later row that does not read is said here
                if path:
                    _, texts, where, _ = image_pairs.pair_rows(path, check_file)
                    captions[key] = [(f"{path}: {w}", text) for w, text in zip(where, texts)]
            except PipelineError as err:
                out.append(f"{stage}.{key}: {err}")
            if lost:
                out.append(f"{stage}.{key}: {path}: {lost[0]}")
    except PipelineError as err:
        out.append(f"{stage}: {err}")
    if absent or (own and not keys.heldout_captions):  # pairs of your own, no held-out captions: no judge is read
        return out
    if keys.judge:
        judge = Path(keys.judge).expanduser()
    elif ref in recipe.stages and ref in will_run:  # trained by this run: it writes judge/ unless judge_epochs is 0
        judge = None if getattr(recipe.keys(ref), "judge_epochs", 0) else Path(f"{ref} (judge_epochs: 0)")
    else:
        judge = Path(runs.resolve_checkpoint(recipe, ref, must_exist=False).path or ref) / "judge"
    if judge is not None and not ((judge / "config.json").is_file() and (judge / "model.safetensors").is_file()):
        use = ("the held-out captions are scored with it; or set heldout_captions empty" if own else
               "diffusion_dpo labels its pairs with it")
        out.append(f"{stage}.judge: no image judge in {judge} (train the diffusion stage with judge_epochs > 0, or "
                   f"point `judge` at one: {use})")
    return out


def caption_word_problems(recipe, stage: str, keys, ref: str | None, captions: dict) -> list[str]:
    """The stage's refusal of captions with words its model's word-level tokenizer does not know (image_captions),
    where the tokenizer is known without loading a model: `captions` holds the rows already read, by key."""
    from pipeline import image_captions, images

    if not (captions or ref):  # a new model knows the words of its training captions, and nothing else is read
        return []
    tokenizer = image_captions.ref_tokenizer(recipe, ref, keys)
    if tokenizer is None:
        return []
    if stage == "diffusion" and ref:  # a pretrained word-level model: its training captions too
        captions = {"dataset": image_captions.world_captions() if keys.dataset == images.WORLD_SPEC
                    else image_captions.dataset_captions(keys.dataset, keys.caption_column), **captions}
    elif stage == "diffusion_dpo" and keys.dataset == images.WORLD_SPEC:
        captions = {"dataset": image_captions.world_captions(), **captions}
    for key, rows in captions.items():
        if problem := image_captions.caption_words_problem(tokenizer, rows):
            return [f"{stage}.{key}: {problem}"]
    return []


def check_image_stage(recipe, stage: str, launch, device_memory: int | None, will_run=frozenset()):
    """(lines, errors, warnings) for an image stage. Under a DeepSpeed `launch` it is planned as the stage runs it:
    ZeRO-3 and fp16 as DDP (cluster.leave_deepspeed), and a config file contradicting the recipe is an error, as in
    the stage (diffusion_launch.config_problem)."""
    from pipeline import images
    from pipeline.recipe import stage_fields

    lines, errors, warnings = [], [], []
    keys = recipe.keys(stage)
    section = recipe.section(stage)
    fields = stage_fields(stage)
    cfg = {k: v for k, v in section.items() if fields[k][0] == "config"}
    ref_key = "pretrained" if hasattr(keys, "pretrained") else "init_from"
    ref = getattr(keys, ref_key)
    comps = None
    try:  # the config class's own checks (names of schedulers, samplers, precisions), as the stage runs them
        recipe.check_config(stage, portable=True)
        stage_cfg = recipe.trainer_config(stage, num_processes=0)  # its values and defaults (DiffusionConfig, ...)
    except PipelineError as err:
        errors.append(str(err))
        stage_cfg = None
    if problem := flip_problem(getattr(stage_cfg, "random_flip", False), keys.dataset):
        errors.append(f"{source_of(recipe, stage, 'random_flip', 'dataset')}: {stage}.random_flip: {problem}")
    if stage_cfg is not None and launch.distributed_type == "DEEPSPEED":
        if why := cluster.data_parallel_under_deepspeed(stage, launch.zero_stage, stage_cfg.mixed_precision):
            launch = dataclasses.replace(launch, distributed_type="MULTI_GPU", zero_stage=0, offload_optimizer=False,
                                         offload_params=False, save_full_model=True)  # as leave_deepspeed runs it
            lines.append(cluster.data_parallel_line(stage, why))
        elif launch.deepspeed_file and (problem := diffusion_launch.config_problem(
                launch.deepspeed_file, stage_cfg, stage, launch.num_processes)):
            errors.append(problem)
    try:
        if ref:
            cp = runs.resolve_checkpoint(recipe, ref, must_exist=False)
            if cp.source == "stage" and cp.fingerprint is None and ref not in will_run:
                raise PipelineError(f"reads {ref}, which has not finished and is not planned to run")
        comps = components(recipe, ref, section, getattr(keys, "resolution", 16), stage=stage)
        sizes = ", ".join(f"{k} {comps[k] / 1e6:.4g}M" for k in ("unet", "text_encoder", "vae") if k in comps)
        lines.append(f"{ref_key}: {ref or 'new model'} ({comps['source']}; {sizes} parameters)")
    except PipelineError as err:
        errors.append(f"{stage}.{ref_key}: {err}" if ref else str(err))
    spec = keys.dataset
    if spec != images.WORLD_SPEC:
        from pipeline.image_files import dataset_source, hub_rows

        try:
            source = dataset_source(spec, images.WORLD_SPEC)
        except PipelineError as err:
            errors.append(f"{stage}.dataset: {err}")
            source = None
        if isinstance(source, str):
            try:  # the stage reads it the same way: from the datasets cache afterwards
                lines.append(f"hub dataset {spec}: {len(hub_rows(spec)[0])} rows")
            except PipelineError as err:
                errors.append(f"{stage}.dataset: {err}")
        elif source and stage == "diffusion" and (problem := first_rows_problem(keys, section)):
            errors.append(f"{stage}.dataset: {problem}")
    captions: dict = {}
    errors += caption_and_judge_problems(recipe, stage, keys, ref, will_run, captions)
    errors += caption_word_problems(recipe, stage, keys, ref, captions)
    held = f", heldout_captions {keys.heldout_captions}" if keys.heldout_captions else ""
    held += f", eval_dataset {keys.eval_dataset}" if getattr(keys, "eval_dataset", None) else ""
    lines.append(f"data: dataset {spec}{held}")
    lines.append(f"launch: {launch.describe()}")
    if comps is None:
        return lines, errors, warnings
    n = max(1, launch.num_processes)
    per_device = cfg.get("batch_size", 64 if stage == "diffusion" else 32)
    accum = cfg.get("gradient_accumulation_steps", 1)
    lines.append(f"batch: {per_device} per process x {accum} accumulation x {n} processes = {per_device * accum * n}"
                 + (" pairs" if stage == "diffusion_dpo" else " images"))
    use_lora = cfg.get("use_lora", False)
    if use_lora:
        trainable, problem = lora_params(comps["unet_config"], cfg.get("lora_rank", 8),
                                         cfg.get("lora_target_modules", ["to_q", "to_k", "to_v", "to_out.0"]))
        if problem:
            errors.append(f"{stage}.lora_target_modules: {problem}")
    else:
        trainable = comps["unet"] + (comps.get("text_encoder", 0) if stage == "diffusion" and
                                     images.trains_text_encoder(cfg.get("train_text_encoder"), bool(ref)) else 0)
    weights = 4 * (comps["unet"] + comps.get("text_encoder", 0) + comps.get("vae", 0))
    if stage == "diffusion_dpo":
        weights += 4 * comps["unet"]  # the frozen reference
    grads, optimizer = 4 * trainable, 8 * trainable
    zero = launch.zero_stage if launch.distributed_type == "DEEPSPEED" else 0
    sharded = launch.fsdp_version > 0
    if zero:  # ZeRO-1/2 (ZeRO-3 runs them as DDP): DeepSpeed also clones the fp32 weights of each process's partition
        optimizer += 4 * trainable
    if zero >= 1 or sharded:
        optimizer /= n
    if zero >= 2 or sharded:
        grads /= n
    host = 0.0
    if launch.offload_optimizer:
        host, optimizer = optimizer, 0
    mixed = stage_cfg is not None and stage_cfg.mixed_precision in ("bf16", "fp16", "auto")  # auto: bf16 on a GPU
    latent_res = comps["unet_config"].get("sample_size") or 16
    if ref and "resolution" in section:  # a pretrained pipeline trained at another size (as the stage checks it)
        multiple = images.side_multiple(comps["unet_config"], comps.get("vae_factor", 1))
        if problem := images.resolution_problem(keys.resolution, multiple):
            errors.append(f"{stage}.resolution: {problem}")
        latent_res = max(1, keys.resolution // comps.get("vae_factor", 1))
    images_per_step = per_device * (2 if stage == "diffusion_dpo" else 1)
    activations = images_per_step * activation_values(comps["unet_config"], latent_res) * (2 if mixed else 4)
    parts = {"weights": weights, "gradients": grads, "optimizer": optimizer, "activations": activations}
    if zero:  # the fp32 buffer ZeRO-1/2 reduce gradients through, whatever the model's size
        parts["reduce bucket"] = 4 * launch.reduce_buffer
    parts["overhead"] = 0.75 * GIB + 0.05 * sum(parts.values())
    total = sum(parts.values())
    lines.append(f"memory per device: ~{_human(total)} (" + ", ".join(f"{k} {_human(v)}" for k, v in parts.items())
                 + ")" + (f"; {_human(host)} in CPU memory" if host else ""))
    if use_lora:
        lines.append(f"  LoRA: {trainable / 1e6:.3g}M trainable of {comps['unet'] / 1e6:.4g}M UNet parameters")
    if device_memory and total > device_memory:
        warnings.append(f"{stage}: needs about {_human(total)} per device, more than the {_human(device_memory)} "
                        f"given: lower batch_size (raise gradient_accumulation_steps), use LoRA, mixed precision "
                        f"or ZeRO")
    return lines, errors, warnings
