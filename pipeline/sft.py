"""Stage 2, sft: supervised fine-tuning on demonstrations with TRL's SFTTrainer.

    accelerate launch pipeline/sft.py recipes/small.yaml [sft.learning_rate=1e-4 sft.dataset=my_chats.jsonl ...]

Conversations (`messages`) train with assistant-only loss (the chat template marks assistant turns), prompt/
completion rows with completion-only loss. `use_peft: true` trains a LoRA adapter, with `load_in_4bit: true` QLoRA.
At the end the base and the fine-tuned model answer the held-out world prompts, and their verifier accuracies go
into metrics.json. Section keys: TRL's SFTConfig fields, ModelConfig's LoRA fields, and SFTKeys (pipeline/stages.py).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, never shadow libraries with our modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from pipeline import batching, cli, data, log, models, runs, turns
from pipeline.formats import is_text_completion
from pipeline.generation import refuse_past_positions
from pipeline.heldout import heldout_comparison, heldout_rows
from pipeline.recipe import load_recipe, stage_help
from pipeline.stages import STAGES
from pipeline.trl_refusals import trl_refusal

STAGE = "sft"
USAGE = "usage: pipeline/sft.py RECIPE [sft.KEY=VALUE ...]"
TRAIN_COLUMNS = ("messages", "prompt", "completion", "tools")


def rows_over(tokenizer, ds, max_length: int) -> int:
    """How many rows are longer than max_length tokens as the trainer tokenizes them (chat template with tools)."""
    return sum(turns.row_length(tokenizer, row) > max_length for row in ds)


def in_training_shape(eval_ds, train_ds, source, default: bool, places: list[str] | None = None):
    """Held-out rows in the training rows' shape, so eval_loss is the loss trained: the trainer takes its loss mask
    (assistant turns, or the completion) from the training rows, and tokenized other rows with it (all their text
    in the loss). Conversations and conversational prompt/completion rows convert (the completion: the trailing
    assistant turns); text prompt/completion rows beside conversations cannot: one line, or with the `default`
    held-out set (the world's conversations beside text rows of yours), None (no eval_loss), said. `places`: where
    each held-out row is from (file and line), to name one that cannot be split; without them, its row number."""
    from pipeline.unpaired import split_reply

    as_messages = "messages" in train_ds.column_names
    if as_messages == ("messages" in eval_ds.column_names):
        return eval_ds
    completions = eval_ds if as_messages else train_ds
    if is_text_completion(completions[0]):  # the rows of a dataset are all of one kind (data's chat check)
        kinds = ("text prompt/completion rows", "conversations")
        held, trained = kinds if as_messages else kinds[::-1]
        if default:
            log.warning(f"{source}: no eval_loss: its {held} beside training {trained} would not measure the loss "
                        f"trained; set sft.eval_dataset to held-out rows of the training rows' kind")
            return None
        raise cli.PipelineError(f"{source}: held-out {held} beside training {trained}: their loss is not the one "
                                f"trained; hold out rows of the training rows' kind")
    if as_messages:
        return eval_ds.map(lambda r: {"messages": r["prompt"] + r["completion"]},
                           remove_columns=["prompt", "completion"])

    def split(row, i):
        where = places[i] if places else f"row {i + 1}"  # its file and line, as the stage's other refusals name it
        return dict(zip(("prompt", "completion"), split_reply(row["messages"], source, where)))
    return eval_ds.map(split, with_indices=True, remove_columns=["messages"])


def main(argv):
    recipe = load_recipe(*cli.split_stage_args(argv, USAGE, lambda: stage_help(STAGE)))
    recipe.check_config(STAGE, portable=True)  # the config class's own checks before upstream stages
    keys = recipe.keys(STAGE)
    peft_values = recipe.peft_values(STAGE)
    with runs.StageRun(recipe, STAGE) as run:
        train_ds, train_info, train_places = data.load_with_info(keys.dataset, "chat", recipe, columns=keys.columns,
                                                                 places=True)  # the chat template check names them
        run.note_data("dataset", train_info)
        eval_ds = None
        if keys.eval_dataset:
            eval_ds, eval_info, eval_places = data.load_with_info(keys.eval_dataset, "chat", recipe,
                                                                  columns=keys.columns, places=True)
            eval_ds = in_training_shape(eval_ds, train_ds, eval_info["source"],
                                        keys.eval_dataset == STAGES[STAGE].keys.eval_dataset, eval_places)
            if eval_ds is not None:
                run.note_data("eval_dataset", eval_info)
        data.warn_world_eval(recipe, STAGE, keys)
        heldout = heldout_rows(recipe, keys)
        if heldout is not None and is_text_completion(train_ds[0]):
            log.warning(f"{train_info['source']}: text prompt/completion rows train on their plain text, but the "
                        f"held-out scoring (sft.heldout_prompts) asks each prompt as a chat user turn, as eval does: "
                        f"its accuracies measure a format this stage did not train; write the rows as conversations, "
                        f"or set sft.heldout_prompts empty")
        conversations = "messages" in train_ds.column_names  # the held-out rows are in their shape
        if keys.drop_oldest_turns and not conversations:
            log.warning(f"{train_info['source']}: sft.drop_oldest_turns shortens conversations (`messages`) only, and "
                        f"these rows are prompt/completion rows: a row over max_length is cut by truncation_mode")
        fixed = {"output_dir": str(run.out)}
        if "assistant_only_loss" not in recipe.section(STAGE):
            fixed["assistant_only_loss"] = conversations  # TRL's mask of assistant turns
        args = recipe.trainer_config(STAGE, **fixed)
        init = run.checkpoint()
        if init.path is None:
            raise cli.PipelineError(f"{recipe.path}: sft.init_from is a new model from `model.config`; "
                                    f"pretrain it first (add a pretrain stage) or start from a checkpoint")
        run.prepare()

        from trl import SFTTrainer as TRLSFTTrainer

        SFTTrainer = batching.length_grouped(TRLSFTTrainer)  # group_by_length: batches shuffled, tokens weighed alike

        tokenizer = models.load_tokenizer(recipe, init)
        models.check_chat_template(tokenizer, {train_info["source"]: (train_ds, train_places),
                                               **({eval_info["source"]: (eval_ds, eval_places)}
                                                  if eval_ds is not None else {})},
                                   assistant_only=args.assistant_only_loss)
        if keys.drop_oldest_turns and conversations and args.max_length:  # before the trainer tokenizes them
            train_ds, shortened = turns.fit_conversations(tokenizer, train_ds, args.max_length)
            eval_ds, eval_shortened = (turns.fit_conversations(tokenizer, eval_ds, args.max_length)
                                       if eval_ds is not None else (None, 0))
            log.info(f"sft.drop_oldest_turns: {shortened} of {len(train_ds)} training conversations"
                     + (f" and {eval_shortened} of {len(eval_ds)} held-out ones" if eval_ds is not None else "")
                     + f" were over max_length={args.max_length} tokens and lost their oldest exchanges")
        model = models.load_causal_lm(recipe, init.path, peft_values=peft_values, revision=recipe.model.revision,
                                      tokenizer=tokenizer)
        refuse_past_positions(recipe, model.config, args.max_length, f"{STAGE}.max_length")
        models.configure_generation(model, tokenizer)

        def keep_training_columns(ds):
            return ds.remove_columns([c for c in ds.column_names if c not in TRAIN_COLUMNS]) if ds else ds

        lora = models.peft_config(peft_values, model=model, recipe=recipe, stage=STAGE)
        try:  # what TRL refuses only here (assistant_only_loss on text rows, LoRA on lm_head, ...): one line
            trainer = SFTTrainer(model=model, args=args, train_dataset=keep_training_columns(train_ds),
                                 eval_dataset=keep_training_columns(eval_ds), processing_class=tokenizer,
                                 peft_config=lora)
        except ValueError as err:
            raise cli.PipelineError(trl_refusal(recipe, STAGE, "SFTTrainer", err, type(args))) from None
        batching.split_forward(trainer.model, keys.length_split)
        too_long = rows_over(tokenizer, train_ds, args.max_length) if args.max_length else 0
        if args.packing and too_long and args.packing_strategy == "bfd":  # TRL's bfd truncates overflow, unsaid
            log.warning(f"{too_long} rows are over sft.max_length={args.max_length} tokens: packing (bfd) cuts each at "
                        f"max_length and their rest is not trained on; packing_strategy: bfd_split keeps it")
        why = (f"are over sft.max_length={args.max_length} tokens and keep no completion token once cut "
               f"(truncation_mode {args.truncation_mode}): raise max_length"
               + (" or, for conversations of several exchanges, set sft.drop_oldest_turns: true"
                  if conversations and not keys.drop_oldest_turns else ""))
        dropped = eval_dropped = 0
        if not args.packing:  # packed, the trainer's rows are blocks, not rows
            dropped = data.left_out(trainer.train_dataset, len(train_ds), train_info["source"], "rows", why)
            if eval_ds is not None:
                eval_dropped = data.left_out(trainer.eval_dataset, len(eval_ds), eval_info["source"], "held-out rows",
                                             why)
        log.info(f"{models.describe(trainer.model)}; {len(trainer.train_dataset)} training rows"
                 + (f" ({too_long} over max_length={args.max_length} cut ({args.truncation_mode}), {dropped} of them "
                    f"left out: no completion token left)" if too_long and not args.packing else "")
                 + (f"; {eval_dropped} held-out rows left out the same way" if eval_dropped else ""))
        data.warn_many_epochs(args, len(trainer.train_dataset), run.state.num_processes)
        result = trainer.train(resume_from_checkpoint=run.last_checkpoint())
        metrics = {"train_loss": runs.train_loss(trainer), "steps": result.global_step,
                   "train_rows": len(train_ds) - dropped,  # trained on
                   "train_rows_too_long": too_long, "train_rows_dropped": dropped}
        if eval_ds is not None:
            metrics.update(eval_rows_dropped=eval_dropped, eval_loss=trainer.evaluate()["eval_loss"])
        models.save_trained(trainer, tokenizer, run.out, merge_adapter=keys.merge_adapter)

        if heldout is not None and run.state.is_main_process:
            metrics.update(heldout_comparison(recipe, keys, heldout, ("base", init.path), ("sft", str(run.out))))
        run.finish(metrics, config=args, global_batch_size=runs.global_batch_size(args, run.state.num_processes))


if __name__ == "__main__":
    cli.run_main(main)
