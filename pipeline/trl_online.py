"""GRPO and RLOO through TRL's GRPOTrainer / RLOOTrainer, for the ppo stage's `algorithm: grpo | rloo`.

The same prompts and the same reward as our PPO (pipeline/ppo_trainer.py): the reward model scored through
pipeline/reward_model.py and normalised with its stage's statistics, the missing-eos penalty, and optionally the
world's verifier as a second reward function with `verifier_weight`. Whenever the prompts have answers the
verifier's accuracy on the rollouts is logged as the gold score (never rewarded without `verifier_weight`), with the
replies' distinct-1/2; pipeline/monitors.py's rules read the logged history and warn. Returns the per-step history in
ppo's names.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline import cli, cluster, judges, log, metrics, models, monitors, vllm_engine
from pipeline.formats import as_messages
from pipeline.generation import config_context, prompt_ids, stop_ids, unshaped
from pipeline.key_checks import choice_problem, source_of
from pipeline.model_configs import checkpoint_config
from pipeline.ppo_config import prompts_that_fit
from pipeline.reward_model import RewardEnsemble, RewardModel, load_scorer, offered_tools
from pipeline.trl_refusals import trl_refusal
from pipeline.values import by_new_names


# TRL's logged names -> ours ("reward" is TRL's weighted sum of the reward functions: our `score`; TRL's "kl" is a
# mean per token, ours a mean per reply)
TRL_NAMES = {"reward": "score", "reward_raw": "reward_raw", "reward_normalised": "reward", "ended": "ended",
             "verifier": "verifier", "distinct_1": "distinct_1", "distinct_2": "distinct_2",
             "kl": "kl_per_token", "entropy": "entropy",
             "completions/mean_length": "reply_length", "clip_ratio/region_mean": "clipfrac", "loss": "policy_loss",
             "learning_rate": "lr", **{k: k for k in ("tool_call_rate", "tool_calls", "valid_call_rate",
                                                       "tool_error_rate", "image_verifier")}}


def reply_texts(completions) -> list[str]:
    return [c[-1]["content"] if isinstance(c, list) else c for c in completions]


def log_rollout_statistics(texts, log_metric, skill=None, answer=None) -> None:
    """What a step's replies say beyond their reward: the gold score (the verifier's accuracy, when the prompts have
    skills and answers) and their diversity (distinct-1/2 over the step's replies on this process; no n-gram at all: 0)."""
    if skill is not None and answer is not None:
        scores = [s for s in judges.verifier_scores(skill, answer, texts) if s is not None]
        if scores:
            log_metric("verifier", sum(scores) / len(scores))
    for n in (1, 2):
        log_metric(f"distinct_{n}", metrics.distinct_n(texts, n) or 0.0)


TEXT_PROMPT = "text_prompt"  # a text prompt as given, beside the user turn TRL's policy is given (train_trl)


def reward_function(reward_model: RewardModel | RewardEnsemble, stops: list[int], missing_eos_penalty: float | None,
                    tools=None, clip: float | None = None):
    """The reward model as a TRL reward function: the same score as our PPO gives a reply (RewardModel.policy_scores),
    its raw and normalised means logged, and the rollout statistics (log_rollout_statistics), which never change the
    score. With tools (a pipeline/trl_tools.TRLTools) the reward model reads the whole completion with the tools, and
    the tool statistics and the tool tasks' gold score are logged."""

    def reward_model_score(prompts, completions, completion_ids, log_metric, skill=None, answer=None, **columns):
        prompts = columns.get(TEXT_PROMPT) or prompts  # as our PPO scores them: the text, as_trained's to render
        texts = reply_texts(completions)
        ended = torch.tensor([len(ids) > 0 and ids[-1] in stops for ids in completion_ids])  # generation.stop_ids
        replies, schemas = (texts, None) if tools is None else (completions, [list(tools.tools)] * len(texts))
        raw, normalised, scores = reward_model.policy_scores(prompts, replies, ended, missing_eos_penalty,
                                                             tools=schemas, clip=clip)
        log_metric("reward_raw", raw.mean().item())
        log_metric("reward_normalised", normalised.mean().item())
        log_metric("ended", ended.float().mean().item())
        log_rollout_statistics(texts, log_metric, skill, answer)
        if tools is not None:
            tools.log_statistics(prompts, completions, log_metric,
                                 **{k: columns.get(k) for k in ("kind", "expect", "tools")})
        return scores.tolist()

    return reward_model_score


def within_prompt_length(prompts, tokenizer, cfg, spec: str, tools: bool, num_processes: int, reply_tokens: int,
                         context: int | None):
    """The prompts our PPO keeps (ppo_config.prompts_that_fit: max_prompt_length, and room for a reply of
    reply_tokens, TRL's max_completion_length, in the policy's context), rendered with their tools when tools run:
    TRL 1.x has no max_prompt_length and fed every prompt whole. Fewer than one step's prompts: an error."""
    offers = offered_tools(prompts) if tools else [None] * len(prompts)
    lengths = [len(prompt_ids(tokenizer, p, t)) for p, t in zip(prompts["prompt"], offers)]
    keep, rule = prompts_that_fit(lengths, [reply_tokens] * len(lengths), cfg, context)
    needed = max(1, cfg.batch_size * num_processes // cfg.num_generations)
    if len(keep) < needed:
        raise cli.PipelineError(f"{spec}: {len(keep)} of its {len(prompts)} prompts within {rule}, fewer than one "
                                f"step's {needed} ({cfg.batch_size} replies x {num_processes} processes / "
                                f"num_generations {cfg.num_generations})")
    if len(keep) < len(prompts):
        log.info(f"{spec}: {len(prompts) - len(keep)} of {len(prompts)} prompts not within {rule}: left out")
    return prompts if len(keep) == len(prompts) else prompts.select(keep)


def policy_context(recipe, path: str, tokenizer) -> int | None:
    """generation.context_length of the policy at `path` (an adapter: its base's) from its config alone, so the
    prompts are checked before its weights load. None where the config cannot be read: loading the model says why."""
    config = checkpoint_config(recipe, path, recipe.model.revision)
    return None if config is None else config_context(config, tokenizer)


def history_of(log_history: list[dict]) -> list[dict]:
    """TRL's log entries of steps that generated (with num_iterations > 1 the others reuse their replies), in ppo's
    names."""
    return [{"step": entry["step"], **{ours: entry[theirs] for theirs, ours in TRL_NAMES.items() if theirs in entry}}
            for entry in log_history if "reward" in entry]


def monitor_callback(window: int):
    """A TrainerCallback that runs pipeline/monitors.py's rules on the history logged so far and logs the warnings
    that are new at this step."""
    from transformers import TrainerCallback

    class Monitor(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            history = history_of(state.log_history)
            if state.is_world_process_zero and history and logs and "reward" in logs:
                for warning in monitors.new_warnings(history, window):
                    log.warning(warning["message"])

    return Monitor()


# ppo keys the pipeline maps to TRL's (trl_args may not set those again: which would win?), and what it owns
MAPPED = {"max_steps": "max_steps", "per_device_train_batch_size": "batch_size", "num_generations": "num_generations",
          "gradient_accumulation_steps": "gradient_accumulation_steps", "learning_rate": "learning_rate",
          "lr_scheduler_type": "lr_scheduler_type", "warmup_steps": "warmup_steps", "weight_decay": "weight_decay",
          "max_grad_norm": "max_grad_norm", "beta": "kl_coef", "epsilon": "cliprange",
          "max_completion_length": "max_new_tokens", "temperature": "temperature", "top_p": "top_p",
          "logging_steps": "logging_steps", "save_strategy": "save_steps", "save_steps": "save_steps",
          "save_total_limit": "save_total_limit", "seed": "seed", "use_cpu": "use_cpu", "report_to": "report_to"}
OWNED = {"output_dir": "the stage folder", "reward_weights": "ppo.verifier_weight and ppo.image_verifier_weight",
         "use_vllm": "generation.backend (vllm or hf)"}
def derived(trl_args: dict) -> dict[str, tuple[str, ...]]:
    """Names TRL's refusals give values it computes from recipe keys -> those keys (section.key), for a ppo section
    with these trl_args: a refusal that names one names an override of them, not of a key TRL did not read.
    GRPOConfig/RLOOConfig: generation_batch_size = per_device_train_batch_size x processes x steps_per_generation
    (otherwise gradient_accumulation_steps), or trl_args' own; steps_per_generation = generation_batch_size /
    (per_device_train_batch_size x processes) when trl_args gives that, or trl_args' own; the eval generations are
    num_generations_eval or num_generations (TRL's `or`). The trainers' vLLM engine (generation.backend: vllm,
    colocated): tensor_parallel_size, which must divide the processes, is vllm_tensor_parallel_size (trl_args wins).
    Also the words a refusal says an argument in instead of its name ("at least 2 generations per prompt")."""
    def given(key):
        return trl_args.get(key) is not None

    steps = "ppo.trl_args.steps_per_generation" if given("steps_per_generation") else "ppo.gradient_accumulation_steps"
    if given("steps_per_generation"):
        steps_from = ()
    elif given("generation_batch_size"):
        steps_from = ("ppo.batch_size", "ppo.trl_args.generation_batch_size")
    else:
        steps_from = ("ppo.gradient_accumulation_steps",)
    return {"generation_batch_size": () if given("generation_batch_size") else ("ppo.batch_size", steps),
            "steps_per_generation": steps_from,
            "global batch size": ("ppo.batch_size",),
            "tensor_parallel_size": ("generation.vllm_tensor_parallel_size",
                                     "ppo.trl_args.vllm_tensor_parallel_size"),
            "generations per prompt": ("ppo.num_generations",),
            "global eval batch size": ("ppo.trl_args.per_device_eval_batch_size",),
            "generations used for evaluation": ("ppo.trl_args.num_generations_eval"
                                                if trl_args.get("num_generations_eval") else "ppo.num_generations",)}


def trl_config(recipe, cfg, output_dir: str, tools: bool = False):
    """(GRPOConfig or RLOOConfig, the reward functions' names) of the ppo section: the mapped keys (train_trl),
    trl_args for the rest. The stage builds it, and the runner's checks and --check before any stage starts."""
    from trl import GRPOConfig, RLOOConfig

    config_cls = GRPOConfig if cfg.algorithm == "grpo" else RLOOConfig
    for key, value in cfg.trl_args.items():
        where = f"{source_of(recipe, 'ppo', f'trl_args.{key}')}: section 'ppo' ({config_cls.__name__})"
        if key in MAPPED or key in OWNED:
            raise cli.PipelineError(f"{where}: trl_args.{key} is set by " +
                                    (f"ppo.{MAPPED[key]}: set that instead" if key in MAPPED else OWNED[key]))
        if problem := choice_problem(config_cls, key, value):  # TRL checks loss_type only at the first step
            raise cli.PipelineError(f"{where}: trl_args.{key}: {problem}")
    mapped = dict(
        output_dir=output_dir, max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        num_generations=cfg.num_generations, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler_type, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, beta=cfg.kl_coef, epsilon=cfg.cliprange,
        max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        logging_steps=cfg.logging_steps, save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500, save_total_limit=cfg.save_total_limit, seed=cfg.seed,
        use_cpu=cfg.use_cpu or not cluster.accelerator_here(), report_to=cfg.report_to, bf16=False,
        **vllm_engine.trl_args(recipe),  # generation.backend: vllm: TRL's own vLLM engine
        gradient_checkpointing=False,  # TRL defaults it on: slower on small models (trl_args may set either name)
    )
    if tools:
        mapped.update(max_completion_length=cfg.total_tokens(), max_tool_calling_iterations=cfg.max_tool_calls)
    funcs, weights = ["reward_model"], [1.0]
    if cfg.verifier_weight:
        funcs, weights = funcs + ["verifier"], weights + [cfg.verifier_weight]
    if cfg.image_verifier_weight:
        funcs, weights = funcs + ["image_verifier"], weights + [cfg.image_verifier_weight]
    try:
        config = config_cls(**by_new_names(config_cls, {**mapped, "reward_weights": weights, **cfg.trl_args}))
    except (ValueError, TypeError) as err:  # named by the override that set a key it names (TRL's names too)
        raise cli.PipelineError(trl_refusal(recipe, "ppo", config_cls.__name__, err, config_cls, MAPPED,
                                            derived(cfg.trl_args))) from None
    if problem := refused_in_training(config):
        key, text = problem
        raise cli.PipelineError(f"{source_of(recipe, 'ppo', f'trl_args.{key}')}: section 'ppo' "
                                f"({config_cls.__name__}): trl_args.{key}: {text}")
    return config, funcs


# GRPOConfig keys whose values GRPOTrainer checks only at the first step (GRPOConfig maps scale_rewards' true to
# group, false to none) -> the values its branches compute
TRAINING_CHOICES = {"scale_rewards": ("group", "batch", "none"), "importance_sampling_level": ("token", "sequence"),
                    "multi_objective_aggregation": ("sum_then_normalize", "normalize_then_sum")}


def refused_in_training(config) -> tuple[str, str] | None:
    """(trl_args key, problem) of what TRL refuses only once training has started: a traceback from a started stage,
    its folder left half-written."""
    from transformers.utils import is_liger_kernel_available

    if getattr(config, "use_liger_kernel", False) and not is_liger_kernel_available():
        return "use_liger_kernel", "needs liger-kernel >= 0.3.0 (pip install liger-kernel), which is not installed"
    for key, valid in TRAINING_CHOICES.items():
        value = getattr(config, key, valid[0])  # RLOOConfig has none of them
        if key == "scale_rewards" and getattr(config, "multi_objective_aggregation", None) == "normalize_then_sum":
            continue  # GRPOTrainer reads scale_rewards only when it sums before normalising
        if value not in valid:
            return key, f"'{value}' is not a {type(config).__name__} {key} (one of: {', '.join(valid)})"
    return None


def resumable(trainer_cls):
    """trainer_cls whose prompt order in epoch e is the same however the run got there. TRL's RepeatSampler shuffles
    every epoch with one generator seeded once, so a run resumed in a later epoch drew epoch 0's order again (and
    trained on other prompts than the uninterrupted run). The Trainer calls set_epoch(e) before each epoch (a resume
    too): the generator is seeded again and advanced past the e permutations drawn before."""

    def set_epoch(sampler, epoch: int) -> None:
        sampler.generator.manual_seed(sampler.seed)
        for _ in range(epoch):
            torch.randperm(sampler.num_samples, generator=sampler.generator)

    class Resumable(trainer_cls):
        def _get_train_sampler(self, *args, **kwargs):
            sampler = super()._get_train_sampler(*args, **kwargs)
            if getattr(sampler, "shuffle", False) and getattr(sampler, "seed", None) is not None:
                sampler.set_epoch = lambda epoch: set_epoch(sampler, epoch)
            return sampler

    Resumable.__name__ = trainer_cls.__name__
    return Resumable


def generation_in_checkpoints(users):
    """A callback giving each checkpoint TRL saves the user's generation_config (`users`): the policy's own holds
    neutral values while TRL trains (generation.unshaped), and a checkpoint is a model someone may load."""
    from transformers import TrainerCallback

    class UsersGeneration(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and (folder / "generation_config.json").is_file():
                users.save_pretrained(folder)

    return UsersGeneration()


def train_trl(recipe, run, cfg, keys, peft_values, prompts, init, reward_checkpoints,
              tokenizer=None) -> tuple[list[dict], dict]:
    """TRL's GRPOTrainer or RLOOTrainer on the same prompts, with the same reward (the normalised reward model,
    the missing-eos penalty, optionally the verifier). Returns the per-step history in ppo's names, and TRL's
    whole config (its defaults too: loss_type, scale_rewards, ...) for the manifest.

    Mapped keys: max_steps, batch_size (per_device_train_batch_size: replies per process, a multiple of
    num_generations across processes), num_generations, gradient_accumulation_steps, learning_rate,
    lr_scheduler_type, warmup_steps, weight_decay, max_grad_norm, kl_coef (beta), cliprange (epsilon),
    max_new_tokens (max_completion_length), temperature, top_p, logging_steps, save_steps, save_total_limit, seed.
    Anything else of GRPOConfig / RLOOConfig goes in `trl_args` (e.g. {num_iterations: 2, scale_rewards: batch}).
    With tools (GRPO only): pipeline/trl_tools.py, max_total_tokens -> max_completion_length, max_tool_calls ->
    max_tool_calling_iterations, and image_verifier_weight weighs the tool tasks' gold score as a reward function.
    """
    from accelerate import PartialState
    from trl import GRPOTrainer, RLOOTrainer

    env = None
    if recipe.tools.tools and "tools" in prompts.column_names and any(prompts["tools"]):
        from pipeline.trl_tools import TRLTools, check_grpo_tools

        check_grpo_tools(recipe, cfg, keys, prompts)
        state = PartialState()
        env = TRLTools(recipe, cfg, keys, prompts, folder=run.out, rank=state.process_index,
                       num_processes=state.num_processes)

    trainer_cls = resumable(GRPOTrainer if cfg.algorithm == "grpo" else RLOOTrainer)
    args, funcs = trl_config(recipe, cfg, str(run.out), tools=env is not None)

    tokenizer = tokenizer or models.load_tokenizer(recipe, init)  # the stage's, if it checked one
    prompts = within_prompt_length(prompts, tokenizer, cfg, keys.prompts, env is not None,
                                   PartialState().num_processes, args.max_completion_length,
                                   policy_context(recipe, init.path, tokenizer))  # before the weights load
    model = models.load_causal_lm(recipe, init.path, peft_values=peft_values, revision=recipe.model.revision,
                                  tokenizer=tokenizer)
    if len(prompts) and isinstance(prompts[0]["prompt"], str):  # the policy sees a user turn, as in our PPO and eval
        prompts = prompts.map(lambda row: {"prompt": as_messages(row["prompt"]), TEXT_PROMPT: row["prompt"]})
    models.configure_generation(model, tokenizer)  # before the trainer: TRL reads its stop list (rollouts, loss
    # mask) from the generation_config when it is built
    reward_model = load_scorer(recipe, reward_checkpoints, "cpu", cfg.ensemble_objective, cfg.uncertainty_penalty)
    stops = stop_ids(tokenizer, model)  # what TRL's generate stops at: configure_generation gave the model the list

    def verifier(prompts, completions, skill, answer, **_):  # None: a tool task, judged by image_verifier
        return judges.verifier_scores(skill, answer, reply_texts(completions))

    reward_funcs = {"reward_model": reward_function(reward_model, stops, cfg.missing_eos_penalty, env,
                                                    cfg.reward_clip),
                    "verifier": verifier, "image_verifier": env and env.image_verifier}
    lora = models.peft_config(peft_values, model=model, recipe=recipe, stage="ppo")
    try:  # what TRL checks only here (loss_type, ...): one line, not a traceback from a half-made stage
        trainer = trainer_cls(model=model, args=args, train_dataset=prompts,
                              reward_funcs=[reward_funcs[f] for f in funcs], processing_class=tokenizer,
                              peft_config=lora,
                              callbacks=[monitor_callback(keys.monitor_window)] + ([env.callback()] if env else []),
                              **({"tools": env.tools} if env else {}))
    except ValueError as err:
        if any(Path(run.out).glob("checkpoint-*")):  # one line would remove the folder: keep a killed run's steps
            raise
        raise cli.PipelineError(trl_refusal(recipe, "ppo", trainer_cls.__name__, err, type(args), MAPPED,
                                            derived(cfg.trl_args))) from None
    reward_model.to(trainer.accelerator.device)
    with unshaped(model) as users:  # TRL fills what its GenerationConfig leaves unset from the policy's (min_p, ...)
        trainer.add_callback(generation_in_checkpoints(users))
        trainer.train(resume_from_checkpoint=run.last_checkpoint())  # (TRL's deprecated read: log.setup hides it)
    models.save_trained(trainer, tokenizer, run.out, merge_adapter=keys.merge_adapter)

    return history_of(trainer.state.log_history), args.to_dict()
