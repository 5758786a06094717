"""Stage 3, reward: a reward model trained on preference pairs with TRL's RewardTrainer, and an evaluation that
says whether to trust it.

    accelerate launch pipeline/reward.py recipes/small.yaml [reward.learning_rate=1e-4 ...]
    python pipeline/reward.py recipes/small.yaml reward.dataset=hh.jsonl reward.eval_dataset=hh_test.jsonl

The model is the causal LM named by `init_from` (default: the sft stage) with its LM head replaced by a score head
of one output (AutoModelForSequenceClassification, num_labels=1), trained on the Bradley-Terry loss
-log sigmoid(r_chosen - r_rejected [- margin]), plus `lm_loss_coefficient` times a next-token loss on the chosen
replies (read by the starting model's frozen LM head; `reward_trainer`); `use_peft: true` trains LoRA adapters plus
the score head and saves the merged model. Pairs come in any format of data/README.md (`data.load_preferences`).

The held-out pairs (`eval_dataset`, or `eval_fraction` of the training prompts) are scored at the end by the saved
model read back from disk: accuracy, mean margin, accuracy per category (`category_column`, the world's skill),
accuracy against the clean labels (`clean_column`, the world's clean_agrees), correlation of reward with reply
length and accuracy on pairs whose chosen reply is the shorter / longer one, and the expected calibration error of
sigmoid(r_chosen - r_rejected). The reward mean and standard deviation on training pairs go into the saved
config.json as `reward_mean` / `reward_std` (PPO normalises with them). Outputs: the model (safetensors) and
tokenizer, metrics.json, report.md and calibration.png (reliability diagram, histogram of margins).
Section keys: TRL's RewardConfig fields, ModelConfig's LoRA fields, and RewardKeys (pipeline/stages.py).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, never shadow libraries with our modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import contextlib
import json
import random

from pipeline import cli, data, metrics as M, models, runs
from pipeline.recipe import load_recipe

STAGE = "reward"
USAGE = "usage: pipeline/reward.py RECIPE [reward.KEY=VALUE ...]"
TRAIN_COLUMNS = ("prompt", "chosen", "rejected", "margin", "tools")
FIGURE = "calibration.png"


# ---------------------------------------------------------------------------------------------- model


def load_reward_model(recipe, path, peft_values=None):
    """A one-output sequence-classification model from a causal LM folder (full or adapter) or a reward model."""
    from transformers import AutoModelForSequenceClassification

    try:  # the fresh score head and the dropped LM head are expected: TRL silences the load report for them
        from trl.trainer.reward_trainer import suppress_seqcls_warning
    except ImportError:  # pragma: no cover - a TRL without it only prints a longer load report
        suppress_seqcls_warning = contextlib.nullcontext
    with suppress_seqcls_warning():
        return models.load_causal_lm(recipe, path, peft_values=peft_values, cls=AutoModelForSequenceClassification,
                                     num_labels=1, revision=recipe.model.revision)


def save_reward_model(trainer, tokenizer, out: Path, recipe, init_path: str) -> None:
    """Save the trained reward model as a full safetensors model with its tokenizer. A LoRA run keeps its adapter
    (with the trained score head) under `adapter/` and saves the merged model at the top, so the folder always
    loads with AutoModelForSequenceClassification.from_pretrained."""
    from peft import PeftModel

    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if not isinstance(unwrapped, PeftModel):
        trainer.save_model(str(out))
    else:
        trainer.save_model(str(out / "adapter"))
        if trainer.accelerator.is_main_process:  # merge from disk: works whatever sharding trained the adapter
            with models.single_process():  # under ZeRO-3 a load would wait for the other processes
                base = load_reward_model(recipe, init_path)
                models.fit_embeddings(base, tokenizer)
                merged = PeftModel.from_pretrained(base, str(out / "adapter")).merge_and_unload()
                merged.config.pad_token_id = tokenizer.pad_token_id
                merged.save_pretrained(str(out), safe_serialization=True)
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(str(out))
    trainer.accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------- training


def lm_head_weight(recipe, path: str, tokenizer):
    """The output embedding (LM head) of the causal LM at `path`, sized to the tokenizer, as a frozen tensor."""
    with models.single_process():  # a plain load on every process; under ZeRO-3 it would wait for the others
        lm = models.load_causal_lm(recipe, path)
        models.fit_embeddings(lm, tokenizer)
        return lm.get_output_embeddings().weight.detach().clone()


def reward_trainer(lm_loss_coefficient: float, lm_head, **kwargs):
    """TRL's RewardTrainer. With lm_loss_coefficient > 0 the loss gains that weight times a next-token loss on the
    chosen replies, read from the reward model's last hidden states by the starting model's frozen LM head (GRM:
    Yang et al. 2024, "Regularizing Hidden States Enables Learning Generalizable Reward Model for LLMs"). It keeps
    the hidden states those of a language model that predicts good replies, so the score head can check a reply
    against them instead of settling on surface features such as style (README "Reward model")."""
    import torch.nn.functional as F
    from trl import RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    if not lm_loss_coefficient:
        return RewardTrainer(**kwargs)

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

    class LMRegularizedRewardTrainer(RewardTrainer):
        lm_head_weight = lm_head  # moved to the device and dtype of the hidden states at the first step

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            return dataset.map(lambda row: {"chosen_prompt_length": len(encode_prompt(
                processing_class, row["prompt"], _tools(row)))}, desc=f"Prompt lengths of {dataset_name} dataset")

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            self._signature_columns = [*self._signature_columns, "chosen_prompt_length"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("lm_labels")[:, 1:]
            inputs["output_hidden_states"] = True
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
            hidden = outputs.hidden_states[-1][:len(labels), :-1]
            self.lm_head_weight = self.lm_head_weight.to(hidden.device, hidden.dtype)
            logits = F.linear(hidden, self.lm_head_weight).flatten(0, 1).float()
            token_loss = F.cross_entropy(logits, labels.flatten(), ignore_index=-100, reduction="sum")
            lm_loss = token_loss / (labels != -100).sum().clamp(min=1)  # a batch of empty replies adds nothing
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["lm_loss"].append(self.accelerator.gather_for_metrics(lm_loss.detach()).mean().item())
            loss = loss + lm_loss_coefficient * lm_loss
            return (loss, outputs) if return_outputs else loss

    return LMRegularizedRewardTrainer(data_collator=ChosenLabelsCollator(
        pad_token_id=kwargs["processing_class"].pad_token_id, pad_to_multiple_of=kwargs["args"].pad_to_multiple_of),
        **kwargs)


# ---------------------------------------------------------------------------------------------- scoring


def _tools(row):
    tools = row.get("tools")
    return json.loads(tools) if isinstance(tools, str) else tools


def encode(tokenizer, prompt, reply, tools=None) -> list[int]:
    """Token ids of prompt + reply exactly as TRL's RewardTrainer builds them (chat template, or text + eos)."""
    if isinstance(reply, list):
        return list(tokenizer.apply_chat_template(prompt + reply, tools=tools, tokenize=True,
                                                  return_dict=True)["input_ids"])
    if not reply.endswith(tokenizer.eos_token):
        reply = reply + tokenizer.eos_token
    return list(tokenizer(prompt + reply)["input_ids"])


def encode_prompt(tokenizer, prompt, tools=None) -> list[int]:
    """Token ids of the prompt as it begins `encode(tokenizer, prompt, reply)`: the reply's tokens follow them (for a
    text prompt, up to a BPE merge across the boundary, which moves the split by a token)."""
    if isinstance(prompt, list):
        return list(tokenizer.apply_chat_template(prompt, tools=tools, tokenize=True, add_generation_prompt=True,
                                                  return_dict=True)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def reply_text(reply) -> str:
    return reply if isinstance(reply, str) else "\n".join(str(m.get("content") or "") for m in reply)


def score(model, sequences: list[list[int]], pad_id: int, batch_size: int, max_length: int | None,
          desc: str = "scoring") -> tuple[list[float], int]:
    """Reward of each sequence (batched by length, right-padded); sequences over max_length keep their last
    max_length tokens (the score head reads the last one). Returns the rewards and how many were cut."""
    import torch
    from tqdm.auto import tqdm

    cut = 0
    if max_length:
        cut = sum(len(s) > max_length for s in sequences)
        sequences = [s[-max_length:] for s in sequences]
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    rewards = [0.0] * len(sequences)
    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=len(order) <= batch_size):
            idx = order[start:start + batch_size]
            width = max(len(sequences[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, :len(sequences[i])] = torch.tensor(sequences[i])
                mask[row, :len(sequences[i])] = 1
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            for row, i in enumerate(idx):
                rewards[i] = float(out[row, 0])
    return rewards, cut


def score_pairs(model, tokenizer, rows, batch_size, max_length, desc):
    """(r_chosen, r_rejected, len_chosen, len_rejected, pairs cut) for preference rows; lengths in reply tokens."""
    seqs, lengths = [], []
    for row in rows:
        for side in ("chosen", "rejected"):
            seqs.append(encode(tokenizer, row["prompt"], row[side], _tools(row)))
            lengths.append(len(tokenizer(reply_text(row[side]), add_special_tokens=False)["input_ids"]))
    rewards, _ = score(model, seqs, tokenizer.pad_token_id, batch_size, max_length, desc)
    cut = sum(max(len(c), len(r)) > max_length for c, r in zip(seqs[0::2], seqs[1::2])) if max_length else 0
    return rewards[0::2], rewards[1::2], lengths[0::2], lengths[1::2], cut


# ---------------------------------------------------------------------------------------------- evaluation


def trust_checks(m: dict, category: str) -> list[dict]:
    """Plain-language verdicts on the evaluation: what would make a user distrust this reward model."""
    checks = []

    def add(name, ok, detail):
        checks.append({"check": name, "ok": bool(ok), "detail": detail})

    acc = m["accuracy"]
    add("beats chance", acc >= 0.6, f"held-out accuracy {acc:.3f}" + ("" if acc >= 0.6 else
        " is close to chance (0.5): the reward barely separates chosen from rejected"))
    shorter, longer = m["accuracy_chosen_shorter"], m["accuracy_chosen_longer"]
    if shorter is not None and longer is not None and min(m["pairs_chosen_shorter"], m["pairs_chosen_longer"]) >= 10:
        gap = longer - shorter
        add("not length-driven", abs(gap) <= 0.2,
            f"accuracy {shorter:.3f} where chosen is shorter vs {longer:.3f} where it is longer"
            + ("" if abs(gap) <= 0.2 else f": the reward prefers {'longer' if gap > 0 else 'shorter'} replies "
                                          f"beyond what the labels say"))
    else:
        add("not length-driven", True, "too few pairs with a shorter and a longer chosen reply to compare")
    if m["ece"] is not None:
        detail = f"ECE {m['ece']:.3f}"
        for name, lo, hi in (("confidence >= 0.8", 0.8, 1.01), ("confidence < 0.65", 0.5, 0.65)):
            bins = [b for b in m["calibration_bins"] if b["n"] and lo - 1e-9 <= b["lo"] < hi - 1e-9]
            n = sum(b["n"] for b in bins)
            if n:
                won = sum(b["n"] * b["accuracy"] for b in bins) / n
                conf = sum(b["n"] * b["confidence"] for b in bins) / n
                detail += f"; at {name} ({n} pairs) the preferred reply wins {won:.2f} (mean confidence {conf:.2f})"
        add("calibrated", m["ece"] <= 0.1, detail + ("" if m["ece"] <= 0.1 else
            ": treat sigmoid(margin) as a ranking, not a probability"))
    clean = f"accuracy_clean_per_{category}" in m  # judge categories by the clean labels where known
    per = m.get(f"accuracy_clean_per_{category}" if clean else f"accuracy_per_{category}", {})
    weak = {g: v["accuracy"] for g, v in per.items() if v["n"] >= 10 and v["accuracy"] < 0.6}
    add(f"no weak {category}", not weak, ", ".join(f"{g} {a:.2f}" for g, a in weak.items())
        + " near chance: a policy optimised on this reward can drift there unchecked" if weak
        else f"every {category} with 10+ pairs is at 0.6 or better" + (" (clean labels)" if clean else ""))
    gap = m["train_accuracy"] - acc
    add("generalises", gap <= 0.15, f"training-pair accuracy {m['train_accuracy']:.3f} vs held-out {acc:.3f}"
        + ("" if gap <= 0.15 else ": overfitting; fewer epochs or more data"))
    dropped = m["train_pairs_too_long"] / max(m["train_pairs_too_long"] + m["train_pairs"], 1)
    add("data fits max_length", dropped <= 0.1, f"{m['train_pairs_too_long']} training pairs over max_length "
        f"were left out by the trainer ({dropped:.1%}); {m['eval_pairs_truncated']} held-out pairs were scored "
        f"on their last max_length tokens")
    return checks


def write_report(path: Path, m: dict, category: str) -> None:
    def f(v, fmt=".3f"):
        return "n/a" if v is None else format(v, fmt)

    lines = [
        "# Reward model report", "",
        f"Trained on {m['train_pairs']} pairs from `{m['data']['train']['source']}`, evaluated on "
        f"{m['eval_pairs']} held-out pairs from `{m['data']['eval']['source']}`.", "",
        "| metric | value |", "|---|---|",
        f"| accuracy (held-out labels) | {f(m['accuracy'])} |",
    ]
    if "accuracy_clean" in m:
        lines.append(f"| accuracy against clean labels | {f(m['accuracy_clean'])} "
                     f"(labels clean on {f(m['clean_label_share'], '.1%')} of pairs) |")
    lines += [
        f"| mean margin r(chosen) − r(rejected) | {f(m['mean_margin'])} |",
        f"| accuracy where chosen is shorter | {f(m['accuracy_chosen_shorter'])} ({m['pairs_chosen_shorter']} pairs) |",
        f"| accuracy where chosen is longer | {f(m['accuracy_chosen_longer'])} ({m['pairs_chosen_longer']} pairs) |",
        f"| always prefer the longer reply | {f(m['longer_reply_accuracy'])} |",
        f"| correlation reward ~ reply length | {f(m['length_correlation'])} |",
        f"| correlation margin ~ length difference | {f(m['margin_length_correlation'])} |",
        f"| ECE of sigmoid(margin) | {f(m['ece'])} |",
    ]
    if "ece_clean" in m:
        lines.append(f"| ECE against clean labels | {f(m['ece_clean'])} |")
    lines += [f"| accuracy on training pairs | {f(m['train_accuracy'])} |",
              f"| reward mean / std (training pairs, in config.json) | {f(m['reward_mean'])} / "
              f"{f(m['reward_std'])} |", ""]
    groups = m.get(f"accuracy_per_{category}")
    if groups:
        lines += [f"## Accuracy per {category}", "", f"| {category} | pairs | accuracy |"
                  + (" clean accuracy |" if "accuracy_clean_per_" + category in m else ""),
                  "|---|---|---|" + ("---|" if "accuracy_clean_per_" + category in m else "")]
        clean = m.get("accuracy_clean_per_" + category, {})
        for g, v in groups.items():
            lines.append(f"| {g} | {v['n']} | {f(v['accuracy'])} |"
                         + (f" {f(clean[g]['accuracy'])} |" if g in clean else ""))
        lines.append("")
    lines += ["## Can this reward model be trusted?", ""]
    lines += [f"- {'✅' if c['ok'] else '⚠️'} **{c['check']}**: {c['detail']}" for c in m["checks"]]
    lines += ["", f"![reliability diagram and margins]({FIGURE})", ""]
    path.write_text("\n".join(lines))


def plot(path: Path, m: dict, margins, clean) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    bins = m["calibration_bins"]
    centers = [(b["lo"] + b["hi"]) / 2 for b in bins]
    width = bins[0]["hi"] - bins[0]["lo"]
    ax1.bar(centers, [b["accuracy"] or 0 for b in bins], width=width * 0.9, color="tab:blue", alpha=0.75,
            label="accuracy in bin")
    ax1.plot([0.5, 1], [0.5, 1], "k--", lw=1, label="perfect calibration")
    ax1.plot([c for c, b in zip(centers, bins) if b["n"]], [b["confidence"] for b in bins if b["n"]], "o",
             color="tab:red", ms=4, label="mean confidence")
    for c, b in zip(centers, bins):
        if b["n"]:
            ax1.text(c, 0.02, str(b["n"]), ha="center", fontsize=7, color="white")
    ax1.set(xlim=(0.5, 1), ylim=(0, 1), xlabel="confidence max(p, 1-p), p = sigmoid(r_c − r_r)",
            ylabel="share where the preferred reply won", title=f"reliability diagram (ECE {m['ece']:.3f})")
    ax1.legend(loc="upper left", fontsize=8)
    margins = np.asarray(margins)
    edges = np.histogram_bin_edges(margins, bins=30)
    if clean is not None:
        clean = np.asarray(clean, dtype=bool)
        ax2.hist([margins[clean], margins[~clean]], bins=edges, stacked=True,
                 color=["tab:green", "tab:orange"], label=["label agrees with clean label", "label flipped by noise"])
        ax2.legend(fontsize=8)
    else:
        ax2.hist(margins, bins=edges, color="tab:green")
    ax2.axvline(0, color="k", lw=1)
    ax2.set(xlabel="margin r(chosen) − r(rejected)", ylabel="held-out pairs",
            title=f"margins (accuracy {m['accuracy']:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(model, tokenizer, eval_ds, train_ds, keys, max_length, seed) -> tuple[dict, list, list | None]:
    """All held-out metrics, plus the training reward statistics; also returns margins and clean labels to plot."""
    rows = eval_ds.to_list()
    rc, rr, lc, lr, cut = score_pairs(model, tokenizer, rows, keys.eval_batch_size, max_length, "scoring held-out")
    category, clean_col = keys.category_column, keys.clean_column
    groups = [r[category] for r in rows] if category in eval_ds.column_names else None
    clean = [bool(r[clean_col]) for r in rows] if clean_col in eval_ds.column_names else None
    m = M.preference_metrics(rc, rr, lc, lr, groups=groups, clean=clean, n_bins=keys.calibration_bins)
    if groups is not None:
        m[f"accuracy_per_{category}"] = m.pop("accuracy_per_group")
        if clean is not None:
            sign = [1 if c else -1 for c in clean]
            m[f"accuracy_clean_per_{category}"] = M.group_accuracy(
                [s * x for s, x in zip(sign, rc)], [s * x for s, x in zip(sign, rr)], groups)
    m["eval_pairs"] = m.pop("pairs")
    m["eval_pairs_truncated"] = cut

    idx = list(range(len(train_ds)))
    random.Random(seed).shuffle(idx)
    sample = train_ds.select(sorted(idx[:keys.norm_max_pairs])).to_list()
    tc, tr, *_ = score_pairs(model, tokenizer, sample, keys.eval_batch_size, max_length, "scoring training pairs")
    m["reward_mean"], m["reward_std"] = M.mean_std(tc + tr)
    m["reward_stats_pairs"] = len(sample)
    m["train_accuracy"] = M.pairwise_accuracy(tc, tr)
    return m, [a - b for a, b in zip(rc, rr)], clean


# ---------------------------------------------------------------------------------------------- main


def main(argv):
    recipe = load_recipe(*cli.split_stage_args(argv, USAGE))
    keys = recipe.keys(STAGE)
    peft_values = recipe.peft_values(STAGE)
    with runs.StageRun(recipe, STAGE) as run:
        train_ds, eval_ds, train_info, eval_info = data.load_preference_splits(
            keys.dataset, keys.eval_dataset, keys.eval_fraction, recipe)
        if "margin" in train_ds.column_names:
            if keys.margin_scale == 0:
                train_ds = train_ds.remove_columns("margin")
            elif keys.margin_scale != 1:
                train_ds = train_ds.map(lambda r: {"margin": r["margin"] * keys.margin_scale})
        args = recipe.trainer_config(STAGE, output_dir=str(run.out))
        init = run.checkpoint()
        if init.path is None:
            raise cli.PipelineError(f"{recipe.path}: reward.init_from is a new model from `model.config`; a reward "
                                    f"model starts from a trained language model (pretrain or sft it first)")
        if run.state.is_main_process:
            for name, info in (("training", train_info), ("held-out", eval_info)):
                print(f"[reward] {name} pairs: {info['pairs']} from {info['source']} (format {info['format']}"
                      + (f", {info['identical_dropped']} with chosen == rejected dropped" if
                         info['identical_dropped'] else "")
                      + (f", margin from {info['margin']}" if info.get("margin") else "") + ")", flush=True)
        run.prepare()

        from transformers import set_seed

        tokenizer = models.load_tokenizer(recipe, init)
        set_seed(args.seed)  # the score head is initialised at random
        model = load_reward_model(recipe, init.path, peft_values)
        models.fit_embeddings(model, tokenizer)
        model.config.pad_token_id = tokenizer.pad_token_id

        def keep_training_columns(ds):
            return ds.remove_columns([c for c in ds.column_names if c not in TRAIN_COLUMNS])

        lm_head = lm_head_weight(recipe, init.path, tokenizer) if keys.lm_loss_coefficient else None
        trainer = reward_trainer(keys.lm_loss_coefficient, lm_head, model=model, args=args,
                                 train_dataset=keep_training_columns(train_ds),
                                 eval_dataset=keep_training_columns(eval_ds) if args.eval_strategy != "no" else None,
                                 processing_class=tokenizer,
                                 peft_config=models.peft_config(peft_values, task_type="SEQ_CLS"))
        too_long = len(train_ds) - len(trainer.train_dataset)
        if run.state.is_main_process:
            print(f"[reward] {models.describe(trainer.model)}; {len(trainer.train_dataset)} training pairs"
                  + (f" ({too_long} over max_length={args.max_length} left out)" if too_long else ""), flush=True)
        result = trainer.train(resume_from_checkpoint=run.last_checkpoint())
        save_reward_model(trainer, tokenizer, run.out, recipe, init.path)

        out = {"train_loss": result.training_loss, "steps": result.global_step}
        lm_losses = [h["lm_loss"] for h in trainer.state.log_history if "lm_loss" in h]
        if lm_losses:
            out["train_lm_loss"] = lm_losses[-1]  # the last logged value of the regulariser
        if run.state.is_main_process:  # score with the saved model, read back as PPO will read it
            with models.single_process():  # under ZeRO-3 a load would wait for the other processes
                scorer = load_reward_model(recipe, str(run.out))
            m, margins, clean = evaluate(scorer, tokenizer, eval_ds, train_ds, keys, args.max_length, args.seed)
            m.update(train_pairs=len(trainer.train_dataset), train_pairs_too_long=too_long,
                     data={"train": train_info, "eval": eval_info})
            m["checks"] = trust_checks(m, keys.category_column)
            scorer.config.reward_mean, scorer.config.reward_std = m["reward_mean"], m["reward_std"]
            scorer.config.save_pretrained(str(run.out))
            headline = ("accuracy", "accuracy_clean", "accuracy_chosen_shorter", "ece", "length_correlation",
                        "mean_margin")
            out = {**{k: m[k] for k in headline if k in m}, **out, **{k: v for k, v in m.items() if k not in headline}}
            write_report(run.out / "report.md", out, keys.category_column)
            plot(run.out / FIGURE, out, margins, clean)
            print(f"[reward] held-out accuracy {m['accuracy']:.3f}"
                  + (f", against clean labels {m['accuracy_clean']:.3f}" if "accuracy_clean" in m else "")
                  + f", ECE {m['ece']:.3f}, reward mean {m['reward_mean']:.3f} std {m['reward_std']:.3f}; "
                  + f"{sum(not c['ok'] for c in m['checks'])} warning(s) in {run.final_dir / 'report.md'}",
                  flush=True)
        run.finish(out, config=args, global_batch_size=runs.global_batch_size(args, run.state.num_processes))


if __name__ == "__main__":
    cli.run_main(main)
