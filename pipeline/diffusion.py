"""Image stage 1, diffusion: a text-to-image diffusion model trained with diffusers.

    accelerate launch pipeline/diffusion.py recipes/small.yaml [diffusion.max_steps=500 ...]

Without `pretrained`, a new pixel-space pipeline in diffusers' IFPipeline layout is built from the section's `unet`
and `text_encoder` configs (a word-level tokenizer over the captions' words, a small T5 encoder trained with the
UNet) and trained from nothing; with `pretrained` (a stage, a folder or a hub id of any diffusers text-to-image
pipeline) it is fine-tuned, fully or with LoRA (`use_lora`), in its VAE's latent space if it has one, as diffusers'
train_text_to_image(_lora).py do. DDPM noise schedule, epsilon (or v) prediction, captions dropped for
classifier-free guidance, EMA weights, Accelerate's mixed precision; the saved scheduler is a fast sampler
(`sampler`: DDIM by default, or DPM-Solver++, Euler, DDPM). The output folder loads with
`DiffusionPipeline.from_pretrained(folder)` (safetensors).

At the end the image judge is trained on the world's real images (`judge/`), the model draws every held-out
caption and the judge scores the images: metrics.json, report.md, grid.png, samples/. Without a judge
(`judge_epochs` 0, the default for your own images) a file of held-out captions of your own is drawn the same way,
unscored, into grid.png and samples/ (diffusers' validation_prompts). Section keys:
DiffusionConfig (pipeline/diffusion_config.py) and DiffusionKeys (pipeline/stages.py).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, never shadow libraries with our modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import dataclasses
import time

from pipeline import (cli, cluster, diffusion_config, diffusion_launch, diffusion_train, image_captions, image_check,
                      image_eval, images, log, runs)
from pipeline.key_checks import source_of
from pipeline.recipe import load_recipe, stage_help

STAGE = "diffusion"
USAGE = "usage: pipeline/diffusion.py RECIPE [diffusion.KEY=VALUE ...]"


def main(argv):
    recipe = load_recipe(*cli.split_stage_args(argv, USAGE, lambda: stage_help(STAGE)))
    recipe.check_config(STAGE, portable=True)  # the config class's own checks before upstream stages
    keys = recipe.keys(STAGE)
    cfg = recipe.trainer_config(STAGE)  # DiffusionConfig; seed: run.seed unless the section sets one
    cfg.train_text_encoder = images.trains_text_encoder(cfg.train_text_encoder, bool(keys.pretrained))
    if problem := diffusion_config.flip_problem(cfg.random_flip, keys.dataset):  # before any folder is made
        raise cli.PipelineError(f"{source_of(recipe, STAGE, 'random_flip', 'dataset')}: {STAGE}.random_flip: {problem}")
    if not keys.pretrained:  # a new model: its unet / text_encoder configs build (on the meta device) before any work
        image_check.components(recipe, None, recipe.section(STAGE), keys.resolution, stage=STAGE)
    ddp_warning = cluster.leave_deepspeed(STAGE, cfg.mixed_precision)  # ZeRO-3, fp16: DDP (cluster.py says why)
    diffusion_launch.check_launch(STAGE, cfg)  # a DeepSpeed config contradicting the recipe, before any folder
    with runs.StageRun(recipe, STAGE) as run:
        if ddp_warning:  # said here: from the main process only, and into the stage's log.txt
            log.warning(ddp_warning)
        diffusion_launch.check_resume(run.out)  # a checkpoint this launch cannot read, before any model loads
        images.make_scheduler(cfg.sampler, {})  # an unknown sampler fails here, before any work
        pipe = images.load_pipeline(run.checkpoint("pretrained").path,
                                    key=f"{source_of(recipe, STAGE, 'pretrained')}: {STAGE}.pretrained") \
            if keys.pretrained else None
        if pipe:  # SDXL's UNet, PixArt's transformer: a traceback in training before
            image_check.refuse_pipeline(pipe, f"{recipe.path}: diffusion.pretrained '{keys.pretrained}'")
        channels = {**images.DEFAULT_UNET, **cfg.unet}["in_channels"]  # a new model: grey unless its unet says 3
        shape = images.pipeline_shape(pipe) if pipe else {"resolution": keys.resolution, "channels": channels,
                                                          "latent": False}
        if pipe and "resolution" in recipe.section(STAGE):  # as diffusers' --resolution: train at another size
            if problem := images.resolution_problem(keys.resolution, shape["multiple"]):
                raise cli.PipelineError(f"{recipe.path}: diffusion.resolution: {problem}")
            shape["resolution"] = keys.resolution
            # saved so, the pipeline, draw_image and the evaluation draw at the trained side (sample_size: in VAE cells)
            pipe.unet.register_to_config(sample_size=keys.resolution // images.vae_factor(
                pipe.vae.config if getattr(pipe, "vae", None) is not None else None))
        source = images.load_images(keys.dataset, shape["resolution"], shape["channels"], cfg.property_dropout,
                                    key=f"{source_of(recipe, STAGE, 'dataset')}: {STAGE}.dataset",
                                    image_column=keys.image_column, caption_column=keys.caption_column)
        # without a judge, captions of your own are drawn to look at (diffusers' validation_prompts); the world's
        # held-out captions are there for the judge to score
        judged = bool(keys.judge_epochs)
        held_rows = image_eval.caption_rows(keys.heldout_captions, recipe, judged=judged) \
            if judged or keys.heldout_captions != images.WORLD_SPEC else []
        heldout = [text for _, text in held_rows]
        # a word-level tokenizer (a new model's, or one reused) reads words it was not built on as <unk>, silently
        tokenizer = pipe.tokenizer if pipe else images.build_tokenizer(getattr(source, "texts", ()))
        known = [*image_captions.source_captions(source), *held_rows]
        if problem := image_captions.caption_words_problem(tokenizer, known):
            raise cli.PipelineError(problem)
        run.note_data("dataset", {"source": keys.dataset, "rows": source.size, "format": "images"})
        if getattr(source, "resized", 0):
            log.info(f"{source.resized} of {source.size} images are not {shape['resolution']}x{shape['resolution']}: "
                     f"resized (shorter side) and centre-cropped")
        run.prepare()

        import torch

        precision = diffusion_config.mixed_precision_here(cfg.mixed_precision, STAGE)
        accelerator = diffusion_launch.make_accelerator(precision, cfg.gradient_accumulation_steps)
        main_process = accelerator.is_main_process
        torch.manual_seed(cfg.seed)
        if pipe is None:
            pipe = images.new_pipeline(cfg, keys.resolution, getattr(source, "texts", ()))
        pipe.to(accelerator.device)  # the frozen VAE and text encoder too: accelerator.prepare moves only what trains
        noise_scheduler = images.make_scheduler("ddpm", pipe.scheduler.config)
        if "prediction_type" in recipe.section(STAGE):  # as diffusers' --prediction_type: over a loaded pipeline's
            noise_scheduler.register_to_config(prediction_type=cfg.prediction_type)
        unet, text_encoder, vae = pipe.unet, pipe.text_encoder, getattr(pipe, "vae", None)
        diffusion_train.set_attention(unet, cfg.attn_implementation)
        if vae is not None:
            vae.requires_grad_(False).eval()
        if cfg.use_lora:
            diffusion_train.add_lora(unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules,
                                     f"{source_of(recipe, STAGE, 'lora_target_modules')}: {STAGE}")
        text_encoder.requires_grad_(cfg.train_text_encoder and not cfg.use_lora)
        modules = {"unet": unet, **({"text_encoder": text_encoder} if cfg.train_text_encoder and not cfg.use_lora
                                    else {})}
        if "text_encoder" not in modules:
            text_encoder.eval()
        params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
        if main_process:
            counts = {k: sum(p.numel() for p in m.parameters()) for k, m in modules.items()}
            log.info(f"{'new ' if not keys.pretrained else ''}{type(pipe).__name__}: "
                     + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items())
                     + f", trainable {sum(p.numel() for p in params) / 1e6:.3f}M; {shape['resolution']}px x "
                     f"{shape['channels']}, {source.size} training images, {accelerator.num_processes} process(es)")

        def step_fn(prepared, step, micro, gen):
            loss = diffusion_train.text_to_image_loss(
                pipe, prepared["unet"], prepared.get("text_encoder", text_encoder), noise_scheduler, source, cfg, gen,
                accelerator.device, vae=vae, train_text_encoder="text_encoder" in prepared)
            return loss, {}

        started = time.time()
        history, prepared = diffusion_train.train_loop(accelerator=accelerator, run=run, cfg=cfg, tag="diffusion",
                                                       modules=modules, step_fn=step_fn, ema_params=params,
                                                       precision=precision)
        train_s = time.time() - started
        accelerator.wait_for_everyone()

        metrics = {}
        if main_process:
            unet = accelerator.unwrap_model(prepared["unet"]).eval()
            diffusion_train.save_pipeline(pipe, unet, run.out, cfg.use_lora,
                                          scheduler=images.make_scheduler(cfg.sampler, noise_scheduler.config))
            if keys.dataset == images.WORLD_SPEC:  # the digit world's captions: what the model was trained in
                images.write_json(run.out / "world.json", images.world_json())
            metrics = {"steps": cfg.max_steps, "train_loss": history[-1]["loss"] if history else None,
                       "train_wall_s": round(train_s, 1), "mixed_precision": precision, "history": history}
            if keys.judge_epochs:
                from pipeline.image_judge import train_judge

                started = time.time()
                judge, judge_metrics = train_judge(cfg.seed, epochs=keys.judge_epochs)
                judge.save(run.out / "judge")
                metrics.update(judge_metrics, judge_wall_s=round(time.time() - started, 1))
                log.info("judge on held-out real images: " + ", ".join(
                    f"{k} {v:.3f}" for k, v in judge_metrics["judge_heldout_accuracy"].items()))
            evals, notes = {}, []
            saved = images.load_pipeline(str(run.out))  # what a user loads: the check that the folder works
            saved.set_progress_bar_config(disable=True)
            settings = {"samples": keys.heldout_samples, "steps": keys.sample_steps, "guidance": keys.guidance_scale,
                        "seed": cfg.seed, "columns": keys.grid_columns, "name": "model"}
            if heldout and judged:
                started = time.time()
                evals["model"] = image_eval.evaluate(saved, judge, heldout, run.out, **settings)
                evals["model"].pop("matches")
                acc = evals["model"]["accuracy"]
                metrics = {"heldout_digit_accuracy": acc["digit"]["mean"], "heldout_all_accuracy": acc["all"]["mean"],
                           **metrics, "heldout": evals["model"],
                           "real_diversity": image_eval.real_diversity(heldout, keys.heldout_samples),
                           "eval_wall_s": round(time.time() - started, 1)}
                log.info("held-out captions: " + ", ".join(
                    f"{m} {image_eval.fmt(acc[m])}" for m in image_eval.MEASURES if acc.get(m)))
            elif heldout:
                started = time.time()
                image_eval.draw(saved, heldout, run.out, **settings)
                drew = (f"{len(heldout)} held-out captions of {keys.heldout_captions}, {keys.heldout_samples} images "
                        f"each, drawn without a judge (not scored)")
                metrics["heldout_drawn"] = {"captions": heldout, "samples": keys.heldout_samples,
                                            "eval_wall_s": round(time.time() - started, 1)}
                log.info(f"{drew}: grid.png, samples/model/")
                notes += [f"{drew}, a row each: ![samples](grid.png) (a strip per caption in samples/model/).", ""]
            drawn = (f"; held-out captions drawn by it with {keys.sample_steps} steps, guidance "
                     f"{keys.guidance_scale}" if heldout else "; nothing drawn at the end (no held-out captions)")
            notes += [f"Model: {type(pipe).__name__}, {cfg.max_steps} steps of {cfg.batch_size} images "
                      f"x {accelerator.num_processes} process(es) x {cfg.gradient_accumulation_steps} accumulation, "
                      f"{train_s:.0f} s; saved sampler {cfg.sampler}{drawn}. "
                      f"Load it: `DiffusionPipeline.from_pretrained(\"{run.final_dir}\")`."]
            (run.out / "report.md").write_text(image_eval.report("Diffusion stage", metrics, evals, notes))
        run.finish(metrics, config=dataclasses.asdict(cfg))


if __name__ == "__main__":
    cli.run_main(main)
