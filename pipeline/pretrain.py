"""Stage 1, pretrain: causal-LM pretraining on packed blocks of plain text.

    accelerate launch pipeline/pretrain.py recipes/small.yaml [pretrain.max_steps=100 ...]

A new model is built from the recipe's `model.config` (its tokenizer trained on the corpus when `tokenizer.train`),
or training continues from `pretrain.init_from`. Section keys are transformers' TrainingArguments fields plus the
pipeline keys in pipeline/stages.py (PretrainKeys).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, never shadow libraries with our modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import math
from itertools import chain

from pipeline import cli, data, log, models, runs
from pipeline.generation import context_length
from pipeline.recipe import load_recipe, stage_help
from pipeline.tokenizer import doc_sep_id, load_tokenizer as load_saved_tokenizer

STAGE = "pretrain"
USAGE = "usage: pipeline/pretrain.py RECIPE [pretrain.KEY=VALUE ...]"


def pack(texts, tokenizer, block_size: int) -> list[list[int]]:
    """Documents joined with the document separator, cut into full blocks (the ragged tail is dropped)."""
    sep = doc_sep_id(tokenizer)
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    stream = list(chain.from_iterable(doc + [sep] for doc in ids))
    return [stream[i:i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]


def main(argv):
    recipe = load_recipe(*cli.split_stage_args(argv, USAGE, lambda: stage_help(STAGE)))
    recipe.check_config(STAGE, portable=True)  # the config class's own checks before upstream stages
    keys = recipe.keys(STAGE)
    with runs.StageRun(recipe, STAGE) as run:
        args = recipe.trainer_config(STAGE, output_dir=str(run.out))
        corpus, info = data.load_with_info(keys.dataset, "text", recipe, text_split=keys.text_split,
                                           column=keys.text_column)
        run.note_data("dataset", info)
        corpus, eval_corpus = corpus[keys.text_column], None
        if keys.eval_dataset:
            eval_corpus, info = data.load_with_info(keys.eval_dataset, "text", recipe, text_split=keys.text_split,
                                                    column=keys.text_column)
            run.note_data("eval_dataset", info)
            eval_corpus = eval_corpus[keys.text_column]
        init = run.checkpoint()
        run.prepare()

        from datasets import Dataset
        from transformers import Trainer, default_data_collator

        with run.state.main_process_first():  # the main process trains and saves the tokenizer, the others load it
            if init.path is None and run.state.is_main_process:
                tokenizer = models.load_tokenizer(recipe, init, corpus=corpus)
                tokenizer.save_pretrained(str(run.out))
            elif init.path is None:  # the saved tokenizer as it is: the stage folder holds no model yet
                tokenizer = load_saved_tokenizer(str(run.out), trust_remote_code=recipe.model.trust_remote_code)
            else:
                tokenizer = models.load_tokenizer(recipe, init)
        blocks = pack(corpus, tokenizer, keys.block_size)
        if eval_corpus is not None:
            eval_blocks = pack(eval_corpus, tokenizer, keys.block_size)
        else:  # hold out a share of the blocks
            n_eval = max(1, int(len(blocks) * keys.eval_fraction))
            blocks, eval_blocks = blocks[:-n_eval], blocks[-n_eval:]
        if not blocks or not eval_blocks:  # the held-out file's own text, or the training text (split or not)
            short = keys.eval_dataset if blocks and eval_corpus is not None else keys.dataset
            raise cli.PipelineError(f"{short}: too little text for one block of {keys.block_size} tokens")
        train_ds = Dataset.from_dict({"input_ids": blocks, "labels": blocks})
        eval_ds = Dataset.from_dict({"input_ids": eval_blocks, "labels": eval_blocks})

        if init.path is None:
            model = models.build_causal_lm(recipe, tokenizer)
        else:
            model = models.load_causal_lm(recipe, init.path, revision=recipe.model.revision, tokenizer=tokenizer)
        if (positions := context_length(model)) and keys.block_size > positions:  # learned ones: an IndexError
            raise cli.PipelineError(f"{recipe.path}: pretrain.block_size ({keys.block_size}) is over the model's "
                                    f"{positions} positions: lower it, or build the model with more")
        models.configure_generation(model, tokenizer)
        log.info(f"{models.describe(model)}; {len(blocks)} blocks of {keys.block_size} tokens "
                 f"({len(blocks) * keys.block_size / 1e6:.2f}M tokens), {len(eval_blocks)} held out")

        trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                          data_collator=default_data_collator, processing_class=tokenizer)
        data.warn_many_epochs(args, len(train_ds), run.state.num_processes)
        result = trainer.train(resume_from_checkpoint=run.last_checkpoint())
        eval_metrics = trainer.evaluate()
        models.save_trained(trainer, tokenizer, run.out)

        metrics = {
            "train_loss": runs.train_loss(trainer),
            "eval_loss": eval_metrics["eval_loss"],
            "eval_perplexity": math.exp(min(eval_metrics["eval_loss"], 50)),
            "train_tokens": len(blocks) * keys.block_size,
            "steps": result.global_step,
            "parameters": models.param_count(model),
        }
        log.info(f"eval loss {metrics['eval_loss']:.3f}, perplexity {metrics['eval_perplexity']:.2f}")
        run.finish(metrics, config=args, global_batch_size=runs.global_batch_size(args, run.state.num_processes))


if __name__ == "__main__":
    cli.run_main(main)
