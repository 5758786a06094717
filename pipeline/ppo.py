"""Stage 4b, ppo: online RL against the reward model: our own actor-critic PPO, or GRPO / RLOO through TRL.

    accelerate launch pipeline/ppo.py recipes/small.yaml [ppo.max_steps=100 ppo.kl_coef=0.05 ...]
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        pipeline/ppo.py recipes/small.yaml ppo.max_steps=4          # two processes on CPU (gloo)
    python pipeline/ppo.py recipes/small.yaml ppo.algorithm=grpo    # TRL's GRPOTrainer (rloo: RLOOTrainer)

One PPO step (InstructGPT's step 3, Ziegler et al. 2019): each process takes `batch_size` prompts, samples one reply
per prompt (or `num_generations` to each of `batch_size` / `num_generations` prompts) from the policy (KV cache, left
padding, stops at end-of-turn), scores the replies with the reward model (normalised with the
reward_mean/reward_std its stage stored; minus `missing_eos_penalty` for replies that ran out of tokens), adds a
per-token KL penalty against the frozen reference (the starting checkpoint, or the policy with its LoRA adapter
off), computes GAE advantages with the critic's values, and runs `ppo_epochs` epochs of clipped policy and value
updates over `num_minibatches` minibatches. The math lives in pipeline/rl.py. The critic is a value head on a copy
of the reward model (`critic_init: reward`) or of the policy (`critic_init: policy`). Without a critic
(`advantage_estimator`: REINFORCE++'s `reinforce`, or `reinforce_baseline` / `rloo` / `group_norm` over
`num_generations` replies per prompt) the advantage is the return-to-go of the same per-token rewards.

Every `save_steps` steps the policy, critic, optimizers, schedulers, KL coefficient, prompt position, random states,
step counter and history go into `checkpoint-N/`; a killed run resumes from the newest one when run again with the
same inputs. The loop is pipeline/ppo_trainer.py (phases rollout -> score -> advantages -> update -> log/checkpoint,
the math in pipeline/rl.py), GRPO/RLOO pipeline/trl_online.py, the reward model pipeline/reward_model.py. Section
keys: PPOConfig (pipeline/ppo_config.py), PPOKeys (pipeline/stages.py) and TRL ModelConfig's LoRA fields.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, never shadow libraries with our modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import math

from pipeline import cli, data, log, models, monitors, ppo_models, preferences, reward_rounds, runs, vllm_engine
from pipeline.heldout import heldout_comparison, heldout_rows
from pipeline.judges import with_answers
from pipeline.key_checks import source_of
from pipeline.ppo_config import check_key_conflicts
from pipeline.ppo_tools import check_offers
from pipeline.ppo_trainer import PPOTrainer
from pipeline.reward_model import check_reads, checkpoint_head, offered_tools, refuse_causal_head
from pipeline.recipe import load_recipe, stage_help
from pipeline.trl_online import train_trl

STAGE = "ppo"
USAGE = "usage: pipeline/ppo.py RECIPE [ppo.KEY=VALUE ...]"


# ---------------------------------------------------------------------------------------------- prompts


def load_prompts(spec, recipe, columns: dict | None = None, pairs: bool = False):
    """The `prompt` column (with `skill`/`answer`, and a tool task's `tools`/`kind`/`expect`, when present) of a
    prompt dataset or of preference pairs in any format preferences.load_preferences reads (pairs without a prompt
    column: the shared beginning of chosen/rejected). pairs: keep the pairs' `chosen`/`rejected` too (replayed by
    reward rounds)."""
    return read_prompts(spec, recipe, columns, pairs)[0]


def read_prompts(spec, recipe, columns: dict | None = None, pairs: bool = False, places: bool = False) -> tuple:
    """(load_prompts' dataset, what was read for the manifest: {source, rows, format}), with `places` also where each
    row is from (the rows are reordered: prompts first). The spec is read once; each dataset of a list is prompts or
    pairs by its own first row (preferences.prompt_rows, which `--check` runs too)."""
    from pipeline.formats import rename_columns

    rows, where, source, part_of = data.read_rows_by_part(spec, recipe)
    rows, where, fmt = preferences.prompt_rows(rename_columns(rows, columns, source, where), where, source, part_of,
                                               pairs)
    ds = data.dataset_of(rows, source, where)
    return (ds, {"source": data.spec_name(spec), "rows": len(ds), "format": fmt}) + ((where,) if places else ())


# ---------------------------------------------------------------------------------------------- results


def summarise(history: list[dict], algorithm: str) -> dict:
    """Start/end means (over the first and last 10% of steps) of the curves a person looks at first."""
    n = max(1, len(history) // 10)

    def mean(rows, key):
        vals = [r[key] for r in rows if r.get(key) is not None and not math.isnan(r[key])]
        return sum(vals) / len(vals) if vals else None

    out = {"algorithm": algorithm, "steps": history[-1]["step"] if history else 0}
    for key in ("reward_raw", "reward", "implicit_reward", "kl", "kl_per_token", "verifier", "annotator_vs_start",
                "image_verifier", "tool_call_rate", "valid_call_rate", "distinct_2", "reply_length", "ended"):
        start, end = mean(history[:n], key), mean(history[-n:], key)
        if start is not None:
            out[f"{key}_start"], out[f"{key}_end"] = start, end
    return out


def plot_curves(history: list[dict], path: Path, algorithm: str, window: int) -> None:
    """Reward and KL per step, and the proxy reward and the gold score against KL (moving means over `window` rows:
    over-optimisation shows as the gold curve turning down while the proxy still climbs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps = [r["step"] for r in history]
    fig, (ax_r, ax_k, ax_g) = plt.subplots(1, 3, figsize=(15, 3.8))
    for key, label in (("reward", "reward (normalised)"), ("reward_raw", "reward (raw)"),
                       ("implicit_reward", "implicit reward (DPO policy)"), ("verifier", "verifier"),
                       ("image_verifier", "image verifier (tool tasks)")):
        if any(r.get(key) is not None for r in history):
            ax_r.plot(steps, [r.get(key) for r in history], label=label)
    logged = [r for r in history if r.get("annotator_vs_start") is not None]  # logged steps only
    if logged:
        ax_r.plot([r["step"] for r in logged], [r["annotator_vs_start"] for r in logged], "o-", ms=3,
                  label="annotator: win rate vs start")
    ax_r.set(xlabel="step", title=f"{algorithm}: reward", ylabel="mean per reply")
    ax_r.legend()
    kl_key, per = ("kl", "reply") if any(r.get("kl") is not None for r in history) else ("kl_per_token", "token")
    ax_k.plot(steps, [r.get(kl_key) for r in history], color="tab:red")
    ax_k.set(xlabel="step", title="KL to the reference", ylabel=f"nats per {per}")
    if any("kl_coef" in r for r in history):
        ax_c = ax_k.twinx()
        ax_c.plot(steps, [r.get("kl_coef") for r in history], color="tab:gray", ls="--")
        ax_c.set_ylabel("KL coefficient (dashed)")

    rows = [r for r in history if r.get(kl_key) is not None and r.get("reward") is not None]
    if rows:
        w = min(window, len(rows))

        def moving(key):
            return np.convolve([r[key] for r in rows], np.ones(w) / w, mode="valid")

        kl = moving(kl_key)
        ax_g.plot(kl, moving("reward"), color="tab:blue", label="proxy: reward model (normalised)")
        ax_g.set(xlabel=f"KL to the reference (nats per {per})", ylabel="proxy reward",
                 title=f"proxy and gold against KL (means over {w} rows)")
        if all(r.get("verifier") is not None for r in rows):
            ax_gold = ax_g.twinx()
            ax_gold.plot(kl, moving("verifier"), color="tab:green", label="gold: verifier accuracy")
            if logged:
                ax_gold.plot([r[kl_key] for r in logged], [r["annotator_vs_start"] for r in logged], "o", ms=3,
                             color="tab:olive", label="gold: annotator win rate vs start (logged steps)")
            ax_gold.set_ylabel("gold: verifier accuracy (green)")
            ax_gold.legend(loc="lower right", fontsize=8)
        ax_g.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_keys(recipe, cfg, keys, prompts) -> None:
    """Weights that would reward nothing, tools the recipe does not have, tools with a trainer that cannot run ours,
    reward rounds without prompts the annotator can judge: one line each, before anything is written."""
    offers = check_offers(prompts, recipe.tools.names, keys.prompts) if recipe.tools.tools else \
        (prompts["tools"] if "tools" in prompts.column_names else [])
    if cfg.verifier_weight and "answer" not in prompts.column_names:
        raise cli.PipelineError(f"{keys.prompts}: ppo.verifier_weight needs prompts with answers; these are tool "
                                f"tasks only (their gold score is image_verifier_weight's)")
    if cfg.image_verifier_weight and not any(offers):  # the tools section: check_key_conflicts
        raise cli.PipelineError(f"{keys.prompts}: ppo.image_verifier_weight rewards tool tasks: none of these prompts "
                                f"offers tools (a `tools` column, e.g. world:tool_preference)")
    if cfg.reward_rounds > 1 and not reward_rounds.annotated_rows(prompts):
        raise cli.PipelineError(f"{keys.prompts}: ppo.reward_rounds needs prompts the world's annotator can judge "
                                f"(world problems: a world skill with its answer) to label fresh samples; none is")
    if cfg.reward_rounds > 1 and cfg.reward_round_replay and not reward_rounds.replayable(prompts):
        raise cli.PipelineError(f"{keys.prompts}: ppo.reward_round_replay replays the prompt data's preference pairs; "
                                f"these prompts have no chosen/rejected (use preference data, or replay 0)")
    if cfg.algorithm != "ppo" and recipe.tools.tools and any(offers):
        from pipeline.trl_tools import check_grpo_tools

        check_grpo_tools(recipe, cfg, keys, prompts)


def check_implicit_reward(recipe, init, implicit) -> None:
    """DPO's implicit reward is beta log pi_dpo/pi_ref with pi_ref the model DPO started from: PPO's reference (its
    init_from) must be that model. A folder that is no stage of ours says nothing of its start: taken as given."""
    started = runs.trained_from(implicit.path)
    init_path = init.path if init.source == "hub" or init.path is None else str(Path(init.path).resolve())
    if started is not None and init_path is not None and started != init_path:
        raise cli.PipelineError(f"{source_of(recipe, STAGE, 'implicit_reward', 'init_from')}: ppo.implicit_reward "
                                f"`{implicit.ref}` was tuned from {started}, but ppo starts from {init.path}: its "
                                f"implicit reward is measured against the model it started from, so set ppo.init_from "
                                f"to that model")


def train_ppo(recipe, run, cfg, keys, peft_values, prompts, init, reward_checkpoints, implicit=None,
              tokenizer=None) -> list[dict]:
    trainer = PPOTrainer(recipe, run, cfg, keys, peft_values, prompts, init, reward_checkpoints, implicit, tokenizer)
    history = trainer.train()
    trainer.save()
    return history


def main(argv):
    recipe = load_recipe(*cli.split_stage_args(argv, USAGE, lambda: stage_help(STAGE)))
    recipe.check_config(STAGE, portable=True)  # the config class's own checks before upstream stages
    keys, cfg, peft_values = recipe.keys(STAGE), recipe.trainer_config(STAGE), recipe.peft_values(STAGE)
    vllm_engine.check(recipe, server_ok=cfg.algorithm != "ppo")  # TRL's trainers can also use a vLLM server
    if cfg.algorithm == "ppo":
        ppo_models.on_cpu(cfg)  # use_cpu under a DeepSpeed launch: one line, before anything is written
    check_key_conflicts(recipe, cfg, keys)  # also the runner's and --check's, before any stage starts
    with runs.StageRun(recipe, STAGE) as run:
        prompts, info, places = read_prompts(keys.prompts, recipe, keys.columns, pairs=cfg.reward_round_replay > 0,
                                             places=True)
        run.note_data("prompts", info)
        prompts = with_answers(prompts, data.spec_name(keys.prompts), required=bool(cfg.verifier_weight),
                               places=places)
        check_keys(recipe, cfg, keys, prompts)
        data.warn_world_eval(recipe, STAGE, keys)
        heldout = heldout_rows(recipe, keys)
        init = run.checkpoint()
        reward_checkpoints = [run.checkpoint("reward_model"), *run.checkpoints("reward_ensemble")]
        for key, cp in zip(["reward_model"] + ["reward_ensemble"] * len(keys.reward_ensemble or []),
                           reward_checkpoints):
            if cp.path:
                refuse_causal_head(recipe, STAGE, key, cp, checkpoint_head(recipe, cp))
        if init.path is None:
            raise cli.PipelineError(f"{source_of(recipe, STAGE, 'init_from')}: ppo.init_from is a new model from "
                                    f"`model.config`; start PPO from a trained checkpoint (e.g. sft)")
        if cfg.algorithm != "ppo" and cfg.kl_coef and not peft_values.get("use_peft") \
                and models.is_adapter(models.model_path(init.path)):
            raise cli.PipelineError(f"{init.path}: a LoRA adapter saved without merge_adapter: ppo.algorithm "
                                    f"{cfg.algorithm} trains the whole model with TRL, which loads the KL reference "
                                    f"from the start model's folder and cannot read an adapter; save that stage with "
                                    f"merge_adapter: true, or set ppo.use_peft: true or ppo.kl_coef: 0")
        implicit = run.checkpoint("implicit_reward") if keys.implicit_reward else None
        if implicit is not None:
            check_implicit_reward(recipe, init, implicit)
        tokenizer = models.load_tokenizer(recipe, init)  # checked here, then the policy's
        models.check_chat_template(tokenizer, {data.spec_name(keys.prompts): (prompts, places)})  # a mixture: dict
        if recipe.tools.tools and "tools" in prompts.column_names and any(prompts["tools"]):
            models.check_tool_parser(tokenizer, f"{recipe.path}: ppo")
        check_reads(recipe, reward_checkpoints, prompts["prompt"], keys.prompts, "ppo.reward_model")
        run.prepare()
        if not recipe.tools.tools and (offering := sum(o is not None for o in offered_tools(prompts))):
            log.warning("%s: %d prompts offer tools, but the recipe has no `tools` section: they are answered "
                        "without tools", keys.prompts, offering)

        config = cfg  # the manifest's settings; grpo/rloo: with TRL's whole config, its defaults included
        if cfg.algorithm == "ppo":
            history = train_ppo(recipe, run, cfg, keys, peft_values, prompts, init, reward_checkpoints, implicit,
                                tokenizer)
        else:
            history, trl = train_trl(recipe, run, cfg, keys, peft_values, prompts, init, reward_checkpoints,
                                     tokenizer)
            config = {**cfg.to_dict(), "trl": trl}

        metrics = summarise(history, cfg.algorithm)
        if heldout is not None and run.state.is_main_process:
            metrics.update(heldout_comparison(recipe, keys, heldout, ("start", init.path), (STAGE, str(run.out))))
        if cfg.reward_rounds > 1:
            metrics["reward_rounds"] = reward_rounds.records(run.out, cfg.reward_rounds)
        metrics["final"] = history[-1] if history else {}
        metrics["warnings"] = monitors.online_warnings(history, keys.monitor_window)
        metrics["history"] = history
        if run.state.is_main_process and history:
            plot_curves(history, run.out / "curves.png", cfg.algorithm, keys.monitor_window)
        run.finish(metrics, config=config, global_batch_size=cfg.batch_size * run.state.num_processes)


if __name__ == "__main__":
    cli.run_main(main)
