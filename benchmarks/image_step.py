"""The image model's training step per precision and attention implementation, against fp32 with SDPA.

    python benchmarks/image_step.py recipes/small.yaml [--steps 20] [--warmup 3] [--repeats 3] [overrides ...]

Builds the recipe's new `diffusion` pipeline (its `unet` and `text_encoder` configs at its `resolution`) and times
the stage's optimizer step on its own data and batch size: captions through the text encoder, a noised batch through
the UNet, the Min-SNR loss (`snr_gamma`), backward, AdamW. Per variant (`mixed_precision` no / bf16 x
`attn_implementation` sdpa / eager, the keys of the `diffusion` section) the same seeds and batches; the variants
take turns, `--repeats` rounds of `--steps` timed steps each after `--warmup`, and the table has each variant's best
round (ms a step) and its ratio to fp32 with SDPA. Threads: pipeline/threads.py, as a stage sets them.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = [("no", "sdpa"), ("no", "eager"), ("bf16", "sdpa"), ("bf16", "eager")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import copy

    import torch

    from pipeline import diffusion_train, images, threads
    from pipeline.recipe import load_recipe

    print(f"CPU threads: {threads.configure()}")
    recipe = load_recipe(args.recipe, args.overrides)
    keys, cfg = recipe.keys("diffusion"), recipe.trainer_config("diffusion")
    source = images.load_images(keys.dataset, keys.resolution, 1, cfg.property_dropout)
    torch.manual_seed(0)
    pipe = diffusion_train.new_pipeline(cfg, keys.resolution, getattr(source, "captions", ()))  # as the stage
    scheduler = images.make_scheduler("ddpm", pipe.scheduler.config)

    def build(attention):
        unet, text_encoder = copy.deepcopy(pipe.unet).train(), copy.deepcopy(pipe.text_encoder).train()
        diffusion_train.set_attention(unet, attention)
        params = [p for m in (unet, text_encoder) for p in m.parameters()]
        return unet, text_encoder, torch.optim.AdamW(params, lr=cfg.learning_rate)

    def step(model, precision, index):
        unet, text_encoder, optimizer = model
        gen = torch.Generator().manual_seed(index)
        x, captions = source.sample(cfg.batch_size, gen)
        noise = torch.randn(x.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x),), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            emb = images.encode_text(pipe, text_encoder, captions, "cpu")
            pred = unet(scheduler.add_noise(x, noise, t), t, encoder_hidden_states=emb).sample
            target = diffusion_train.denoise_target(scheduler, x, noise, t)
            loss = diffusion_train.denoise_loss(scheduler, pred[:, :1], target, t, cfg.snr_gamma)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    models = {v: build(v[1]) for v in VARIANTS}
    for (precision, _), model in models.items():
        for i in range(args.warmup):
            step(model, precision, i)
    best = {v: float("inf") for v in VARIANTS}
    for _ in range(args.repeats):
        for (precision, attention), model in models.items():
            started = time.perf_counter()
            for i in range(args.steps):
                step(model, precision, args.warmup + i)
            best[(precision, attention)] = min(best[(precision, attention)],
                                               (time.perf_counter() - started) / args.steps * 1000)
    base = best[("no", "sdpa")]
    print(f"\nthe {keys.resolution}px UNet ({sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.2f}M) and text "
          f"encoder, batch {cfg.batch_size}; best of {args.repeats} rounds of {args.steps} steps")
    print("| mixed_precision | attn_implementation | ms a step | speed vs fp32 + sdpa |")
    print("|---|---|---|---|")
    for (precision, attention), ms in best.items():
        print(f"| {precision} | {attention} | {ms:.0f} | {base / ms:.2f}x |")


if __name__ == "__main__":
    main()
