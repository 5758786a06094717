"""Image stage 2, diffusion_dpo: a text-to-image model tuned from image preferences with Diffusion-DPO.

    accelerate launch pipeline/diffusion_dpo.py recipes/small.yaml [diffusion_dpo.beta=1000 ...]

The model of `init_from` (the `diffusion` stage by default) is the start and the frozen reference. It draws
`candidates_per_caption` images for every training caption; a simulated annotator reads them with the image judge
and prefers, within each caption's draw, the image that matches more of its caption (the digit first), its label
flipped with probability `label_noise` as the text world's annotators do. Those pairs train the UNet with the
Diffusion-DPO loss (Wallace et al. 2023; pipeline/diffusion_train.py), the text encoder frozen, fully or with LoRA.
With `rounds` > 1 the steps are split into rounds and each later round's candidates are drawn by the model tuned so
far (online, as `dpo.rounds`); the reference stays the start model.
At the end the start and the tuned model draw the held-out captions with the same seeds (the start's images and
readings are the init stage's own where it drew them so: image_eval.recorded); the judge's accuracies, their paired
differences with 95% intervals, report.md and grids are written. Section keys: DiffusionDPOConfig
(pipeline/diffusion_config.py) and DiffusionDPOKeys (pipeline/stages.py).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, never shadow libraries with our modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import dataclasses
import json
import random
import shutil
import time

from pipeline import (cli, cluster, diffusion_config, diffusion_launch, diffusion_train, image_captions, image_check,
                      image_eval, image_pairs, images, log, runs)
from pipeline.key_checks import source_of
from pipeline.recipe import load_recipe, stage_help

STAGE = "diffusion_dpo"
HELD_OUT_DRAWS = 4  # noisings per held-out pair (fixed seeds): the implicit accuracy's estimate per pair
USAGE = "usage: pipeline/diffusion_dpo.py RECIPE [diffusion_dpo.KEY=VALUE ...]"


def round_pairs(pipe, judge, captions, cfg, keys, out: Path, r: int) -> tuple:  # (DrawnPairs, stats)
    """Round r's preference pairs: `candidates_per_caption` images per caption drawn by `pipe` as it is now (round 0:
    the start model; later rounds: the model tuned so far), labelled by the simulated annotator. Cached in
    out/pairs-r.safetensors + pairs-r.json (written last, atomically), so a resumed run reuses them."""
    from safetensors.torch import load_file, save_file

    from pipeline.image_judge import annotate_pairs, score_images

    cache, meta_file = out / f"pairs-{r}.safetensors", out / f"pairs-{r}.json"
    if cache.is_file() and meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        t = load_file(str(cache))
        return image_pairs.DrawnPairs(t["chosen"], t["rejected"], meta["captions"]), meta["stats"]
    started = time.time()
    k = cfg.candidates_per_caption
    expanded = [c for c in captions for _ in range(k)]
    steps = cfg.candidate_steps or keys.sample_steps
    drawn = images.generate(pipe, expanded, steps=steps, guidance=keys.guidance_scale, seed=cfg.seed + 1 + r,
                            desc=f"round {r + 1} candidates")
    rows = score_images(judge, drawn, expanded)
    rng = random.Random(cfg.seed + r)
    pairs = []
    for g in range(len(captions)):
        labelled = annotate_pairs(rows, list(range(g * k, (g + 1) * k)), cfg.label_noise, rng,
                                  digit_only=cfg.pair_filter == "digit")
        pairs += [(w, lose, clean, expanded[w]) for w, lose, clean in labelled]
    if not pairs:
        raise cli.PipelineError(f"diffusion_dpo: round {r + 1}: the annotator found no pair with a preference (every "
                                "candidate of every caption scored the same, or none differed on the digit under "
                                "pair_filter: digit): raise candidates_per_caption")
    chosen = drawn[[p[0] for p in pairs]] * 2 - 1
    rejected = drawn[[p[1] for p in pairs]] * 2 - 1
    stats = {"round": r + 1, "candidates": len(expanded), "sampler_steps": steps, "pairs": len(pairs),
             "pairs_clean_agree": sum(p[2] for p in pairs) / len(pairs),
             "candidate_digit_accuracy": sum(row["match"].get("digit", 0) for row in rows) / len(rows),
             "candidate_all_accuracy": sum(row["match"].get("all", 0) for row in rows) / len(rows),
             "wall_s": round(time.time() - started, 1)}
    save_file({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}, str(cache))
    runs.write_json(meta_file, {"captions": [p[3] for p in pairs], "stats": stats})
    log.info(f"round {r + 1}: {stats['pairs']} pairs from {stats['candidates']} candidates (candidates' digit "
             f"accuracy {stats['candidate_digit_accuracy']:.3f}, all {stats['candidate_all_accuracy']:.3f}; labels "
             f"agreeing with the noise-free annotator {stats['pairs_clean_agree']:.3f})")
    return image_pairs.DrawnPairs(chosen, rejected, [p[3] for p in pairs]), stats


def report_notes(init, cfg, keys, pair_stats: dict, metrics: dict, train_s: float, noise_scheduler) -> list[str]:
    """report.md's lines below the held-out captions' table: where the pairs came from, how they trained, the
    held-out pairs' accuracy."""
    if "source" in pair_stats:
        source = (f"{pair_stats['pairs']} pairs of your own from `{pair_stats['source']}`"
                  + (f" ({pair_stats['ties_dropped']} ties dropped)" if pair_stats["ties_dropped"] else ""))
    else:
        source = (f"{pair_stats['pairs']} pairs in {cfg.rounds} round(s), each drawn by the model as it was at the "
                  f"round's start ({pair_stats['sampler_steps']} sampler steps per candidate) and labelled by the "
                  f"simulated annotator (label noise {cfg.label_noise}; round 1: {pair_stats['pairs_clean_agree']:.3f}"
                  f" agree with the noise-free annotator), pairs "
                  f"{'of differing digits' if cfg.pair_filter == 'digit' else 'of any difference'}")
    notes = [f"Diffusion-DPO from `{init.ref}` (also the frozen reference): {source}; {cfg.max_steps} steps of "
             f"{cfg.batch_size} pairs, beta {cfg.beta}, learning rate {cfg.learning_rate}, noised at t < "
             f"{cfg.max_timestep or noise_scheduler.config.num_train_timesteps}, denoising loss weight "
             f"{cfg.sft_weight} on {'both images' if cfg.sft_images == 'both' else 'the chosen image'}, "
             f"{train_s:.0f} s."]
    if "heldout_pairs" in metrics:
        acc = metrics["heldout_pairs"]
        notes += ["", f"Held-out pairs (`{keys.eval_dataset}`): the tuned model prefers {image_eval.fmt(acc)} of "
                      f"{acc['pairs']} as labelled (Diffusion-DPO's implicit accuracy: its error on the chosen image "
                      f"fell further below the reference's than on the rejected one, over {acc['draws']} noisings "
                      f"per pair; 95% bootstrap interval). The start model scores 0.5."]
    if "gain" in metrics:
        notes += ["", "`start` is the model before tuning, drawn with the same seeds (the init stage's own held-out "
                      "images and readings where it drew them so); the paired gain (tuned − start, per image) with "
                      "its 95% interval is in metrics.json (`gain`).", "",
                  "Start model's samples: ![start](grid_start.png)"]
    elif "heldout_pairs" in metrics:
        notes += ["", "The held-out pairs' first captions, drawn by the start and the tuned model with the same "
                      "seeds: ![samples](grid.png)"]
    return notes


def main(argv):
    recipe = load_recipe(*cli.split_stage_args(argv, USAGE, lambda: stage_help(STAGE)))
    recipe.check_config(STAGE, portable=True)  # the config class's own checks before upstream stages
    keys = recipe.keys(STAGE)
    cfg = recipe.trainer_config(STAGE)  # DiffusionDPOConfig; seed: run.seed unless the section sets one
    own_file = image_pairs.pair_file(keys.dataset)  # pairs of your own, or captions the start model draws for
    eval_file = image_pairs.pair_file(keys.eval_dataset)
    if problem := image_pairs.section_problem(keys, cfg.rounds, own_file, eval_file):
        raise cli.PipelineError(f"{recipe.path}: diffusion_dpo.{problem}")
    ddp_warning = cluster.leave_deepspeed(STAGE, cfg.mixed_precision)  # ZeRO-3, fp16: DDP (cluster.py says why)
    diffusion_launch.check_launch(STAGE, cfg)  # a DeepSpeed config contradicting the recipe, before any folder
    with runs.StageRun(recipe, STAGE) as run:
        if ddp_warning:  # said here: from the main process only, and into the stage's log.txt
            log.warning(ddp_warning)
        diffusion_launch.check_resume(run.out)  # a checkpoint this launch cannot read, before any model loads
        init = run.checkpoint()
        held_rows = image_eval.caption_rows(keys.heldout_captions, recipe)
        heldout = [text for _, text in held_rows]
        judge_dir = Path(keys.judge) if keys.judge else Path(init.path) / "judge"
        needs_judge = "the simulated annotator labels the pairs" if not own_file else \
            "the held-out captions are scored" if heldout else None
        if needs_judge and not ((judge_dir / "config.json").is_file() and (judge_dir / "model.safetensors").is_file()):
            raise cli.PipelineError(f"{recipe.path}: diffusion_dpo.judge: no image judge in {judge_dir}, with which "
                                    f"{needs_judge} (train the diffusion stage with judge_epochs > 0, or point `judge` "
                                    f"at one" + (", or set heldout_captions empty)" if own_file else ")"))
        pipe = images.load_pipeline(init.path, key=f"{source_of(recipe, STAGE, 'init_from')}: {STAGE}.init_from")
        image_check.refuse_pipeline(pipe, f"{recipe.path}: diffusion_dpo.init_from '{keys.init_from}'")
        shape = images.pipeline_shape(pipe)
        if own_file:
            own = image_pairs.read_pairs(own_file, shape["channels"], shape["resolution"])
            log.info(f"{own_file}: {len(own)} pairs" + (f" ({own.ties} ties dropped)" if own.ties else "") +
                     (f"; {own.resized} images not {shape['resolution']}px: resized" if own.resized else ""))
            run.note_data("dataset", {"source": keys.dataset, "rows": len(own), "ties": own.ties, "format": "pairs"})
        else:
            rows = image_captions.world_captions() \
                if keys.dataset == images.WORLD_SPEC else image_eval.caption_rows(keys.dataset, recipe)
            captions = [text for _, text in rows]
            run.note_data("dataset", {"source": keys.dataset, "rows": len(captions), "format": "captions"})
        held_pairs = eval_file and image_pairs.read_pairs(eval_file, shape["channels"], shape["resolution"])
        # a word-level tokenizer (a new model's) reads words it was not built on as <unk>: refused, not ignored
        rows = [(f"{own_file}: {w}", c) for w, c in zip(own.where, own.captions)] if own_file else rows
        if held_pairs:
            rows += [(f"{eval_file}: {w}", c) for w, c in zip(held_pairs.where, held_pairs.captions)]
        if problem := image_captions.caption_words_problem(pipe.tokenizer, [*rows, *held_rows]):
            raise cli.PipelineError(problem)
        run.prepare()

        import copy

        import torch
        import torch.nn.functional as F

        from pipeline.image_judge import ImageJudge

        precision = diffusion_config.mixed_precision_here(cfg.mixed_precision, STAGE)
        accelerator = diffusion_launch.make_accelerator(precision, cfg.gradient_accumulation_steps)
        main_process = accelerator.is_main_process
        pipe.to(accelerator.device)  # candidates drawn there; the frozen parts and the reference copy join the UNet
        torch.manual_seed(cfg.seed)
        judge = ImageJudge.load(judge_dir) if needs_judge else None
        pipe.set_progress_bar_config(disable=True)

        def load_round(r):  # the main process draws (or finds the cache); the others read the cache it wrote
            if own_file:
                return {"round": r, "pairs": (own, None)}
            pairs = round_pairs(pipe, judge, captions, cfg, keys, run.out, r) if main_process else None
            accelerator.wait_for_everyone()
            return {"round": r, "pairs": pairs or round_pairs(pipe, judge, captions, cfg, keys, run.out, r)}

        current = load_round(0)
        vae = getattr(pipe, "vae", None)
        unet, text_encoder = pipe.unet, pipe.text_encoder.eval().requires_grad_(False)
        diffusion_train.set_attention(unet, cfg.attn_implementation)  # before the copy: the reference's too
        ref_unet = copy.deepcopy(unet).eval().requires_grad_(False)
        if cfg.use_lora:
            diffusion_train.add_lora(unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules,
                                     f"{source_of(recipe, STAGE, 'lora_target_modules')}: {STAGE}")
        noise_scheduler = images.make_scheduler("ddpm", pipe.scheduler.config)
        log.info(f"tuning {init.ref}: unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M, "
            f"trainable {sum(p.numel() for p in unet.parameters() if p.requires_grad) / 1e6:.3f}M; "
            f"{cfg.rounds} round(s), the first on {len(current['pairs'][0])} pairs, beta {cfg.beta}")

        def forward(unet, chosen, rejected, captions, gen):
            """The model's and the reference's predictions for both halves, and the target: winners then losers,
            each pair under one noise and timestep (what the loss and the held-out accuracy compare)."""
            x = torch.cat([chosen, rejected]).to(accelerator.device)
            if vae is not None:
                with torch.no_grad():
                    x = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
            with torch.no_grad():
                emb = images.encode_text(pipe, text_encoder, captions, x.device).repeat(2, 1, 1)
            noisy, noise, t = diffusion_train.noise_pairs(noise_scheduler, x, gen, cfg.max_timestep)
            channels = x.shape[1]
            pred = unet(noisy, t, encoder_hidden_states=emb).sample[:, :channels]
            with torch.no_grad():
                ref = ref_unet(noisy, t, encoder_hidden_states=emb).sample[:, :channels]
            return pred, ref, diffusion_train.denoise_target(noise_scheduler, x, noise, t)

        def step_fn(prepared, step, micro, gen):
            r = step * cfg.rounds // cfg.max_steps
            if r != current["round"]:  # online: a later round's candidates come from the model tuned so far
                prepared["unet"].eval()
                current.update(load_round(r))
                prepared["unet"].train()
            pairs = current["pairs"][0]
            idx = torch.randint(0, len(pairs), (cfg.batch_size,), generator=gen).tolist()
            pred, ref, target = forward(prepared["unet"], *pairs.batch(idx), gen)
            loss, stats = diffusion_train.diffusion_dpo_loss(pred, ref, target, cfg.beta, cfg.winner_penalty)
            if cfg.sft_weight:
                anchored = slice(None) if cfg.sft_images == "both" else slice(0, len(idx))
                loss = loss + cfg.sft_weight * F.mse_loss(pred[anchored].float(), target[anchored].float())
            return loss, stats

        started = time.time()
        params = [p for p in unet.parameters() if p.requires_grad]
        history, prepared = diffusion_train.train_loop(accelerator=accelerator, run=run, cfg=cfg,
                                                       tag="diffusion_dpo", modules={"unet": unet},
                                                       step_fn=step_fn, ema_params=params,
                                                       precision=precision)
        train_s = time.time() - started
        accelerator.wait_for_everyone()

        metrics = {}
        if main_process:
            unet = accelerator.unwrap_model(prepared["unet"]).eval()
            diffusion_train.save_pipeline(pipe, unet, run.out, cfg.use_lora)
            if judge is not None or (judge_dir / "model.safetensors").is_file():
                shutil.copytree(judge_dir, run.out / "judge", dirs_exist_ok=True)
            if keys.dataset == images.WORLD_SPEC:  # the digit world's captions: what its candidates were drawn for
                images.write_json(run.out / "world.json", images.world_json())
            if own_file:
                pair_stats = {"pairs": len(own), "ties_dropped": own.ties, "source": str(own_file)}
            else:
                rounds = [json.loads((run.out / f"pairs-{r}.json").read_text())["stats"] for r in range(cfg.rounds)]
                pair_stats = {**rounds[0], "pairs": sum(s["pairs"] for s in rounds), "rounds": rounds}
                pair_stats.pop("round")
            metrics = {"steps": cfg.max_steps, "train_loss": history[-1]["loss"] if history else None,
                       "train_wall_s": round(train_s, 1), "mixed_precision": precision, **pair_stats,
                       "history": history}
            if held_pairs:
                started = time.time()
                acc = image_pairs.implicit_accuracy(lambda *a: forward(unet, *a), held_pairs,
                                                    batch_size=cfg.batch_size, draws=HELD_OUT_DRAWS, seed=cfg.seed)
                metrics = {"heldout_pair_accuracy": acc["mean"], **metrics, "heldout_pairs": acc,
                           "heldout_pairs_wall_s": round(time.time() - started, 1)}
                log.info(f"held-out pairs ({eval_file}): the tuned model prefers {image_eval.fmt(acc)} of "
                         f"{acc['pairs']} as labelled (the start model: 0.5)")
            evals = {}
            if heldout:
                started = time.time()
                settings = {"samples": keys.heldout_samples, "steps": keys.sample_steps,
                            "guidance": keys.guidance_scale, "seed": cfg.seed, "columns": keys.grid_columns}

                def drawn(name, path):
                    p = images.load_pipeline(path)
                    p.set_progress_bar_config(disable=True)
                    return image_eval.evaluate(p, judge, heldout, run.out, name=name, **settings)

                start = image_eval.recorded(Path(init.path), judge_dir, heldout, run.out, name="start", **settings)
                if start:
                    log.info(f"held-out captions, start: {init.ref}'s own evaluation (the same captions, seeds, "
                             f"sampler steps and judge), not drawn again")
                evals = {"start": start or drawn("start", init.path), "model": drawn("model", str(run.out))}
                gain = image_eval.paired_gain(evals["start"], evals["model"], seed=cfg.seed)
                acc, acc0 = evals["model"]["accuracy"], evals["start"]["accuracy"]
                metrics = {"heldout_digit_accuracy": acc["digit"]["mean"], "heldout_all_accuracy": acc["all"]["mean"],
                           "start_digit_accuracy": acc0["digit"]["mean"], "start_all_accuracy": acc0["all"]["mean"],
                           **metrics, "gain": gain, "heldout": evals["model"], "start": evals["start"],
                           "eval_wall_s": round(time.time() - started, 1)}
                for name in ("start", "model"):
                    evals[name].pop("matches", None)
                log.info("held-out captions, start -> tuned: " + ", ".join(
                    f"{m} {acc0[m]['mean']:.3f} -> {acc[m]['mean']:.3f} (gain {image_eval.fmt(gain[m])})"
                    for m in image_eval.MEASURES if acc.get(m)))
            elif held_pairs:  # no judge: the held-out pairs' captions drawn by both models, to look at
                captions = list(dict.fromkeys(held_pairs.captions))[:8]
                per_row = min(keys.heldout_samples, keys.grid_columns)
                drawn = [images.generate(images.load_pipeline(path), [c for c in captions for _ in range(per_row)],
                                         steps=keys.sample_steps, guidance=keys.guidance_scale, seed=cfg.seed,
                                         desc=f"held-out pair captions, {name}")
                         for name, path in (("start", init.path), ("tuned", str(run.out)))]
                images.save_grid(run.out / "grid.png", torch.cat([d.view(len(captions), per_row, *d.shape[1:])
                                                                  for d in drawn], 1).flatten(0, 1),
                                 [f"{who}: {c}"[:30] for c in captions for who in ("start", "tuned")], per_row)
            (run.out / "report.md").write_text(image_eval.report(
                "Diffusion-DPO stage", metrics, {"start": evals["start"], "dpo": evals["model"]} if evals else {},
                report_notes(init, cfg, keys, pair_stats, metrics, train_s, noise_scheduler)))
        # the rounds' pairs go once the folder is published: killed before, the rerun does not draw them again
        run.finish(metrics, config=dataclasses.asdict(cfg),
                   resume_only=() if own_file else [f"pairs-{r}.{ext}" for r in range(cfg.rounds)
                                                    for ext in ("safetensors", "json")])


if __name__ == "__main__":
    cli.run_main(main)
