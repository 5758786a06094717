"""Stage 4c, kto: Kahneman-Tversky optimisation with TRL's KTOTrainer, from replies labelled good or bad.

    accelerate launch pipeline/kto.py recipes/small.yaml [kto.beta=0.1 kto.desirable_weight=1.0 kto.use_peft=true ...]

KTO learns from unpaired feedback: a reply with a thumbs up or down (TRL's prompt/completion/label rows, LLaMA-Factory's
`kto_tag`), where DPO needs two replies to one prompt; preference pairs work too, each as a desirable and an
undesirable row (pipeline/unpaired.py). The policy starts from `kto.init_from` (default `sft`); the reference is the
same checkpoint loaded once and frozen or, with `use_peft`, the policy with its adapter switched off. KTOTrainer
estimates the KL term from each batch's replies paired with the batch's other prompts, so it reads the rows in order:
the training rows are shuffled once here (run.seed) so a batch mixes good and bad replies to many prompts. Section
keys: TRL's KTOConfig fields, ModelConfig's LoRA fields, KTOKeys (pipeline/stages.py). At the end the input and the
tuned policy answer the held-out prompts (verifier accuracy).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, never shadow libraries with our modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from pipeline import batching, cli, data, log, models, runs, unpaired
from pipeline.generation import refuse_past_positions
from pipeline.heldout import heldout_comparison, heldout_rows
from pipeline.preferences import split_by_prompt
from pipeline.recipe import load_recipe, stage_help

STAGE = "kto"
USAGE = "usage: pipeline/kto.py RECIPE [kto.KEY=VALUE ...]"
ROW_COLUMNS = ("prompt", "completion", "label", "tools")  # tools: TRL renders a tool row's prompt with its schemas


def check_kl_batches(recipe) -> None:
    """KTOTrainer's own refusals, before anything loads or is written: a loss that estimates the KL term from each
    batch's other rows needs batches of two rows at least, read in order."""
    if recipe.config_default(STAGE, "loss_type") == "apo_zero_unpaired":  # no KL term
        return
    if recipe.config_default(STAGE, "per_device_train_batch_size") < 2:
        raise cli.PipelineError(f"{recipe.path}: kto.per_device_train_batch_size must be 2 or more: the KL term is "
                                f"estimated from each batch's replies to its other prompts")
    if recipe.config_default(STAGE, "train_sampling_strategy") != "sequential":
        raise cli.PipelineError(f"{recipe.path}: kto.train_sampling_strategy must be sequential (its default): the "
                                f"KL term pairs each reply with its neighbours' prompts (the stage shuffles the rows "
                                f"once); or use loss_type apo_zero_unpaired, which has no KL term")


def load_splits(keys, recipe):
    """Training and held-out rows: `eval_dataset`, or `eval_fraction` of the training prompts held out (a prompt's
    rows all on one side), the training rows shuffled once. Returns (train, held_out, train_info, held_out_info,
    train_places, held_out_places: where each row is from, for models.check_chat_template)."""
    import numpy as np

    train_ds, train_info, train_places = unpaired.load_unpaired(keys.dataset, recipe, keys.columns, places=True)
    if keys.eval_dataset:
        eval_ds, eval_info, eval_places = unpaired.load_unpaired(keys.eval_dataset, recipe, keys.columns, places=True)
    else:
        train_ds, eval_ds, train_places, eval_places = split_by_prompt(
            train_ds, keys.eval_fraction, recipe.run.seed, train_info["source"], unit="rows", places=train_places)
        eval_info = {**train_info, "source": f"{train_info['source']} (held-out {keys.eval_fraction:.0%} of prompts)",
                     **unpaired.balance(eval_ds["label"])}
        train_info = {**train_info, **unpaired.balance(train_ds["label"])}
    order = np.random.default_rng(recipe.run.seed).permutation(len(train_ds))  # Dataset.shuffle(seed)'s order
    return (train_ds.select(order).flatten_indices(), eval_ds, train_info, eval_info, [train_places[i] for i in order],
            eval_places)


def rows_only(ds):
    """The columns KTOTrainer reads: the row, and the tool schemas its chat template renders into the prompt."""
    return ds.remove_columns([c for c in ds.column_names if c not in ROW_COLUMNS])


def main(argv):
    recipe = load_recipe(*cli.split_stage_args(argv, USAGE, lambda: stage_help(STAGE)))
    recipe.check_config(STAGE, portable=True)  # the config class's own checks before upstream stages
    keys = recipe.keys(STAGE)
    peft_values = recipe.peft_values(STAGE)
    check_kl_batches(recipe)
    with runs.StageRun(recipe, STAGE) as run:
        train_ds, eval_ds, train_info, eval_info, train_places, eval_places = load_splits(keys, recipe)
        run.note_data("dataset", train_info)
        run.note_data("eval_dataset", eval_info)
        data.warn_world_eval(recipe, STAGE, keys)
        heldout = heldout_rows(recipe, keys)
        args = recipe.trainer_config(STAGE, output_dir=str(run.out))
        init = run.checkpoint()
        if init.path is None:
            raise cli.PipelineError(f"{recipe.path}: kto.init_from is a new model from `model.config`; "
                                    f"start KTO from a trained checkpoint (sft)")
        run.prepare()

        from trl import KTOTrainer

        tokenizer = models.load_tokenizer(recipe, init)
        models.check_chat_template(tokenizer, {train_info["source"]: (train_ds, train_places),
                                               eval_info["source"]: (eval_ds, eval_places)})
        # with LoRA the reference is the policy with its adapter switched off
        policy, peft_config, reference = models.load_policy(recipe, init, peft_values, tokenizer, STAGE)
        refuse_past_positions(recipe, policy.config, args.max_length, f"{STAGE}.max_length")
        trainer = KTOTrainer(model=policy, ref_model=reference, args=args, train_dataset=rows_only(train_ds),
                             eval_dataset=rows_only(eval_ds), processing_class=tokenizer, peft_config=peft_config)
        for net in (trainer.model, trainer.ref_model):  # policy and reference: less padding, the same outputs
            if net is not None:
                batching.split_forward(net, keys.length_split)
        # TRL leaves out a row whose prompt alone fills max_length (no completion token would be left)
        why = (f"have prompts of kto.max_length={args.max_length} tokens or more, which leave no reply token: "
               f"raise max_length")
        too_long = data.left_out(trainer.train_dataset, len(train_ds), train_info["source"], "rows", why)
        eval_too_long = data.left_out(trainer.eval_dataset, len(eval_ds), eval_info["source"], "held-out rows", why)
        log.info(f"{models.describe(trainer.model)}; {train_info['desirable']} desirable and "
                 f"{train_info['undesirable']} undesirable replies, {len(eval_ds)} held out"
                 + (f" ({too_long} and {eval_too_long} of them over max_length={args.max_length} in the prompt alone: "
                    f"left out)" if too_long or eval_too_long else "")
                 + f"; beta {args.beta}, weights {args.desirable_weight:g}/{args.undesirable_weight:g}, "
                   f"loss {args.loss_type}")
        data.warn_many_epochs(args, len(trainer.train_dataset), run.state.num_processes)
        result = trainer.train(resume_from_checkpoint=run.last_checkpoint())
        eval_metrics = trainer.evaluate()
        models.save_trained(trainer, tokenizer, run.out, merge_adapter=keys.merge_adapter)

        logged = [h for h in trainer.state.log_history if "loss" in h and "kl" in h]
        metrics = {
            "train_loss": runs.train_loss(trainer),
            "steps": result.global_step,
            "train_examples": len(train_ds) - too_long,  # trained on, as dpo and reward count their pairs
            "train_examples_too_long": too_long,
            "eval_examples_too_long": eval_too_long,
            "data": train_info,
            **{k: v for k, v in eval_metrics.items() if isinstance(v, (int, float))},
            "history": [{k: v for k, v in h.items() if k in ("step", "loss", "kl") or "/" in k} for h in logged],
        }
        if heldout is not None and run.state.is_main_process:
            metrics.update(heldout_comparison(recipe, keys, heldout, ("input", init.path), ("kto", str(run.out))))
        run.finish(metrics, config=args, global_batch_size=runs.global_batch_size(args, run.state.num_processes))


if __name__ == "__main__":
    cli.run_main(main)
