"""Training shared by the image stages: the denoising and Diffusion-DPO losses, the training loop (Accelerate, EMA,
mixed precision, checkpoints), LoRA through peft, and saving the trained pipeline. Their configs: diffusion_config.py.

Checkpoints (`<stage>.partial/checkpoint-N/`) hold the trainable weights, the EMA weights and the optimizer's
tensors as safetensors, and everything else (step, history, optimizer hyper-parameters, the learning-rate
schedule's state, the EMA's counters) as JSON in `loop_state.json` (no pickle; under DeepSpeed its torch files, below),
and the checkpoint is found and checked by `safe_resume` like every other stage's (complete, intact, safe). Each
step's randomness (batch, flips, noise, timesteps, caption dropout) comes from a generator seeded by (seed, step,
process), so a resumed run draws what the uninterrupted run would have drawn. A checkpoint is written to
`tmp-checkpoint-N` and renamed: a kill never leaves a half checkpoint.

Under a DeepSpeed ZeRO-1/2 launch the trainable modules go to DeepSpeed as one module (a ModuleDict: Accelerate hands
DeepSpeed one model), the frozen ones stay outside. Its engine keeps whole fp32 weights on every process (the EMA and
the saved model read them as without it), shards the optimizer state (and ZeRO-2 the gradients), clips and steps
after the last micro-batch; mixed precision is torch's autocast over those fp32 weights, as Accelerate's is
elsewhere. A checkpoint then holds DeepSpeed's own files for the optimizer (`deepspeed/`, a shard per process) in
place of `optimizer.safetensors`: torch files that safe_resume loads with weights_only (DeepSpeed's data classes
allowed by name) before DeepSpeed reads them, and only under the ZeRO stage and process count that wrote them
(diffusion_launch.check_resume, before the stage loads a model). ZeRO-3 and fp16 run as DDP
(cluster.data_parallel_under_deepspeed). The launch's DeepSpeed config takes the recipe's values where it says `auto`
and may build its own optimizer, as for our PPO (pipeline/deepspeed_config.py); its bf16 / fp16 must be `auto`
(diffusion_launch.config_problem).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from functools import partial
from pathlib import Path

from pipeline import deepspeed_config, diffusion_launch, faults, log, preemption, safe_resume, threads

# ---------------------------------------------------------------------------------------------- losses


def denoise_target(scheduler, x0, noise, t):
    """What the UNet predicts: the noise (epsilon), the velocity (v_prediction) or the clean image (sample)."""
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return x0 if kind == "sample" else noise


def noise_pairs(scheduler, x, gen, max_timestep: int | None = None):
    """Diffusion-DPO's noising: x holds the winners then the losers; each pair shares its noise and its timestep
    (uniform below max_timestep, or over the whole schedule). Returns (noisy x, noise, t) for the whole batch."""
    import torch

    n = len(x) // 2
    top = min(max_timestep or scheduler.config.num_train_timesteps, scheduler.config.num_train_timesteps)
    noise = torch.randn((n, *x.shape[1:]), generator=gen).repeat(2, 1, 1, 1).to(x.device)
    t = torch.randint(0, top, (n,), generator=gen).repeat(2).to(x.device)
    return scheduler.add_noise(x, noise, t), noise, t


def denoise_loss(scheduler, pred, target, t, snr_gamma: float | None):
    """Mean squared error per image; with snr_gamma, Min-SNR weighting (Hang et al. 2023): the clean-image error
    weighted by min(SNR(t), gamma), i.e. the MSE of an epsilon prediction times min(SNR, gamma) / SNR, of a v
    prediction times min(SNR, gamma) / (SNR + 1), of a sample prediction times min(SNR, gamma)."""
    err = (pred.float() - target.float()).pow(2).mean(dim=list(range(1, target.ndim)))
    if not snr_gamma:
        return err.mean()
    alphas = scheduler.alphas_cumprod.to(t.device)[t]
    snr = alphas / (1 - alphas)
    kind = scheduler.config.prediction_type
    weight = snr.clamp(max=snr_gamma) / {"v_prediction": snr + 1, "sample": 1}.get(kind, snr)
    return (err * weight).mean()


def text_to_image_loss(pipe, unet, text_encoder, scheduler, source, cfg, gen, device, vae=None,
                       train_text_encoder: bool = False):
    """The diffusion stage's loss on a batch drawn from `source` with `gen` (in a fixed order: a resumed step draws
    the same): random flips (cfg.random_flip), caption dropout, VAE latents where there is one, a timestep per image,
    Min-SNR denoising loss."""
    import torch

    from pipeline import images

    x, captions = source.sample(cfg.batch_size, gen)
    if cfg.random_flip:  # drawn only when asked: without it a step draws, and trains on, what it always did
        x = flip_images(x, gen)
    drop = torch.rand(len(captions), generator=gen) < cfg.caption_dropout
    captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    x = x.to(device)
    if vae is not None:
        with torch.no_grad():
            x = vae.encode(x).latent_dist.sample(generator=gen) * vae.config.scaling_factor
    noise = torch.randn(x.shape, generator=gen).to(x.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x),), generator=gen).to(x.device)
    with torch.set_grad_enabled(train_text_encoder):
        emb = images.encode_text(pipe, text_encoder, captions, x.device)
    pred = unet(scheduler.add_noise(x, noise, t), t, encoder_hidden_states=emb).sample
    target = denoise_target(scheduler, x, noise, t)
    return denoise_loss(scheduler, pred[:, :x.shape[1]], target, t, cfg.snr_gamma)


def flip_images(x, gen):
    """Each image (N x C x H x W) mirrored left-right with probability 0.5, as diffusers' --random_flip
    (RandomHorizontalFlip, applied after the crop); one coin per image from `gen`, the step's generator."""
    import torch

    flip = torch.rand(len(x), generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def pair_errors(pred, target):
    """err(x) of Diffusion-DPO: the mean over pixels of the squared noise-prediction error, one per image (winners
    then losers)."""
    return (pred.float() - target.float()).pow(2).mean(dim=list(range(1, target.ndim)))


def diffusion_dpo_loss(model_pred, ref_pred, target, beta: float, winner_penalty: float = 0.0):
    """Diffusion-DPO (Wallace et al. 2023), as in the official training script: the batch holds the winners then
    the losers (same noise and timestep for both halves).

        err(x) = mean over pixels of ||target - pred(x_t, t)||^2
        inside = -beta/2 * ((err_θ(w) - err_ref(w)) - (err_θ(l) - err_ref(l)))
        loss   = -log σ(inside)

    With `winner_penalty` λ > 0 (DPO-Positive, Pal et al. 2024), inside also subtracts beta/2 * λ * max(0,
    err_θ(w) - err_ref(w)): the winner may not get worse than under the reference.

    Returns (loss, stats): implicit accuracy (inside > 0), the model's raw denoising loss, and the mean change of
    the winners' and losers' errors against the reference."""
    import torch.nn.functional as F

    model_err, ref_err = pair_errors(model_pred, target), pair_errors(ref_pred, target)
    model_w, model_l = model_err.chunk(2)
    ref_w, ref_l = ref_err.chunk(2)
    inside = -0.5 * beta * ((model_w - ref_w) - (model_l - ref_l) + winner_penalty * (model_w - ref_w).clamp(min=0))
    loss = -F.logsigmoid(inside).mean()
    stats = {"implicit_acc": float((inside > 0).float().mean()), "model_loss": float(model_err.detach().mean()),
             "ref_loss": float(ref_err.mean()), "margin": float(inside.detach().mean()),
             "winner_change": float((model_w - ref_w).detach().mean()),
             "loser_change": float((model_l - ref_l).detach().mean())}
    return loss, stats


# -------------------------------------------------------------------------- new models, attention, LoRA


def set_attention(unet, implementation: str) -> None:
    """The UNet's attention processors: diffusers' default (SDPA) or its plain bmm + softmax one (`eager`)."""
    if implementation == "eager":
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())


def lora_target_problem(unet, targets: list[str]) -> str | None:
    """Why a LoRA target names no module of `unet` (peft's traceback in the stage, zero trainable in --check), or None.
    As peft matches a name in a list: the module's name or its last parts."""
    from pipeline.values import closest

    names = {name for name, _ in unet.named_modules()}
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            return f"'{target}' names no module of the UNet{closest(target, {n.rsplit('.')[-1] for n in names if n})}"
    return None


def add_lora(unet, rank: int, alpha: int, targets: list[str], where: str) -> None:
    """LoRA adapters on the UNet (as diffusers' train_text_to_image_lora.py); everything else frozen. `where`:
    "<where lora_target_modules was set>: <stage>", for a target that names no module."""
    from peft import LoraConfig

    from pipeline.cli import PipelineError

    if problem := lora_target_problem(unet, targets):
        raise PipelineError(f"{where}.lora_target_modules: {problem}")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))


def save_pipeline(pipe, unet, out: Path, use_lora: bool, **modules) -> None:
    """The trained UNet (and `modules`, e.g. the sampling scheduler) into the pipeline, saved as safetensors. LoRA
    adapters are also saved alone in diffusers' format (`pytorch_lora_weights.safetensors`, keys prefixed `unet.`:
    pipeline.load_lora_weights reads them), then merged, so the saved UNet loads without peft."""
    if use_lora:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        save_file({f"unet.{k}": v.detach().contiguous() for k, v in lora.items()},
                  str(out / "pytorch_lora_weights.safetensors"))
        merge_lora(unet)
    pipe.register_modules(unet=unet, **modules)
    pipe.save_pretrained(str(out), safe_serialization=True)


def merge_lora(unet) -> None:
    """Fold the adapters into the base weights and remove them: a plain UNet that saves and loads without peft."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(unet.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent) if parent else unet, child, module.get_base_layer())
    unet._hf_peft_config_loaded = False
    if hasattr(unet, "peft_config"):
        del unet.peft_config


# ---------------------------------------------------------------------------------------------- checkpoints


def _trainable(module) -> dict:
    return {n: p.detach().contiguous() for n, p in module.named_parameters() if p.requires_grad}


DEEPSPEED_TAG = "deepspeed"  # the folder of a checkpoint holding DeepSpeed's files (its optimizer shards)


def save_checkpoint(out: Path, step: int, modules: dict, optimizer, scheduler, ema, history: list, keep: int,
                    is_main: bool, window: list | None = None, engine=None) -> None:
    """Every process calls it; under DeepSpeed (`engine`) each writes its optimizer shard, the main one the rest."""
    from safetensors.torch import save_file

    tmp = out / f"tmp-checkpoint-{step}"
    if engine is not None:  # a collective, with barriers; without the frozen weights (a LoRA's base UNet: GBs)
        engine.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
    if not is_main:
        return
    if engine is None:
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    for name, module in modules.items():
        save_file(_trainable(module), str(tmp / f"{name}.safetensors"))
    # window: the losses since the last logged step, so a resumed run logs the mean an uninterrupted one does
    state = {"step": step, "history": history, "window": list(window or []), **diffusion_launch.optimizer_format(),
             "lr_scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}}
    if engine is None:
        opt_state = optimizer.state_dict()
        tensors, meta = {}, {}
        for idx, st in opt_state["state"].items():
            meta[str(idx)] = {}
            for k, v in st.items():
                if hasattr(v, "shape"):
                    tensors[f"{idx}.{k}"] = v.detach().contiguous()
                else:
                    meta[str(idx)][k] = v
        save_file(tensors or {"_empty": __import__("torch").zeros(1)}, str(tmp / "optimizer.safetensors"))
        state["optimizer"] = {"param_groups": opt_state["param_groups"], "scalars": meta}
    if ema is not None:
        save_file({str(i): p.detach().contiguous() for i, p in enumerate(ema.shadow_params)},
                  str(tmp / "ema.safetensors"))
        state["ema"] = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
    faults.point("checkpoint")
    (tmp / safe_resume.LOOP_STATE).write_text(json.dumps(state, default=float) + "\n")
    final = out / f"checkpoint-{step}"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))[:-max(keep, 1)]:
        shutil.rmtree(old)


def load_checkpoint(ckpt: Path, modules: dict, optimizer, scheduler, ema, engine=None) -> tuple[int, list, list]:
    import torch
    from safetensors.torch import load_file

    state = json.loads((ckpt / safe_resume.LOOP_STATE).read_text())  # its optimizer format: checked before loading
    if engine is not None:  # its optimizer shards and trainable weights (= ours below); checked by safe_resume
        engine.load_checkpoint(str(ckpt), tag=DEEPSPEED_TAG, load_lr_scheduler_states=False, load_module_strict=False)
    for name, module in modules.items():
        weights = load_file(str(ckpt / f"{name}.safetensors"))
        missing = set(weights) - set(dict(module.named_parameters()))
        if missing:
            raise RuntimeError(f"{ckpt}: {name} has no parameter {sorted(missing)[0]}")
        module.load_state_dict(weights, strict=False)
    if engine is None:
        tensors = load_file(str(ckpt / "optimizer.safetensors"))
        opt_state = {"param_groups": state["optimizer"]["param_groups"], "state": {}}
        for idx, scalars in state["optimizer"]["scalars"].items():
            st = dict(scalars)
            for k in [k.split(".", 1)[1] for k in tensors if k.split(".", 1)[0] == idx]:
                st[k] = tensors[f"{idx}.{k}"]
            opt_state["state"][int(idx)] = st
        optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict({**scheduler.state_dict(), **state["lr_scheduler"]})
    if ema is not None:
        shadow = load_file(str(ckpt / "ema.safetensors"))
        ema.load_state_dict({**state["ema"], "shadow_params": [shadow[str(i)] for i in range(len(shadow))]})
    del torch
    return state["step"], state["history"], state.get("window", [])


# ---------------------------------------------------------------------------------------------- the loop


def step_generator(seed: int, step: int, micro: int, rank: int):
    import torch

    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 101 + micro) * 97 + rank)


def train_loop(*, accelerator, run, cfg, tag: str, modules: dict, step_fn, ema_params=None,
               precision: str = "no") -> tuple[list, dict]:
    """Run cfg.max_steps optimizer steps of `step_fn(prepared, step, micro, generator) -> (loss, stats)` over the
    trainable parameters of `modules` (name -> module, prepared here together with the optimizer; under DeepSpeed as
    one module), resuming from the newest checkpoint in run.out. Returns (per-logged-step history, prepared modules).
    With cfg.ema_decay and `ema_params`, the EMA is copied into them at the end. `precision`: the stage's."""
    import torch
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    main = accelerator.is_main_process
    seed = cfg.seed if cfg.seed is not None else run.recipe.run.seed
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    deepspeed_config.fill(accelerator, diffusion_launch.deepspeed_values(cfg, accelerator.num_processes), tag,
                          diffusion_launch.RECIPE_KEYS)
    optimizer, scheduler = deepspeed_config.optimizer_and_scheduler(
        accelerator, [{"params": params}], cfg.learning_rate, cfg.weight_decay,
        partial(get_scheduler, cfg.lr_scheduler_type, num_warmup_steps=cfg.warmup_steps,
                num_training_steps=cfg.max_steps))
    ds = getattr(accelerator.state, "deepspeed_plugin", None)
    engine = None
    if ds is not None:
        engine, optimizer, scheduler = accelerator.prepare(torch.nn.ModuleDict(modules), optimizer, scheduler)
        # called as they are, not through the engine's forward: right for fp32 weights only (diffusion_launch's)
        prepared = dict(engine.module.items())
        log.info(f"DeepSpeed ZeRO-{ds.zero_stage}: {', '.join(modules)} trained by one {type(engine).__name__} "
                 f"over {accelerator.num_processes} process(es)")
    else:
        *prepared_modules, optimizer, scheduler = accelerator.prepare(*modules.values(), optimizer, scheduler)
        prepared = dict(zip(modules, prepared_modules))
    ema = None
    if cfg.ema_decay and ema_params is not None:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(ema_params, decay=cfg.ema_decay, use_ema_warmup=True, power=2 / 3)
    plain = {k: accelerator.unwrap_model(m) for k, m in prepared.items()}
    step, history, window = 0, [], []
    if main:  # a save cut short by a kill; the checkpoint before it is intact
        for partial_save in run.out.glob("tmp-checkpoint-*"):
            shutil.rmtree(partial_save)
    ckpt = run.last_checkpoint()  # complete, intact, safe: safetensors, JSON, DeepSpeed's weights_only files
    if ckpt is not None:
        step, history, window = load_checkpoint(Path(ckpt), plain, optimizer, scheduler, ema, engine)
        if ema is not None:  # its shadow weights load on the CPU; the weights it follows may be on a GPU
            ema.to(device=accelerator.device)
        log.info(f"resumed at step {step}")
    bar = tqdm(total=cfg.max_steps, initial=step, desc=tag, disable=not main, dynamic_ncols=True)
    started = time.time()
    preemption.STOP.training = True
    while step < cfg.max_steps:
        threads.rebalance()
        for m in prepared.values():
            m.train()
        stats = {}
        for micro in range(cfg.gradient_accumulation_steps):
            gen = step_generator(seed, step, micro, accelerator.process_index)
            with diffusion_launch.autocast(accelerator, engine, precision):
                loss, stats = step_fn(prepared, step, micro, gen)
            if engine is None:
                accelerator.backward(loss / cfg.gradient_accumulation_steps)
            else:  # DeepSpeed divides by the accumulation itself, then clips and steps after the last
                accelerator.sync_gradients = micro == cfg.gradient_accumulation_steps - 1
                accelerator.backward(loss)
            window.append(float(loss.detach()))
        if cfg.max_grad_norm:  # the norm before clipping, logged as HF Trainer's grad_norm; DeepSpeed's step clipped
            stats = {**stats, "grad_norm": float(accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                                                 if engine is None else engine.get_global_grad_norm())}
        optimizer.step()  # under DeepSpeed this and zero_grad do nothing (the engine did them); the schedule steps
        scheduler.step()  # here, but for a config's own optimizer, whose schedule the engine steps (DummyScheduler)
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(ema_params)
        step += 1
        bar.update(1)
        faults.point("training", until=preemption.STOP.signalled)
        if step % max(cfg.logging_steps, 1) == 0 or step == cfg.max_steps:
            entry = {"step": step, "loss": sum(window) / len(window), "lr": scheduler.get_last_lr()[0],
                     **{k: v for k, v in stats.items()}, "elapsed_s": round(time.time() - started, 1)}
            history.append(entry)
            window = []
            log.info(" ".join(f"{k} {v:.4g}" for k, v in entry.items()))
        saved = step < cfg.max_steps and cfg.save_steps and step % cfg.save_steps == 0
        if saved:
            save_checkpoint(run.out, step, plain, optimizer, scheduler, ema, history, cfg.save_total_limit, main,
                            window, engine)
            accelerator.wait_for_everyone()
        if step < cfg.max_steps and preemption.stop_requested(accelerator.device):
            if not saved:
                save_checkpoint(run.out, step, plain, optimizer, scheduler, ema, history, cfg.save_total_limit,
                                main, window, engine)
            bar.close()
            preemption.exit_preempted(run.out / f"checkpoint-{step}", main)
    preemption.STOP.training = False
    bar.close()
    if ema is not None:
        ema.copy_to(ema_params)
    return history, prepared
