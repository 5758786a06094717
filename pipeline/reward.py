"""Stage 3, reward: a reward model trained on preference pairs with TRL's RewardTrainer, and an evaluation that says
whether to trust it.

    accelerate launch pipeline/reward.py recipes/small.yaml [reward.learning_rate=1e-4 ...]
    python pipeline/reward.py recipes/small.yaml reward.dataset=hh.jsonl reward.eval_dataset=hh_test.jsonl

The model is the causal LM named by `init_from` (default: the sft stage) with its LM head replaced by a score head
of one output (AutoModelForSequenceClassification, num_labels=1), trained on the Bradley-Terry loss -log
sigmoid(r_chosen - r_rejected [- margin]), plus `lm_loss_coefficient` times a next-token loss on the chosen replies
(read by the starting model's frozen LM head; `reward_trainer`); `use_peft: true` trains LoRA adapters plus the
score head and saves the merged model. Pairs come in any format of data/README.md (`preferences.load_preferences`).

The held-out pairs (`eval_dataset`, or `eval_fraction` of the training prompts) are scored at the end by the saved
model read back from disk: accuracy, mean margin, accuracy per category (`category_column`, the world's skill),
accuracy against the clean labels (`clean_column`, the world's clean_agrees), correlation of reward with reply
length and accuracy on pairs whose chosen reply is the shorter / longer one, and the expected calibration error of
sigmoid(r_chosen - r_rejected). The reward mean and standard deviation on training pairs go into the saved
config.json as `reward_mean` / `reward_std`, and `max_length` as `reward_max_length`: every later reader scores
through pipeline/reward_model.py with them, so it sees replies as this stage trained on them. Outputs: the model
(safetensors) and tokenizer, metrics.json, report.md and calibration.png (reliability diagram, histogram of
margins). Section keys: TRL's RewardConfig fields, ModelConfig's LoRA fields, and RewardKeys (pipeline/stages.py).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, never shadow libraries with our modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import random

from pipeline import batching, cli, data, log, metrics as M, models, preferences, reward_report, runs
from pipeline.reward_model import (RewardModel, encode, encode_prompt, lm_head_weight, load_reward_model,
                                   next_token_loss, save_reward_model, save_statistics, tools_of)
from pipeline.formats import as_bool
from pipeline.generation import refuse_past_positions
from pipeline.recipe import load_recipe, stage_help

STAGE = "reward"
USAGE = "usage: pipeline/reward.py RECIPE [reward.KEY=VALUE ...]"
TRAIN_COLUMNS = ("prompt", "chosen", "rejected", "margin", "tools")


# ---------------------------------------------------------------------------------------------- training


def reward_trainer(lm_loss_coefficient: float, lm_head, **kwargs):
    """TRL's RewardTrainer. With lm_loss_coefficient > 0 the loss gains that weight times a next-token loss on the
    chosen replies, read from the reward model's last hidden states by the starting model's frozen LM head (GRM:
    `reward_model.next_token_loss`)."""
    from trl import RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    LengthGroupedRewardTrainer = batching.length_grouped(RewardTrainer)

    if not lm_loss_coefficient:
        return LengthGroupedRewardTrainer(**kwargs)

    class ChosenLabelsCollator(DataCollatorForPreference):
        """Also returns `lm_labels`: the chosen sequences (the batch's first half) with prompt and padding -100."""

        def torch_call(self, examples):
            batch = super().torch_call(examples)
            n = len(examples)
            labels = batch["input_ids"][:n].clone()
            labels[batch["attention_mask"][:n] == 0] = -100
            for i, example in enumerate(examples):
                labels[i, :example["chosen_prompt_length"]] = -100
            batch["lm_labels"] = labels
            return batch

    class LMRegularizedRewardTrainer(LengthGroupedRewardTrainer):
        lm_head_weight = lm_head  # moved to the device and dtype of the hidden states at the first step

        def _set_signature_columns_if_needed(self):  # the collator reads the prompt length too
            super()._set_signature_columns_if_needed()
            self._signature_columns = list(dict.fromkeys([*self._signature_columns, "chosen_prompt_length"]))

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            return dataset.map(lambda row: {"chosen_prompt_length": len(encode_prompt(
                processing_class, row["prompt"], tools_of(row)))}, desc=f"Prompt lengths of {dataset_name} dataset")

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("lm_labels")
            inputs["output_hidden_states"] = True
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
            hidden = outputs.hidden_states[-1][:len(labels)]
            self.lm_head_weight = self.lm_head_weight.to(hidden.device, hidden.dtype)  # moved once
            lm_loss = next_token_loss(hidden, labels, self.lm_head_weight)
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["lm_loss"].append(self.accelerator.gather_for_metrics(lm_loss.detach()).mean().item())
            loss = loss + lm_loss_coefficient * lm_loss
            return (loss, outputs) if return_outputs else loss

    return LMRegularizedRewardTrainer(data_collator=ChosenLabelsCollator(
        pad_token_id=kwargs["processing_class"].pad_token_id, pad_to_multiple_of=kwargs["args"].pad_to_multiple_of),
        **kwargs)


# ---------------------------------------------------------------------------------------------- evaluation


def within_max_length(ds, tokenizer, max_length: int | None, source: str):
    """The pairs whose chosen and rejected sequences both fit max_length, as TRL's RewardTrainer keeps them for
    training (held-out pairs are treated the same way), and how many were left out."""
    if not max_length:
        return ds, 0
    keep = [i for i, row in enumerate(ds) if max(len(encode(tokenizer, row["prompt"], row[side], tools_of(row)))
                                                for side in ("chosen", "rejected")) <= max_length]
    if not keep:
        raise cli.PipelineError(f"{source}: all {len(ds)} pairs are longer than reward.max_length={max_length} "
                                f"tokens: raise max_length")
    return (ds if len(keep) == len(ds) else ds.select(keep)), len(ds) - len(keep)


def scaled_margins(ds, scale: float):
    """The pairs' margins times `margin_scale` (0: none), for the training and held-out pairs alike: TRL's eval_loss
    subtracts the held-out margins, so left unscaled it measured another loss than the one trained."""
    if "margin" not in ds.column_names or scale == 1:
        return ds
    return ds.remove_columns("margin") if scale == 0 else ds.map(lambda r: {"margin": r["margin"] * scale})


def evaluate(scorer: RewardModel, eval_ds, train_ds, keys, seed) -> tuple[dict, list, list | None]:
    """All held-out metrics, plus the training reward statistics; also returns margins and clean labels to plot."""
    rows = eval_ds.to_list()
    held = scorer.score_pairs(rows, batch_size=keys.eval_batch_size, desc="scoring held-out")
    rc, rr = held.chosen, held.rejected
    category, clean_col = keys.category_column, keys.clean_column
    groups = [r[category] for r in rows] if category in eval_ds.column_names else None
    # a clean label as a bool (a CSV's "False" is text), None where it is not known (a dataset without the column)
    clean = [as_bool(r[clean_col]) for r in rows] if clean_col in eval_ds.column_names else None
    if clean is not None and all(c is None for c in clean):
        clean = None
    m = M.preference_metrics(rc, rr, held.chosen_tokens, held.rejected_tokens, groups=groups, clean=clean,
                             n_bins=keys.calibration_bins)
    for name in ("accuracy_per_group", "accuracy_clean_per_group"):
        if name in m:
            m[name.replace("group", category)] = m.pop(name)
    m["eval_pairs"] = m.pop("pairs")

    idx = list(range(len(train_ds)))
    random.Random(seed).shuffle(idx)
    sample = train_ds.select(sorted(idx[:keys.norm_max_pairs]))
    sample = within_max_length(sample, scorer.tokenizer, scorer.max_length, "training pairs")[0].to_list()
    train = scorer.score_pairs(sample, batch_size=keys.eval_batch_size, desc="scoring training pairs")
    m["reward_mean"], m["reward_std"] = M.mean_std(train.chosen + train.rejected)
    m["reward_stats_pairs"] = len(sample)
    m["train_accuracy"] = M.pairwise_accuracy(train.chosen, train.rejected)
    return m, [a - b for a, b in zip(rc, rr)], clean


# ---------------------------------------------------------------------------------------------- main


def main(argv):
    recipe = load_recipe(*cli.split_stage_args(argv, USAGE, lambda: stage_help(STAGE)))
    recipe.check_config(STAGE, portable=True)  # the config class's own checks before upstream stages
    keys = recipe.keys(STAGE)
    peft_values = recipe.peft_values(STAGE)
    with runs.StageRun(recipe, STAGE) as run:
        train_ds, eval_ds, train_info, eval_info, train_places, eval_places = preferences.load_preference_splits(
            keys.dataset, keys.eval_dataset, keys.eval_fraction, recipe, keys.columns, places=True)
        for ds, info in ((train_ds, train_info), (eval_ds, eval_info)):  # a list of datasets, some without
            if keys.margin_scale and "margin" in ds.column_names and None in ds["margin"]:
                raise cli.PipelineError(f"{info['source']}: some of its datasets give margins (margin or "
                                        f"score_chosen/score_rejected) and some do not: give them to all or none, "
                                        f"or set reward.margin_scale: 0")
        train_ds, eval_ds = (scaled_margins(ds, keys.margin_scale) for ds in (train_ds, eval_ds))  # one loss
        args = recipe.trainer_config(STAGE, output_dir=str(run.out))
        init = run.checkpoint()
        if init.path is None:
            raise cli.PipelineError(f"{recipe.path}: reward.init_from is a new model from `model.config`; a reward "
                                    f"model starts from a trained language model (pretrain or sft it first)")
        data.warn_world_eval(recipe, STAGE, keys)
        run.note_data("dataset", train_info)
        run.note_data("eval_dataset", eval_info)
        for name, info in (("training", train_info), ("held-out", eval_info)):
            if info["identical_dropped"] or info.get("margin"):
                log.info(f"{name} pairs: " + ", ".join(
                    ([f"{info['identical_dropped']} with chosen == rejected dropped"] if info["identical_dropped"]
                     else []) + ([f"margin from {info['margin']}"] if info.get("margin") else [])))
        run.prepare()

        from transformers import set_seed

        tokenizer = models.load_tokenizer(recipe, init)
        models.check_chat_template(tokenizer, {train_info["source"]: (train_ds, train_places),
                                               eval_info["source"]: (eval_ds, eval_places)})
        eval_ds, eval_too_long = within_max_length(eval_ds, tokenizer, args.max_length, eval_info["source"])
        set_seed(args.seed)  # the score head is initialised at random
        model = load_reward_model(recipe, init.path, peft_values)
        refuse_past_positions(recipe, model.config, args.max_length, f"{STAGE}.max_length")
        models.fit_embeddings(model, tokenizer)
        model.config.pad_token_id = tokenizer.pad_token_id

        def keep_training_columns(ds):
            return ds.remove_columns([c for c in ds.column_names if c not in TRAIN_COLUMNS])

        lm_head = lm_head_weight(recipe, init.path, tokenizer) if keys.lm_loss_coefficient else None
        trainer = reward_trainer(keys.lm_loss_coefficient, lm_head, model=model, args=args,
                                 train_dataset=keep_training_columns(train_ds),
                                 eval_dataset=keep_training_columns(eval_ds) if args.eval_strategy != "no" else None,
                                 processing_class=tokenizer,
                                 peft_config=models.peft_config(peft_values, "SEQ_CLS", model=model,
                                                                 recipe=recipe, stage=STAGE))
        batching.split_forward(trainer.model, keys.length_split)
        too_long = data.left_out(trainer.train_dataset, len(train_ds), train_info["source"], "pairs",
                                 f"are longer than reward.max_length={args.max_length} tokens: raise max_length")
        log.info(f"{models.describe(trainer.model)}; {len(trainer.train_dataset)} training pairs"
                 + (f" ({too_long} over max_length={args.max_length} left out)" if too_long else "")
                 + (f"; {eval_too_long} held-out pairs over max_length left out too" if eval_too_long else ""))
        data.warn_many_epochs(args, len(trainer.train_dataset), run.state.num_processes)
        result = trainer.train(resume_from_checkpoint=run.last_checkpoint())
        save_reward_model(trainer, tokenizer, run.out, recipe, init.path)

        out = {"train_loss": runs.train_loss(trainer), "steps": result.global_step}
        lm_losses = [h["lm_loss"] for h in trainer.state.log_history if "lm_loss" in h]
        if lm_losses:
            out["train_lm_loss"] = lm_losses[-1]  # the last logged value of the regulariser
        if run.state.is_main_process:  # score with the saved model, read back as PPO will read it
            with models.single_process():  # under ZeRO-3 a load would wait for the other processes
                scorer = RewardModel.load(recipe, runs.Checkpoint(STAGE, str(run.out), "", "local"),
                                          run.state.device, max_length=args.max_length)
            scorer.conversational = isinstance(train_ds[0]["prompt"], list)  # saved below with the statistics
            m, margins, clean = evaluate(scorer, eval_ds, train_ds, keys, args.seed)
            m.update(train_pairs=len(trainer.train_dataset), train_pairs_too_long=too_long,
                     eval_pairs_too_long=eval_too_long,
                     data={"train": train_info, "eval": eval_info})
            m["checks"] = reward_report.trust_checks(m, keys.category_column)
            save_statistics(run.out, scorer.model, mean=m["reward_mean"], std=m["reward_std"],
                            max_length=args.max_length, conversational=scorer.conversational)
            headline = ("accuracy", "accuracy_clean", "accuracy_chosen_shorter", "ece", "length_correlation",
                        "mean_margin")
            out = {**{k: m[k] for k in headline if k in m}, **out, **{k: v for k, v in m.items() if k not in headline}}
            reward_report.write_report(run.out / "report.md", out, keys.category_column)
            reward_report.plot(run.out / reward_report.FIGURE, out, margins, clean)
            log.info(f"held-out accuracy {m['accuracy']:.3f}"
                     + (f", against clean labels {m['accuracy_clean']:.3f}" if "accuracy_clean" in m else "")
                     + f", ECE {m['ece']:.3f}, reward mean {m['reward_mean']:.3f} std {m['reward_std']:.3f}; "
                     + f"{sum(not c['ok'] for c in m['checks'])} warning(s) in {run.final_dir / 'report.md'}")
        run.finish(out, config=args, global_batch_size=runs.global_batch_size(args, run.state.num_processes))


if __name__ == "__main__":
    cli.run_main(main)
