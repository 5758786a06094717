"""The stage registry: what each recipe section is, which config class its keys belong to, and its pipeline keys.

A stage section of a recipe accepts (1) the fields of the stage's TRL/Transformers config class, (2) the pipeline
keys declared here in a small dataclass (where the model starts from, which data it reads), and (3) for stages that
train with adapters, TRL's `ModelConfig` LoRA/quantization fields. A new stage plugs in by adding one `StageSpec`.

Pipeline-key metadata: `ref="checkpoint"` marks a key naming a model (a stage of the recipe, `model`, a path or a
hub id): the runner orders stages by it. `ref="data"` marks a dataset spec (`world:<split>`, a local file or folder,
or a hub id): its fingerprint enters the stage's manifest (a `world:` split's covers the world settings its rows are
built from); `out_at_default` leaves a key added later out of it at its default. A keys class may have
`world_settings(recipe)`: the world settings the stage reads itself (its annotator's), and `waits_for(recipe)`: stages
it reads only once finished, which the runner finishes first when it runs them too.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal


def key(default, help: str, ref: str | None = None, out_at_default: bool = False, **kw):
    meta = {"help": help}
    if ref:
        meta["ref"] = ref
    if out_at_default:  # a key added later: at its default it stays out of the fingerprint, so runs stay up to date
        meta["out_at_default"] = True
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


LENGTH_SPLIT_HELP = ("run each batch through the model as up to this many groups of rows of similar length, each "
                     "padded on its own: the same outputs and gradients with less padding (pipeline/batching.py)")

# TRL ModelConfig fields accepted by stages that can train LoRA adapters (QLoRA with load_in_4bit).
PEFT_FIELDS = (
    "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save",
    "lora_task_type", "use_rslora", "use_dora", "load_in_8bit", "load_in_4bit", "bnb_4bit_quant_type",
    "use_bnb_nested_quant", "bnb_4bit_quant_storage",
)


@dataclass
class PretrainKeys:
    init_from: str | None = key(None, "checkpoint to continue from (stage, path or hub id); empty: a new model "
                                      "from the `model` section", ref="checkpoint")
    dataset: str | list | dict = key("world:pretrain", "plain-text corpus: `text` rows (JSON Lines, Parquet, ...) "
                                                       "or .txt files (optionally .gz), a glob, a list or a mixture",
                                     ref="data")
    eval_dataset: str | None = key(None, "held-out text; empty: `eval_fraction` of the packed blocks", ref="data")
    eval_fraction: float = key(0.02, "share of packed blocks held out when no eval_dataset is given")
    text_column: str = key("text", "column holding the documents")
    text_split: Literal["paragraph", "line"] = key("paragraph", "how a .txt file is cut into documents: `paragraph` (blocks separated by a "
                                       "blank line) or `line` (one per line)")
    block_size: int = key(256, "tokens per packed training block")


@dataclass
class HeldoutKeys:
    """Verifier accuracy on held-out prompts, scored at the end of a policy stage for its input and its output."""

    heldout_prompts: str | None = key("world:eval", "prompts with reference answers (`answer`; a world `skill` "
                                                    "names its verifier), read as eval reads its prompts, scored at "
                                                    "the end for the input and the trained model; empty: skip",
                                      ref="data")
    heldout_max_prompts: int = key(400, "score at most this many held-out prompts")
    heldout_max_new_tokens: int = key(48, "generation budget per held-out reply")
    heldout_batch_size: int = key(64, "prompts per generation batch")


@dataclass
class SFTKeys(HeldoutKeys):
    init_from: str | None = key(None, "model to fine-tune; empty: `pretrain` if the recipe has it, else `model`",
                                ref="checkpoint")
    dataset: str | list | dict = key("world:sft", "conversations: messages, ShareGPT `conversations`, Alpaca "
                                                  "`instruction`/`output` or prompt/completion rows (data/README.md); "
                                                  "a list or a mixture of several", ref="data")
    eval_dataset: str | list | dict | None = key("world:sft_eval", "conversations for eval loss; empty: none",
                                                 ref="data")
    columns: dict | None = key(None, "column mapping {our name: your column}, e.g. {prompt: question, completion: "
                                     "answer}")
    merge_adapter: bool = key(False, "with use_peft: also save the merged full model under `merged/`")
    length_split: int = key(1, LENGTH_SPLIT_HELP)
    drop_oldest_turns: bool = key(False, "a conversation over max_length loses whole oldest exchanges (a user turn "
                                         "and what follows it up to the next), keeping its system message(s), tools "
                                         "and last exchange, until it fits; one that still does not fit is cut by "
                                         "truncation_mode (pipeline/turns.py)")


@dataclass
class DPOKeys(HeldoutKeys):
    init_from: str | None = key(None, "policy to tune, also the frozen reference; empty: `sft`, else `pretrain`, "
                                      "else `model`", ref="checkpoint")
    dataset: str | list | dict = key("world:preference", "preference pairs in any format of data/README.md",
                                     ref="data")
    eval_dataset: str | list | dict | None = key("world:preference_eval", "held-out pairs for eval loss and reward "
                                                                          "accuracy; empty: hold out `eval_fraction` "
                                                                          "of the prompts", ref="data")
    columns: dict | None = key(None, "column mapping {our name: your column}, e.g. {chosen: good, rejected: bad}")
    eval_fraction: float = key(0.05, "share of training prompts held out when no eval_dataset is given")
    merge_adapter: bool = key(False, "with use_peft: also save the merged full model under `merged/`")
    length_split: int = key(1, LENGTH_SPLIT_HELP)
    chosen_logp_warn_drop: float = key(5.0, "warn when the mean log-prob of chosen replies falls this many nats "
                                            "below its first logged value (a known DPO failure)")
    simpo_gamma: float = key(0.5, "loss_type simpo: the target margin γ between the replies' mean log-probs, scaled "
                                  "by beta (TRL's CPOConfig and LLaMA-Factory: 0.5)")
    rounds: int = key(1, "rounds of iterated DPO: 1 trains on `dataset` (offline DPO); N > 1: round 1 as 1, then "
                         "each round samples two replies per prompt of `dataset` from the current policy, labels "
                         "them with `round_labeller` (ties dropped) and runs DPO on them; the reference stays "
                         "`init_from`")
    round_labeller: Literal["reward", "annotator"] = key("reward", "who labels the sampled pairs: `reward` "
                                                                   "(round_reward_model) or `annotator` (the world's "
                                                                   "simulated annotator with world.label_noise; "
                                                                   "world prompts only)")
    round_reward_model: str | None = key("auto", "reward model of round_labeller=reward: a stage or a folder of a "
                                                 "one-output sequence-classification model; `auto`: the recipe's "
                                                 "`reward` stage", ref="checkpoint")
    round_max_prompts: int | None = key(2000, "prompts sampled per round after the first (a new random draw each "
                                              "round); empty: every prompt of `dataset`")
    round_max_new_tokens: int = key(48, "generation budget per sampled reply")

    def fill_defaults(self, recipe) -> None:
        """The reward model is an input (ordered after, fingerprinted) only when a round reads it."""
        if self.rounds <= 1 or self.round_labeller != "reward":
            self.round_reward_model = None
        elif self.round_reward_model == "auto":
            self.round_reward_model = "reward" if "reward" in recipe.stages else None

    def world_settings(self, recipe) -> tuple[str, ...]:
        """World settings the stage reads itself, beside those of its world datasets: the annotator's label noise."""
        return ("label_noise",) if self.rounds > 1 and self.round_labeller == "annotator" else ()


@dataclass
class KTOKeys(HeldoutKeys):
    init_from: str | None = key(None, "policy to tune, also the frozen reference; empty: `sft`, else `pretrain`, "
                                      "else `model`", ref="checkpoint")
    dataset: str | list | dict = key("world:preference", "unpaired preference rows: prompt/completion/label (TRL), "
                                                          "a conversation with `label` or `kto_tag` (LLaMA-Factory), "
                                                          "or preference pairs, each a desirable and an undesirable "
                                                          "row (data/README.md)", ref="data")
    eval_dataset: str | list | dict | None = key("world:preference_eval", "held-out rows (the same formats) for eval "
                                                                          "loss and rewards; empty: hold out "
                                                                          "`eval_fraction` of the prompts", ref="data")
    columns: dict | None = key(None, "column mapping {our name: your column}, e.g. {completion: reply, label: good}")
    eval_fraction: float = key(0.05, "share of training prompts held out when no eval_dataset is given")
    merge_adapter: bool = key(False, "with use_peft: also save the merged full model under `merged/`")
    length_split: int = key(1, LENGTH_SPLIT_HELP)


@dataclass
class RewardKeys:
    init_from: str | None = key(None, "model the reward model starts from (a causal LM; its LM head is replaced by "
                                      "a one-output score head); empty: `sft`, else `pretrain`, else `model`",
                                ref="checkpoint")
    dataset: str | list | dict = key("world:preference", "preference pairs in any format of data/README.md",
                                     ref="data")
    eval_dataset: str | list | dict | None = key("world:preference_eval", "held-out pairs for the evaluation; "
                                                                          "empty: hold out `eval_fraction` of the "
                                                                          "training prompts", ref="data")
    columns: dict | None = key(None, "column mapping {our name: your column}, e.g. {chosen: good, rejected: bad}")
    eval_fraction: float = key(0.1, "share of training prompts held out when no eval_dataset is given")
    category_column: str = key("skill", "column whose values get their own accuracy (if the data has it)")
    clean_column: str = key("clean_agrees", "column telling whether noise-free labels agree with chosen "
                                            "(if the data has it): accuracy against the clean labels")
    margin_scale: float = key(1.0, "factor on a margin / score difference before TRL subtracts it in the loss; "
                                   "0: ignore margins")
    lm_loss_coefficient: float = key(0.0, "weight of a next-token loss on the chosen replies, read by the starting "
                                          "model's frozen LM head (GRM); 0: the plain Bradley-Terry loss")
    norm_max_pairs: int = key(2000, "training pairs scored for the reward mean/std saved in the model config")
    eval_batch_size: int = key(64, "sequences per forward pass when scoring pairs")
    calibration_bins: int = key(10, "bins of the reliability diagram and the ECE")
    length_split: int = key(1, LENGTH_SPLIT_HELP)


@dataclass
class PPOKeys(HeldoutKeys):
    init_from: str | None = key(None, "policy to train, also the frozen reference; empty: `sft`, else `pretrain`, "
                                      "else `model`", ref="checkpoint")
    reward_model: str = key("reward", "reward model: the `reward` stage, or a folder of a one-output "
                                      "sequence-classification model; its config's reward_mean/reward_std "
                                      "normalise the scores", ref="checkpoint")
    reward_ensemble: list[str] = key([], "more reward models (stages or folders) scored beside reward_model, each "
                                         "normalised by its own statistics and combined by ppo.ensemble_objective",
                                     ref="checkpoints")
    implicit_reward: str | None = key(None, "a policy DPO tuned from init_from (a stage, e.g. `dpo`, or a folder): "
                                            "ppo.implicit_reward_beta x its log-probability ratio to the reference "
                                            "is added as a reward on every reply token (RTO); empty: none",
                                      ref="checkpoint")
    prompts: str | list | dict = key("world:preference", "prompts to answer: a `prompt` column (text or messages); "
                                                         "preference pairs qualify (their chosen/rejected are "
                                                         "ignored)", ref="data")
    columns: dict | None = key(None, "column mapping {our name: your column}, e.g. {prompt: question}")
    merge_adapter: bool = key(False, "with use_peft: also save the merged full model under `merged/`")
    image_judge: str | None = key(None, "with tools: the image judge that checks drawn images for the gold score: "
                                        "a stage (its `judge/` folder) or a folder; empty: the source of the "
                                        "recipe's image_judge tool, else of its diffusion tool",
                                  ref="checkpoint")
    monitor_window: int = key(10, "history rows (ppo: steps; grpo/rloo: logged steps) per window of the "
                                  "over-optimisation and collapse warnings (pipeline/monitors.py)")
    length_split: int = key(1, "algorithm ppo: run the forward passes over a rollout (policy, reference, "
                               "implicit_reward's policy, critic) as up to this many groups of rows of similar "
                               "length, each cut to its own columns: the same outputs and gradients with less "
                               "padding (pipeline/batching.py)")


    def fill_defaults(self, recipe) -> None:
        """The image judge is an input (ordered after, fingerprinted) only when the recipe has tools."""
        if not recipe.tools.tools:
            self.image_judge = None
            return
        from pipeline.tools import stage_sources

        self.image_judge = stage_sources(recipe.tools, self.image_judge).get("image_judge")

    def world_settings(self, recipe) -> tuple[str, ...]:
        """World settings the stage reads itself: the annotator of its reward rounds labels with the label noise."""
        return ("label_noise",) if recipe.config_default("ppo", "reward_rounds") > 1 else ()


SAMPLE_ROWS = 500  # rows of a local dataset that --check runs through the stage's own loader
NON_POLICY_STAGES = ("reward", "eval", "diffusion", "diffusion_dpo")  # stages whose output is not a causal LM


@dataclass
class EvalKeys:
    checkpoints: list[str] = key([], "models to evaluate, in report order: stages of the recipe or paths to saved "
                                     "causal LMs / LoRA adapters (or hub ids); empty: every model stage of the "
                                     "recipe in order (all but " + ", ".join(NON_POLICY_STAGES) + ")",
                                 ref="checkpoints")
    baseline: str | None = key(None, "checkpoint every other one is compared with pairwise (evaluated too if not "
                                     "in `checkpoints`); empty: the first checkpoint", ref="checkpoint")
    reference: str | None = key(None, "model for the sequence KL of each checkpoint's samples; empty: the "
                                      "baseline", ref="checkpoint")
    reward_model: str | None = key("auto", "reward model (a stage or a saved sequence-classification model) for "
                                           "scores and reward win rates; `auto`: the recipe's `reward` stage if it "
                                           "has one; empty: none", ref="checkpoint")
    prompts: str = key("world:eval", "prompts: text or conversational `prompt`, optional `answer` (reference) and "
                                     "`skill` (a world skill names its verifier)", ref="data")
    max_prompts: int | None = key(None, "evaluate at most this many prompts (the first ones); empty: all")
    perplexity_data: str | None = key("world:sft_eval", "held-out text for perplexity: `text` rows, or "
                                                        "conversations scored on assistant turns; empty: skip",
                                      ref="data")
    perplexity_max_rows: int = key(200, "perplexity on at most this many rows")
    max_new_tokens: int = key(48, "generation budget per reply")
    num_samples: int = key(4, "sampled replies per prompt besides the greedy one (pass@n, KL, diversity, "
                              "best-of-n); 0: none")
    temperature: float = key(1.0, "sampling temperature (the KL estimate needs 1.0)")
    top_p: float = key(1.0, "nucleus sampling (the KL estimate needs 1.0)")
    best_of_n: list[int] = key([1, 2, 4, 8, 16], "with a reward model: the reward model picks the best of n samples "
                                                 "for each n (up to num_samples); the pick's verifier accuracy, win "
                                                 "rate against the greedy reply and reward per n; empty: none")
    tool_prompts: str | None = key("auto", "held-out prompts for tool use, answered with the recipe's tools "
                                           "(pipeline/eval_tools.py): `prompt`, optional `tools`, and `kind` / "
                                           "`expect` of the world's tool tasks to verify them; `auto`: "
                                           "world:tool_eval when the recipe has tools; empty: none", ref="data")
    tool_max_prompts: int | None = key(None, "evaluate at most this many tool prompts (the first ones); empty: all")
    max_tool_calls: int = key(2, "tool calls per rollout; a call past them is not run and ends the rollout")
    tool_max_new_tokens: int = key(96, "generation budget per assistant turn of a tool rollout")
    tool_max_total_tokens: int = key(384, "budget of a whole tool rollout, tool results included")
    tool_samples: int = key(1, "rollouts per tool prompt sampled at temperature 1 for the KL to `reference` "
                               "(policy tokens only); 0: no KL on tool prompts")
    batch_size: int = key(64, "prompts per generation batch and sequences per scoring batch")
    seed: int | None = key(None, "sampling and bootstrap seed; empty: run.seed")
    bootstrap: int = key(1000, "bootstrap resamples for the 95% confidence intervals")
    reuse: bool = key(True, "read a checkpoint's replies and tool rollouts from their records in eval's folder (an "
                            "earlier evaluation with the same inputs: pipeline/eval_records.py) instead of generating "
                            "them again")
    report_examples: int = key(6, "prompts shown with every checkpoint's reply side by side in report.md")
    report_to: str | list[str] = key("none", "trackers that also get each checkpoint's metrics: tensorboard, "
                                             "wandb, mlflow, trackio (whichever are installed)")

    def fill_defaults(self, recipe) -> None:
        """Resolve the recipe-dependent defaults, so the runner orders and fingerprints eval after what it reads."""
        given = bool(self.checkpoints)
        if not self.checkpoints:
            self.checkpoints = [s for s in recipe.stages if s not in NON_POLICY_STAGES]
        if not self.baseline and self.checkpoints:
            self.baseline = self.checkpoints[0]
        if not self.reference:
            self.reference = self.baseline
        if self.reward_model == "auto":  # with checkpoints named by hand, only a reward stage that has finished
            finished = (recipe.stage_dir("reward") / "manifest.json").is_file()  # (or, see waits_for, will have)
            self.reward_model = "reward" if "reward" in recipe.stages and (finished or not given) else None
        if not self.perplexity_data:
            self.perplexity_data = None
        if self.tool_prompts == "auto":
            self.tool_prompts = "world:tool_eval" if recipe.tools.tools else None
        elif not self.tool_prompts:
            self.tool_prompts = None

    def waits_for(self, recipe) -> list[str]:
        """Stages the runner finishes first when it runs them too, though this one reads them only once finished:
        `reward_model: auto` with checkpoints named by hand takes the recipe's reward stage when it has finished."""
        auto = recipe.section("eval").get("reward_model", "auto") == "auto"
        return ["reward"] if auto and "reward" in recipe.stages else []


@dataclass
class TrainingKeys:
    """Pipeline keys of every stage whose config class has per_device_train_batch_size and
    gradient_accumulation_steps (the Trainer stages); see pipeline/cluster.py."""

    global_batch_size: int | None = key(None, "examples per optimizer step over all processes (processes x "
                                              "per_device_train_batch_size x gradient_accumulation_steps); "
                                              "without gradient_accumulation_steps the accumulation is derived "
                                              "from the number of processes; empty: not checked")


@dataclass
class ImageHeldoutKeys:
    """The image stages' evaluation: held-out captions drawn at the end and read by the image judge."""

    heldout_captions: str | None = key("images:digits", "captions drawn at the end and scored by the image judge: "
                                                        "`images:digits` (the world's 20 held-out captions) or a "
                                                        "file of `caption` rows in the world's words; without a "
                                                        "judge (diffusion's judge_epochs: 0) a file's captions in "
                                                        "any words are drawn unscored; empty: skip",
                                       ref="data", out_at_default=True)
    heldout_samples: int = key(16, "images drawn per held-out caption")
    sample_steps: int = key(20, "sampler steps per image at the end (and for DPO's candidates unless "
                                "`candidate_steps` is set)")
    guidance_scale: float = key(4.0, "classifier-free guidance scale at the end (and for DPO's candidates)")
    grid_columns: int = key(8, "samples per caption in grid.png")


@dataclass
class DiffusionKeys(ImageHeldoutKeys):
    pretrained: str | None = key(None, "a diffusers text-to-image pipeline to fine-tune (a stage, a folder or a hub "
                                       "id; its UNet conditioned on the text alone: SD 1.x / 2.x, IF); empty: a new "
                                       "pixel-space pipeline from `unet` and `text_encoder`",
                                 ref="checkpoint")
    dataset: str = key("images:digits", "images with captions: `images:digits` (the offline digit world), a "
                                        "metadata .jsonl / .csv / .parquet file, or a folder holding one, of "
                                        "`file_name`, `caption` rows, or a hub dataset id (diffusers' --dataset_name)",
                       ref="data")
    image_column: str | None = key(None, "the metadata file's column naming each image file (as diffusers' "
                                         "--image_column); empty: `file_name` or `image`")
    caption_column: str | None = key(None, "the metadata file's caption column (as diffusers' --caption_column); "
                                           "empty: `caption` or `text`")
    resolution: int = key(16, "image side of a new model (its UNet's sample_size); set with `pretrained`: the side "
                              "it trains at (unset: the pipeline's own)")
    judge_epochs: int | None = key(None, "passes of the image judge over the world's real training digits (each "
                                         "under a random property combination); 0: no judge and no evaluation; "
                                         "empty: 24 with `images:digits`, 0 with your own images")

    def __post_init__(self):  # the judge and the held-out captions know only the digit world
        if self.judge_epochs is None:
            self.judge_epochs = 24 if self.dataset == "images:digits" else 0


@dataclass
class DiffusionDPOKeys(ImageHeldoutKeys):
    init_from: str = key("diffusion", "the image model to tune, also the frozen reference (a stage, a folder or a "
                                      "hub id)", ref="checkpoint")
    judge: str | None = key(None, "folder of the image judge (config.json, model.safetensors) that the simulated "
                                  "annotator and the held-out captions' evaluation read; empty: `judge/` inside "
                                  "init_from", ref="checkpoint")
    dataset: str = key("images:digits", "captions the start model draws candidates for (`images:digits`: the world's "
                                        "60 training captions, or a file of `caption` rows), or preference pairs of "
                                        "your own: a metadata file or folder, or a hub dataset id, of `caption`, "
                                        "`jpg_0`, `jpg_1`, `label_0` rows (Pick-a-Pic) or `caption`, `chosen`, "
                                        "`rejected`", ref="data")
    eval_dataset: str | None = key(None, "held-out preference pairs (a pairs `dataset`'s layouts): the share the "
                                         "tuned model prefers as labelled (Diffusion-DPO's implicit accuracy)",
                                   ref="data")


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str                 # the stage's script module, run as `python -m` or by path
    config_class: str | None    # "package:Class" whose fields the section accepts
    keys: type                  # dataclass of pipeline keys
    peft: bool = False          # accepts TRL ModelConfig's LoRA/quantization fields
    default_init: tuple[str, ...] = ()  # init_from when empty: first of these that is a stage of the recipe
    check: str | None = None    # "module:function" that `--check` calls instead of its causal-LM check
    runs_tools: bool = False    # runs the recipe's tools: their settings and the stages they load are its inputs

    @property
    def script(self) -> Path:
        """pipeline/<stage>.py, what `run.py` runs and Slurm jobs launch."""
        return Path(__file__).resolve().parent / f"{self.module.rsplit('.', 1)[-1]}.py"


STAGES: dict[str, StageSpec] = {
    "pretrain": StageSpec("pretrain", "pipeline.pretrain", "transformers:TrainingArguments", PretrainKeys),
    "sft": StageSpec("sft", "pipeline.sft", "trl:SFTConfig", SFTKeys, peft=True,
                     default_init=("pretrain", "model")),
    "dpo": StageSpec("dpo", "pipeline.dpo", "trl:DPOConfig", DPOKeys, peft=True,
                     default_init=("sft", "pretrain", "model")),
    "kto": StageSpec("kto", "pipeline.kto", "trl:KTOConfig", KTOKeys, peft=True,
                     default_init=("sft", "pretrain", "model")),
    "reward": StageSpec("reward", "pipeline.reward", "trl:RewardConfig", RewardKeys, peft=True,
                        default_init=("sft", "pretrain", "model")),
    "ppo": StageSpec("ppo", "pipeline.ppo", "pipeline.ppo_config:PPOConfig", PPOKeys, peft=True,
                     default_init=("sft", "pretrain", "model"), runs_tools=True),
    "eval": StageSpec("eval", "pipeline.evaluate", None, EvalKeys, runs_tools=True),
    "diffusion": StageSpec("diffusion", "pipeline.diffusion", "pipeline.diffusion_config:DiffusionConfig",
                           DiffusionKeys, check="pipeline.image_check:check_image_stage"),
    "diffusion_dpo": StageSpec("diffusion_dpo", "pipeline.diffusion_dpo",
                               "pipeline.diffusion_config:DiffusionDPOConfig", DiffusionDPOKeys,
                               check="pipeline.image_check:check_image_stage"),
}


def tool_sources(recipe, stage: str) -> dict[str, str]:
    """{input name: stage, folder or hub id} the recipe's tools load, for a stage that runs them (ppo, eval): the image
    model and judge folders ("tools.draw_image": "diffusion"); ppo's image judge is its own key."""
    if not (STAGES[stage].runs_tools and recipe.tools.tools):
        return {}
    from pipeline.tools import stage_sources

    own_judge = "image_judge" in {f.name for f in fields(STAGES[stage].keys)}  # ppo: a key of its own
    return {k: v for k, v in stage_sources(recipe.tools).items() if not (k == "image_judge" and own_judge)}


def model_loading(recipe, stage: str) -> dict:
    """How a language-model stage loads its checkpoint and tokenizer (`tokenizer.chat_template`, `model.dtype`,
    `model.attn_implementation`), for its fingerprint: a stage from a folder reruns when they change. Only the values
    that differ from the defaults, so runs from before the key keep their fingerprints."""
    if stage.startswith("diffusion"):
        return {}
    values = {"chat_template": (recipe.tokenizer.chat_template, "pipeline"), "dtype": (recipe.model.dtype, "float32"),
              "attn_implementation": (recipe.model.attn_implementation, None)}
    return {key: value for key, (value, default) in values.items() if value != default}
