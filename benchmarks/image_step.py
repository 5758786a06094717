"""The image model's training step per precision and attention implementation, against fp32 with SDPA.

    python benchmarks/image_step.py recipes/small.yaml [--steps 20] [--warmup 3] [--repeats 3] [--compile]
                                    [overrides ...]

Builds the recipe's new `diffusion` pipeline (its `unet` and `text_encoder` configs at its `resolution`) and times
the stage's optimizer step on its own data and batch size: the stage's own loss (`diffusion_train.text_to_image_loss`:
captions with caption dropout through the text encoder, a noised batch through the UNet, Min-SNR weighting), backward,
AdamW. Per variant (`mixed_precision` no / bf16 x `attn_implementation` sdpa / eager, the keys of the `diffusion`
section) the same seeds and batches; the variants take turns, `--repeats` rounds of `--steps` timed steps each after
`--warmup`, and the table has each variant's best round (ms a step) and its ratio to fp32 with SDPA. Threads:
pipeline/threads.py, as a stage sets them.

The table also has each variant's achieved FLOP/s and its share of this machine's matmul peak in the variant's dtype
(matmul_peak.py's best square matmul with the same threads, measured first), as mfu.py has for the language-model
stages. FLOPs of a step: torch's FlopCounterMode over one forward and backward pass of the eager fp32 step (its
attention is bmm, which the counter knows; CPU SDPA is not counted by it), i.e. the model's own convolution, linear and
attention FLOPs; the optimizer and elementwise work are not counted, so the share is a lower bound. The same work for
every variant. A larger benchmark UNet: overrides, e.g. `diffusion.resolution=32
diffusion.unet.block_out_channels=[128,256,256]` (benchmarks/README.md has the figures).

`--compile` adds bf16 + eager with the UNet under `torch.compile` (inductor; the stages do not compile it). Its warm-up
time, printed per variant, includes the compilation: inductor caches what it built (in /tmp/torchinductor_<user>), so
a second run on the same machine compiles in seconds where the first takes minutes.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = [("no", "sdpa", False), ("no", "eager", False), ("bf16", "sdpa", False), ("bf16", "eager", False)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also bf16 + eager with the UNet compiled")
    args = parser.parse_args()
    variants = VARIANTS + ([("bf16", "eager", True)] if args.compile else [])

    import copy

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from matmul_peak import gflops
    from pipeline import diffusion_train, images, threads
    from pipeline.recipe import load_recipe

    print(f"CPU threads: {threads.configure()}")
    peaks = {precision: max(gflops(n, dtype, 2.0) for n in (256, 512, 1024, 2048))
             for precision, dtype in (("no", torch.float32), ("bf16", torch.bfloat16))}
    print(f"matmul peak: fp32 {peaks['no']:.1f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s", flush=True)
    recipe = load_recipe(args.recipe, args.overrides)
    keys, cfg = recipe.keys("diffusion"), recipe.trainer_config("diffusion")
    source = images.load_images(keys.dataset, keys.resolution, 1, cfg.property_dropout)
    torch.manual_seed(0)
    pipe = images.new_pipeline(cfg, keys.resolution, getattr(source, "captions", ()))  # as the stage
    scheduler = images.make_scheduler("ddpm", pipe.scheduler.config)

    def build(attention, compiled=False):
        unet, text_encoder = copy.deepcopy(pipe.unet).train(), copy.deepcopy(pipe.text_encoder).train()
        diffusion_train.set_attention(unet, attention)
        params = [p for m in (unet, text_encoder) for p in m.parameters()]
        return torch.compile(unet) if compiled else unet, text_encoder, torch.optim.AdamW(params, lr=cfg.learning_rate)

    def step(model, precision, index):
        unet, text_encoder, optimizer = model
        gen = torch.Generator().manual_seed(index)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):  # as Accelerate's autocast
            loss = diffusion_train.text_to_image_loss(pipe, unet, text_encoder, scheduler, source, cfg, gen, "cpu",
                                                      train_text_encoder=True)  # the stage's loss, as it trains
        loss.backward()
        if optimizer is not None:  # None: the FLOP count below, a forward and backward pass only
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    unet, text_encoder, _ = build("eager")
    counter = FlopCounterMode(display=False)
    with counter:  # forward and backward, no optimizer step: the model FLOPs every variant does
        step((unet, text_encoder, None), "no", 0)
    step_flops = counter.get_total_flops()

    models = {v: build(v[1], v[2]) for v in variants}
    warmup_s = {}
    for variant, model in models.items():
        started = time.perf_counter()
        for i in range(args.warmup):
            step(model, variant[0], i)
        warmup_s[variant] = time.perf_counter() - started
    best = {v: float("inf") for v in variants}
    for _ in range(args.repeats):
        for variant, model in models.items():
            started = time.perf_counter()
            for i in range(args.steps):
                step(model, variant[0], args.warmup + i)
            best[variant] = min(best[variant], (time.perf_counter() - started) / args.steps * 1000)
    base = best[("no", "sdpa", False)]
    print(f"\nthe {keys.resolution}px UNet ({sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.2f}M) and text "
          f"encoder, batch {cfg.batch_size}, {step_flops / 1e9:.2f} GFLOP a step (forward and backward); best of "
          f"{args.repeats} rounds of {args.steps} steps, {torch.get_num_threads()} thread(s)")
    print("| mixed_precision | attn_implementation | torch.compile | warm-up s | ms a step | speed vs fp32 + sdpa | "
          "images/s | GFLOP/s | share of the peak in its dtype |")
    print("|---|---|---|---|---|---|---|---|---|")
    for variant, ms in best.items():
        precision, attention, compiled = variant
        achieved = step_flops / (ms / 1000) / 1e9
        print(f"| {precision} | {attention} | {'yes' if compiled else 'no'} | {warmup_s[variant]:.1f} | {ms:.0f} | "
              f"{base / ms:.2f}x | {cfg.batch_size / ms * 1000:.0f} | {achieved:.1f} | "
              f"{achieved / peaks[precision]:.1%} |")


if __name__ == "__main__":
    main()
