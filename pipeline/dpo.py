"""Stage 4a, dpo: direct preference optimisation with TRL's DPOTrainer.

    accelerate launch pipeline/dpo.py recipes/small.yaml [dpo.beta=0.1 dpo.loss_type=[sigmoid] dpo.use_peft=true ...]

The policy starts from `dpo.init_from` (default `sft`); the reference is the same checkpoint loaded once and
frozen or, with `use_peft`, the policy with its adapter switched off. `precompute_ref_log_probs: true` scores the
reference once before training and reuses the log-probs every epoch. `loss_type` simpo, cpo and orpo need no
reference: none is loaded (pipeline/reference_free.py). Data: any preference format the reward stage
reads (preferences.load_preferences). Section keys: TRL's DPOConfig fields, ModelConfig's LoRA fields, DPOKeys
(pipeline/stages.py). At the end the input and the tuned policy answer the held-out prompts (verifier accuracy).

`dpo.rounds: N` > 1 iterates (pipeline/dpo_rounds.py): after round 1 on the dataset, each round samples pairs from the
current policy (a tool prompt with its tools), labels them (`round_labeller`: the reward model or the world's
annotator, which leaves tool prompts out) and trains on them.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, never shadow libraries with our modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from pipeline import batching, cli, data, dpo_rounds, judges, log, models, preferences, reference_free, runs
from pipeline.generation import refuse_past_positions
from pipeline.heldout import heldout_comparison, heldout_rows
from pipeline.recipe import load_recipe, stage_help
from pipeline.reward_model import RewardModel
from pipeline.stages import STAGES

STAGE = "dpo"
USAGE = "usage: pipeline/dpo.py RECIPE [dpo.KEY=VALUE ...]"
PAIR_COLUMNS = ("prompt", "chosen", "rejected", "tools")  # tools: TRL renders a tool pair's prompt with its schemas
HISTORY_KEYS = ("step", "loss", "nll_loss", "log_odds_ratio")  # and every `group/name` the trainer logs


def chosen_logp_watch(drop: float):
    """A TrainerCallback that warns once when logps/chosen falls `drop` nats below its first logged value:
    both replies losing probability while the margin grows is DPO's best-known failure mode."""
    from transformers import TrainerCallback

    class ChosenLogpWatch(TrainerCallback):
        start = None
        warned = False

        def on_log(self, args, state, control, logs=None, **kw):
            value = (logs or {}).get("logps/chosen")
            if value is None or not state.is_world_process_zero:
                return
            if self.start is None:
                self.start = value
            elif not self.warned and value < self.start - drop:
                self.warned = True
                log.warning(f"log-prob of chosen replies fell from {self.start:.2f} to {value:.2f} (step "
                            f"{state.global_step}): the policy is moving mass away from both replies; consider a "
                            f"larger beta, a lower learning rate, or `sft` in loss_type (e.g. [sigmoid, sft]: RPO)")

    return ChosenLogpWatch()


def check_rounds(recipe, keys) -> None:
    """A reward labeller needs a reward model: bad values stop the stage before anything loads."""
    if keys.rounds == 1 or keys.round_labeller != "reward":
        return
    if keys.round_reward_model is None:
        raise cli.PipelineError(f"{recipe.path}: dpo.round_labeller=reward needs a reward model: the recipe has no "
                                f"`reward` stage; add one, name a saved reward model in dpo.round_reward_model, or "
                                f"use dpo.round_labeller=annotator")
    if keys.round_reward_model in STAGES and keys.round_reward_model not in recipe.stages:
        raise cli.PipelineError(f"{recipe.path}: dpo.round_reward_model is the `{keys.round_reward_model}` stage, "
                                f"but the recipe has no `{keys.round_reward_model}` section")


def round_prompts(keys, train_ds, places: list[str] | None = None) -> list[dict]:
    """The prompts later rounds sample from: the training pairs' distinct prompts, with the tools each offers; the
    annotator judges world problems only (it needs their answers), not tool replies (their prompts are left out).
    `places`: where each training pair is from, to name a row the annotator cannot judge (else its row number)."""
    prompts = train_ds.select_columns([c for c in ("prompt", "skill", "answer", "tools") if c in train_ds.column_names])
    if keys.round_labeller == "annotator":
        spec = data.spec_name(keys.dataset)
        prompts = judges.with_answers(prompts, spec, required=True, needed_for="dpo.round_labeller=annotator",
                                      own_answers=False, places=places)
        return dpo_rounds.annotator_prompts(dpo_rounds.distinct_prompts(prompts), spec)
    return dpo_rounds.distinct_prompts(prompts)


def pairs_only(ds):
    """The columns DPOTrainer reads: the pair, and the tool schemas its chat template renders into the prompt."""
    return ds.remove_columns([c for c in ds.column_names if c not in PAIR_COLUMNS])


def main(argv):
    recipe = load_recipe(*cli.split_stage_args(argv, USAGE, lambda: stage_help(STAGE)))
    recipe.check_config(STAGE, portable=True)  # the config class's own checks before upstream stages
    keys = recipe.keys(STAGE)
    peft_values = recipe.peft_values(STAGE)
    check_rounds(recipe, keys)
    reference_free.check(recipe, STAGE)
    no_reference = reference_free.is_reference_free(recipe.config_default(STAGE, "loss_type"))
    with runs.StageRun(recipe, STAGE) as run:
        train_ds, eval_ds, train_info, eval_info, train_places, eval_places = preferences.load_preference_splits(
            keys.dataset, keys.eval_dataset, keys.eval_fraction, recipe, keys.columns, places=True)
        run.note_data("dataset", train_info)
        run.note_data("eval_dataset", eval_info)
        data.warn_world_eval(recipe, STAGE, keys)
        heldout = heldout_rows(recipe, keys)
        prompts = round_prompts(keys, train_ds, train_places) if keys.rounds > 1 else None
        args = recipe.trainer_config(STAGE, output_dir=str(run.out))
        init = run.checkpoint()
        if init.path is None:
            raise cli.PipelineError(f"{recipe.path}: dpo.init_from is a new model from `model.config`; "
                                    f"start DPO from a trained checkpoint (sft)")
        run.prepare()

        from trl import DPOTrainer as TRLDPOTrainer

        DPOTrainer = batching.length_grouped(TRLDPOTrainer)  # group_by_length measures pairs, batches shuffled
        if no_reference:  # simpo, cpo, orpo (or sft alone): the policy's own log-probs, no reference model
            DPOTrainer = reference_free.trainer_class(DPOTrainer, keys.simpo_gamma)

        tokenizer = models.load_tokenizer(recipe, init)
        models.check_chat_template(tokenizer, {train_info["source"]: (train_ds, train_places),
                                               eval_info["source"]: (eval_ds, eval_places)})
        if prompts and any(row.get("tools") for row in prompts):  # rounds 2+ read the sampled replies' calls
            models.check_tool_parser(tokenizer, f"{recipe.path}: dpo.rounds")
        # with LoRA the reference is the policy with its adapter switched off; iterated, TRL would copy a later
        # round's adapter as that round's reference, so the rounds keep the initial model loaded instead
        # rounds > 1 measure each round's samples' KL to the initial model, so they load it with any loss
        policy, peft_config, reference = models.load_policy(recipe, init, peft_values, tokenizer, STAGE,
                                                            reference_with_peft=keys.rounds > 1,
                                                            reference=keys.rounds > 1 or not no_reference)
        refuse_past_positions(recipe, policy.config, args.max_length, f"{STAGE}.max_length")

        # TRL leaves out a pair whose prompt alone fills max_length (no reply token would be left)
        too_long = {"train": 0, "eval": 0}
        why = (f"have prompts of dpo.max_length={args.max_length} tokens or more, which leave no reply token: "
               f"raise max_length")

        def trainer_for(model, pairs, output_dir, dataset_pairs: bool):
            from peft import PeftModel

            trainer = DPOTrainer(model=model, ref_model=reference, args=dpo_rounds.with_output_dir(args, output_dir),
                                 train_dataset=pairs_only(pairs), eval_dataset=pairs_only(eval_ds),
                                 processing_class=tokenizer, callbacks=[chosen_logp_watch(keys.chosen_logp_warn_drop)],
                                 # a later round's policy already carries the adapter of the rounds before
                                 peft_config=None if isinstance(model, PeftModel) else peft_config)
            for net in (trainer.model, trainer.ref_model):  # policy and reference: less padding, the same outputs
                if net is not None:
                    batching.split_forward(net, keys.length_split)
            if dataset_pairs:  # round 1 trains on the dataset's pairs; later rounds sample their own for its prompts
                too_long["train"] = data.left_out(trainer.train_dataset, len(train_ds), train_info["source"], "pairs",
                                                  why)
                too_long["eval"] = data.left_out(trainer.eval_dataset, len(eval_ds), eval_info["source"],
                                                 "held-out pairs", why)
            return trainer

        if keys.rounds == 1:
            trainer = trainer_for(policy, train_ds, run.out, dataset_pairs=True)
            log.info(f"{models.describe(trainer.model)}; {len(train_ds)} pairs, {len(eval_ds)} held out"
                     + (f" ({too_long['train']} and {too_long['eval']} of them over max_length={args.max_length} "
                        f"in the prompt alone: left out)" if too_long["train"] or too_long["eval"] else "")
                     + f"; beta {args.beta}, loss {args.loss_type}{'; no reference model' if no_reference else ''}")
            data.warn_many_epochs(args, len(trainer.train_dataset), run.state.num_processes)
            result = trainer.train(resume_from_checkpoint=run.last_checkpoint())
            logged = [h for h in trainer.state.log_history if "loss" in h and "logps/chosen" in h]
            trained = {"train_loss": runs.train_loss(trainer), "steps": result.global_step,
                       "train_pairs": len(train_ds),
                       "history": [{k: v for k, v in h.items() if k in HISTORY_KEYS or "/" in k} for h in logged]}
        else:
            reward = RewardModel.load(recipe, run.checkpoint("round_reward_model"), device=run.state.device) \
                if keys.round_labeller == "reward" else None
            log.info(f"{models.param_count(policy) / 1e6:.2f}M parameters; {keys.rounds} rounds: round 1 on {len(train_ds)} pairs, then pairs "
                     f"sampled for up to {keys.round_max_prompts or len(prompts)} of {len(prompts)} prompts, "
                     f"labelled by the {keys.round_labeller}; {len(eval_ds)} pairs held out; beta {args.beta}, "
                     f"loss {args.loss_type}")
            setup = dpo_rounds.Rounds(recipe, keys, run, tokenizer, reference, trainer_for, prompts, heldout, reward)
            policy, trainer, trained = dpo_rounds.run_rounds(setup, policy, train_ds)
            if trainer is None:  # every round resumed: one to evaluate and save
                trainer = trainer_for(policy, train_ds, run.out, dataset_pairs=True)
        eval_metrics = trainer.evaluate()
        models.save_trained(trainer, tokenizer, run.out, merge_adapter=keys.merge_adapter)

        metrics = {
            "train_loss": trained["train_loss"],
            "steps": trained["steps"],
            "train_pairs": trained["train_pairs"] - too_long["train"],  # trained on, as the reward stage counts
            "train_pairs_too_long": too_long["train"],
            "eval_pairs_too_long": too_long["eval"],
            "data": train_info,
            **{k: v for k, v in eval_metrics.items() if isinstance(v, (int, float))},
            "history": trained["history"],
            **({"rounds": trained["rounds"]} if "rounds" in trained else {}),
        }
        if heldout is not None and run.state.is_main_process:
            metrics.update(heldout_comparison(recipe, keys, heldout, ("input", init.path), ("dpo", str(run.out))))
        run.finish(metrics, config=args, global_batch_size=runs.global_batch_size(args, run.state.num_processes),
                   resume_only=dpo_rounds.RESUME_ONLY if keys.rounds > 1 else ())


if __name__ == "__main__":
    cli.run_main(main)
