"""How much of a training stage's compute is padding, in random order and grouped by length.

    python benchmarks/padding.py recipes/small.yaml [--stage reward|sft] [--steps 20] [STAGE.KEY=VALUE ...]

Builds the stage's trainer as the stage does (its data, tokenizer, `init_from` model, batch size and max_length;
reward: lm_loss_coefficient; sft: assistant-only loss on conversations; the init_from stage must have run) once with
`train_sampling_strategy: random` and once with `group_by_length`, iterates one epoch of each train dataloader and prints the tokens fed (padding included), the real
tokens and the padding share. With --steps N it also times N optimizer steps of each, one after the other in this
process, and prints s/step and the ratio.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--stage", choices=("reward", "sft"), default="reward")
    parser.add_argument("--steps", type=int, default=0, help="also time this many training steps of each")
    args = parser.parse_args()

    from transformers import set_seed

    from benchmarks.trl_cli import training_rows
    from pipeline import models, reward, runs, threads
    from pipeline.recipe import load_recipe
    from pipeline.reward_model import lm_head_weight, load_reward_model

    print(f"CPU threads: {threads.configure()}")
    recipe = load_recipe(args.recipe, args.overrides)
    keys = recipe.keys(args.stage)
    init = runs.resolve_checkpoint(recipe, keys.init_from)
    tokenizer = models.load_tokenizer(recipe, init)
    train_ds = training_rows(args.stage, recipe)  # the rows and columns the stage hands its trainer
    if args.stage == "reward":
        head = lm_head_weight(recipe, init.path, tokenizer) if keys.lm_loss_coefficient else None

    def trainer_for(strategy):
        fixed = dict(output_dir=f"/tmp/padding-benchmark-{args.stage}-{strategy}", train_sampling_strategy=strategy,
                     report_to="none", save_strategy="no", max_steps=args.steps or 1, logging_steps=10 ** 6)
        if args.stage == "sft" and "assistant_only_loss" not in recipe.section("sft"):
            fixed["assistant_only_loss"] = "messages" in train_ds.column_names  # as the stage sets it
        config = recipe.trainer_config(args.stage, **fixed)
        set_seed(config.seed)
        if args.stage == "reward":
            model = load_reward_model(recipe, init.path)
            models.fit_embeddings(model, tokenizer)
            model.config.pad_token_id = tokenizer.pad_token_id
            return config, reward.reward_trainer(keys.lm_loss_coefficient, head, model=model, args=config,
                                                 train_dataset=train_ds, processing_class=tokenizer)
        from trl import SFTTrainer

        model = models.load_causal_lm(recipe, init.path)
        models.fit_embeddings(model, tokenizer)
        return config, SFTTrainer(model=model, args=config, train_dataset=train_ds, processing_class=tokenizer)

    rows = []
    for strategy in ("random", "group_by_length"):
        config, trainer = trainer_for(strategy)
        fed = real = batches = 0
        for batch in trainer.get_train_dataloader():
            fed += batch["input_ids"].numel()
            real += int(batch["attention_mask"].sum())
            batches += 1
        seconds = None
        if args.steps:
            start = time.perf_counter()
            trainer.train()
            seconds = (time.perf_counter() - start) / args.steps
        rows.append((strategy, batches, fed, real, seconds))

    print(f"\n{args.stage} stage of {args.recipe}: {len(train_ds)} {'pairs' if args.stage == 'reward' else 'rows'}, batch {config.per_device_train_batch_size}, "
          f"max_length {config.max_length}, one epoch")
    print("| order           | batches | tokens fed | real tokens | padding | s/step |")
    print("|-----------------|---------|------------|-------------|---------|--------|")
    for strategy, batches, fed, real, seconds in rows:
        step = f"{seconds:.3f}" if seconds is not None else "-"
        print(f"| {strategy:15} | {batches:7} | {fed:10,} | {real:11,} | {1 - real / fed:7.3f} | {step:>6} |")
    (_, _, fed_r, _, s_r), (_, _, fed_g, _, s_g) = rows
    print(f"tokens fed, random / grouped: {fed_r / fed_g:.2f}x" +
          (f"; s/step, random / grouped: {s_r / s_g:.2f}x" if args.steps else ""))


if __name__ == "__main__":
    main()
