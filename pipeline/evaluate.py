"""Stage eval: did each stage make the model better, and at what cost? Every checkpoint answers held-out prompts;
verifiers, a reward model and the world's annotator judge the replies; a report with plots says it at a glance.

    python pipeline/evaluate.py recipes/small.yaml [eval.checkpoints=[runs/small/sft,runs/small/pretrain]
                                                     eval.prompts=my_prompts.jsonl ...]

Checkpoints (`checkpoints`: stages of the recipe or paths to saved causal LMs, LoRA adapters included; default:
every model stage of the recipe) answer the prompts (`prompts`: the world's held-out prompts, or a JSONL / Parquet /
CSV file of text or conversational prompts with optional reference answers) with one greedy reply and `num_samples`
sampled ones, batched and left-padded with the KV cache and each checkpoint's own chat template, seeded.

Per checkpoint: verifier accuracy (overall, per skill, easy/hard), accuracy of the samples and pass@n; the reward
model's mean score; win rates against the `baseline` judged by the verifier, the reward model and the world's
annotator (the rule the preference data was labelled with, without noise); the sequence KL of the samples to the
`reference` model; reply length, the share of replies that end with end-of-turn, distinct-1/2, Self-BLEU and entropy
of the samples, and perplexity on held-out text; with a reward model, the best-of-n curve (the reward model's pick
among n samples: its accuracy, annotator win rate against the greedy reply, reward). Each checkpoint trained from
another evaluated one gets a collapse check (pipeline/monitors.py). Accuracy, rewards, win rates, KL and best-of-n
carry bootstrap 95% intervals over prompts. A metric that cannot be computed (no verifier, no reward model, samples
not at temperature 1) is absent, never zero. The numbers come from pipeline/eval_metrics.py.

With tools (`tool_prompts`; by default world:tool_eval when the recipe has a `tools` section) every checkpoint also
answers held-out tool prompts with the recipe's tools: call and valid-call rates, execution errors, the world tasks'
correctness by the image judge and the KL to `reference` over the policy's own tokens (pipeline/eval_tools.py).

Outputs in runs/<run>/eval/: metrics.json, samples.jsonl (every prompt with every checkpoint's replies and scores),
report.md, and accuracy.png, win_rate.png, reward.png, best_of_n.png (each when its metric exists); with tools,
images/ (every image drawn, PNG) and tool_images.png.
Section keys: EvalKeys (pipeline/stages.py).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, never shadow libraries with our modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import dataclasses
import json
import time
from collections import Counter

import numpy as np

from pipeline import cli, data, eval_report, eval_tools, eval_tools_report, judges, log, models, runs, vllm_engine
from pipeline.eval_metrics import checkpoint_metrics, collapse_checks, outcomes, win_matrix
from pipeline.generation import generate, held_out_perplexity, reply_logprob_sums
from pipeline.recipe import load_recipe, stage_help
from pipeline.reward_model import RewardModel, check_reads, tools_of

STAGE = "eval"
USAGE = "usage: pipeline/evaluate.py RECIPE [eval.KEY=VALUE ...]"


@dataclasses.dataclass
class Target:
    """A checkpoint being evaluated and what it produced."""

    name: str
    checkpoint: runs.Checkpoint
    greedy: list = None           # one generation.Reply per prompt
    correct: list = None          # the verifier's verdict on each greedy reply (None: the prompt has none)
    samples: list = None          # num_samples Replies per prompt, or None
    sample_correct: list = None   # per prompt: the verifier's verdict on each sample (None: the prompt has none)
    sample_logprobs: np.ndarray = None  # (prompts, samples) log pi(y|x) of each sample (own-distribution samples)
    sample_rewards: np.ndarray = None   # (prompts, samples) reward-model score of each sample, or None
    log_ratios: list = None       # per prompt: log pi(y|x) - log ref(y|x) of each sample, or None
    perplexity: float = None      # on perplexity_data, or None
    perplexity_tokens: int = None  # tokens it was measured on
    rewards: list = None          # reward-model score of each greedy reply, or None
    parent: str | None = None     # path of the model it was trained from (its manifest), for the collapse check
    tokenizer: object = None      # loaded once for its checks, then used to evaluate it
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------- inputs


def check_keys(recipe, keys) -> None:
    rules = [("max_new_tokens", keys.max_new_tokens >= 1, "at least 1"),
             ("num_samples", keys.num_samples >= 0, "0 or more"),
             ("temperature", keys.temperature > 0, "positive"),
             ("top_p", 0 < keys.top_p <= 1, "in (0, 1]"),
             ("batch_size", keys.batch_size >= 1, "at least 1"),
             ("max_prompts", keys.max_prompts is None or keys.max_prompts >= 1, "at least 1 (or empty: all)"),
             ("perplexity_max_rows", keys.perplexity_max_rows >= 1, "at least 1"),
             ("bootstrap", keys.bootstrap >= 100, "at least 100"),
             ("report_examples", keys.report_examples >= 0, "0 or more"),
             ("tool_max_prompts", keys.tool_max_prompts is None or keys.tool_max_prompts >= 1,
              "at least 1 (or empty: all)"),
             ("max_tool_calls", keys.max_tool_calls >= 1, "at least 1"),
             ("tool_max_new_tokens", keys.tool_max_new_tokens >= 1, "at least 1"),
             ("tool_max_total_tokens", keys.tool_max_total_tokens >= keys.tool_max_new_tokens,
              "at least tool_max_new_tokens"),
             ("tool_samples", keys.tool_samples >= 0, "0 or more"),
             ("best_of_n", all(n >= 1 for n in keys.best_of_n), "a list of sample counts, each at least 1 "
                                                                  "(empty: no best-of-n)")]
    for name, ok, want in rules:
        if not ok:
            raise cli.PipelineError(f"{recipe.path}: eval.{name} must be {want}, got {getattr(keys, name)!r}")
    if not keys.checkpoints:
        raise cli.PipelineError(f"{recipe.path}: eval.checkpoints is empty and the recipe has no model stage "
                                f"to evaluate: name stages or model folders, e.g. eval.checkpoints=[runs/x/sft]")


def load_prompts(recipe, keys) -> list[dict]:
    rows, where, source = data.read_rows(keys.prompts, recipe)
    if keys.max_prompts:
        rows, where = rows[:keys.max_prompts], where[:keys.max_prompts]
    rows = data.CHECKS["eval_prompts"]([dict(r) for r in rows], where, source)
    for i, row in enumerate(rows):
        row["id"] = str(row.get("id") or f"prompt-{i + 1}")
    return rows


def load_perplexity_rows(recipe, keys) -> list[dict] | None:
    if not keys.perplexity_data:
        return None
    rows, where, source = data.read_rows(keys.perplexity_data, recipe)
    rows, where = rows[:keys.perplexity_max_rows], where[:keys.perplexity_max_rows]
    kind = "text" if "text" in rows[0] else "chat"
    return data.CHECKS[kind]([dict(r) for r in rows], where, source)


def check_model(recipe, cp: runs.Checkpoint, key: str, reward: bool = False) -> None:
    """Fail before anything is written when a checkpoint cannot be what `key` needs."""
    if cp.path is None:
        raise cli.PipelineError(f"{recipe.path}: eval.{key}: '{cp.ref}' is a new model built from `model.config`: "
                                f"nothing trained to evaluate")
    if cp.source == "hub":
        return
    folder = Path(models.model_path(cp.path))
    config, adapter = folder / "config.json", folder / "adapter_config.json"
    if not (config.is_file() or adapter.is_file()):
        raise cli.PipelineError(f"{cp.path}: eval.{key}: not a saved model (no config.json or adapter_config.json)")
    if config.is_file():
        archs = " ".join(json.loads(config.read_text()).get("architectures") or [])
        is_classifier = "ForSequenceClassification" in archs
    else:
        is_classifier = json.loads(adapter.read_text()).get("task_type") == "SEQ_CLS"
    if reward and not is_classifier:
        raise cli.PipelineError(f"{cp.path}: eval.{key}: not a reward model (a sequence-classification model, "
                                f"e.g. the reward stage)")
    if not reward and is_classifier:
        raise cli.PipelineError(f"{cp.path}: eval.{key}: a reward model, not a causal LM that can answer prompts")


def targets_of(recipe, run, keys) -> tuple[list[Target], str]:
    """The checkpoints to evaluate, in report order (the baseline first if `checkpoints` does not list it), and the
    baseline's name."""
    targets = [Target(d["ref"], runs.usable(recipe, d)) for d in run.inputs["checkpoints"]["checkpoints"]]
    by_path = {}
    for t in targets:
        check_model(recipe, t.checkpoint, "checkpoints")
        if t.checkpoint.path in by_path:
            raise cli.PipelineError(f"{recipe.path}: eval.checkpoints: '{by_path[t.checkpoint.path]}' and "
                                    f"'{t.name}' are the same model")
        by_path[t.checkpoint.path] = t.name
    base = run.checkpoint("baseline")
    if base.path not in by_path:
        check_model(recipe, base, "baseline")
        targets.insert(0, Target(keys.baseline, base))
    names = display_names(recipe, [t.checkpoint for t in targets])
    for t in targets:
        t.name = names[t.checkpoint.path]
    return targets, names[base.path]


def display_names(recipe, checkpoints) -> dict[str, str]:
    """Path -> the name a checkpoint goes by in the report: a stage or hub id as written, a folder by the shortest
    tail of its path (at least two parts, e.g. `small/sft`) that no other checkpoint shares."""
    names = {cp.path: cp.ref for cp in checkpoints if cp.source != "local"}
    folders = [cp for cp in checkpoints if cp.source == "local"]
    for cp in folders:
        parts = Path(cp.path).parts
        for k in range(min(2, len(parts)), len(parts) + 1):
            name = "/".join(parts[-k:])
            clash = [o for o in folders if o is not cp and Path(o.path).parts[-k:] == parts[-k:]]
            if not clash and name not in names.values():
                break
        else:
            name = cp.path
        names[cp.path] = name
    return names


# ---------------------------------------------------------------------------------------------- models at work


@dataclasses.dataclass
class LoadedModel:
    """A causal LM ready to generate, with its tokenizer and the folder it came from."""

    model: object
    tokenizer: object
    path: str


def load_lm(recipe, cp: runs.Checkpoint, device, tokenizer=None) -> LoadedModel:
    """The checkpoint's model and tokenizer (`tokenizer`: the one already loaded for its checks, else loaded)."""
    tokenizer = tokenizer or models.load_tokenizer(recipe, cp)
    model = models.load_causal_lm(recipe, cp.path, revision=recipe.model.revision if cp.source == "hub" else None,
                                  tokenizer=tokenizer)  # a user's model: the chat tokens its tokenizer got
    models.configure_generation(model, tokenizer)
    return LoadedModel(model.to(device).eval(), tokenizer, cp.path)


def run_checkpoint(recipe, keys, target: Target, rows, ppl_rows, reference: LoadedModel | None, own_samples: bool,
                   seed, device, tools=None, engines: vllm_engine.EvalEngines | None = None) -> None:
    """Generate greedy and sampled replies and judge them, score own-distribution samples (`own_samples`) under the
    policy (entropy) and the reference (loaded when the sequence KL applies, else None), perplexity; then the tool
    prompts (`tools`: an eval_tools.ToolEval, or None). With `engines` and `generation.backend: vllm`, vLLM
    generates."""
    started = time.time()
    if reference is not None and reference.path == target.checkpoint.path:  # the reference is loaded already
        lm = reference
    else:
        lm = load_lm(recipe, target.checkpoint, device, target.tokenizer)
    model, tokenizer = lm.model, lm.tokenizer
    log.info(f"{target.name}: {models.describe(model)} from {target.checkpoint.path}")
    prompts = [row["prompt"] for row in rows]
    engine = engines.load(model, tokenizer) if engines is not None else None
    gen = dict(max_new_tokens=keys.max_new_tokens, batch_size=keys.batch_size, seed=seed, engine=engine)
    target.greedy = [r[0] for r in generate(model, tokenizer, prompts, desc=f"{target.name}: greedy", **gen)]
    target.correct = [judges.is_correct(row, r.text) for row, r in zip(rows, target.greedy)]
    if keys.num_samples:
        target.samples = generate(model, tokenizer, prompts, do_sample=True, temperature=keys.temperature,
                                  top_p=keys.top_p, num_samples=keys.num_samples,
                                  desc=f"{target.name}: {keys.num_samples} samples", **gen)
        target.sample_correct = [[judges.is_correct(row, s.text) for s in samples]
                                 for row, samples in zip(rows, target.samples)]
    if own_samples:
        target.sample_logprobs = reply_logprob_sums(model, tokenizer, prompts, target.samples, keys.batch_size,
                                                    desc=f"{target.name}: sample log-probs")
    if reference is not None:
        if reference.path == target.checkpoint.path:
            target.log_ratios = np.zeros((len(prompts), keys.num_samples))
        else:
            ref = reply_logprob_sums(reference.model, reference.tokenizer, prompts, target.samples, keys.batch_size,
                                     desc=f"{target.name}: reference log-probs", policy_tokenizer=tokenizer)
            target.log_ratios = target.sample_logprobs - ref
    if ppl_rows:
        scored = held_out_perplexity(model, tokenizer, ppl_rows, keys.batch_size, desc=f"{target.name}: perplexity")
        if scored is None:
            log.info(f"{target.name}: no perplexity: no scored token in {keys.perplexity_data} (a chat template "
                     f"without a generation block marks no assistant token)")
        else:
            target.perplexity, target.perplexity_tokens = scored
    if tools is not None:
        tools.run(target.name, lm, engine)
    if engine is not None:
        engine.release()
    target.seconds = time.time() - started
    del model, lm


def score_rewards(recipe, cp: runs.Checkpoint, targets, rows, batch_size, device) -> bool:
    """The reward model's score of every greedy reply and every sample (pipeline/reward_model.py: encoded and
    truncated as its stage trained it), standardised with the reward_mean / reward_std its stage stored when its
    config has them."""
    reward_model = RewardModel.load(recipe, cp, device)

    def scores(replies_per_prompt, desc):
        pairs = [(row, r) for row, replies in zip(rows, replies_per_prompt) for r in replies]
        raw = reward_model.scores([row["prompt"] for row, _ in pairs], [r.text for _, r in pairs],
                                  [tools_of(row) for row, _ in pairs], batch_size=batch_size, desc=desc)
        return np.asarray(reward_model.normalise(raw) if reward_model.standardised else raw, dtype=float)

    for t in targets:
        t.rewards = scores([[r] for r in t.greedy], f"{t.name}: rewards").tolist()
        if t.samples is not None:
            t.sample_rewards = scores(t.samples, f"{t.name}: sample rewards").reshape(len(rows), -1)
    return reward_model.standardised


# ---------------------------------------------------------------------------------------------- main


@dataclasses.dataclass
class EvalSetup:
    """What this evaluation compares against and how, as the report states it."""

    baseline: str                     # every win rate is against this checkpoint
    seed: int                         # sampling and bootstrap seed
    verified: int                     # prompts with a reference answer (a verifier)
    own_samples: bool = False         # samples from each model's own distribution: entropy, and KL with a reference
    kl: bool = False                  # the sequence KL to `reference` is measured
    kl_note: str | None = None        # why it is not, when a reference was named
    best_of: list = dataclasses.field(default_factory=list)  # n of the best-of-n curve (at most num_samples)
    reference: str | None = None      # the KL reference's name in the report
    reward_standardised: bool = False  # reward scores are standardised with the reward stage's mean and std


def samples_setup(setup: EvalSetup, keys, reference: runs.Checkpoint | None, reward, targets) -> None:
    """The sequence KL and the entropy need samples from each model's own distribution (temperature 1, top_p 1);
    best-of-n needs a reward model and as many samples as n."""
    if not keys.num_samples:
        setup.kl_note = "no samples (num_samples: 0)"
    elif keys.temperature != 1.0 or keys.top_p != 1.0:
        setup.kl_note = "samples not from the model's own distribution (temperature or top_p not 1)"
    setup.own_samples = setup.kl_note is None
    setup.kl = reference is not None and setup.own_samples
    setup.best_of = sorted({n for n in keys.best_of_n if n <= keys.num_samples}) if reward is not None else []
    if keys.best_of_n and not setup.best_of:
        log.info("no best-of-n: " + ("no reward model to pick with" if reward is None else
                                     f"num_samples {keys.num_samples} is below every n of best_of_n"))
    elif len(setup.best_of) < len(set(keys.best_of_n)):
        log.info(f"best-of-n up to num_samples ({keys.num_samples}): n = "
                 f"{', '.join(str(n) for n in sorted(set(keys.best_of_n)) if n > keys.num_samples)} left out")
    if reference is not None:
        if not setup.kl:
            log.info(f"sequence KL skipped: {setup.kl_note}")
        setup.reference = next((t.name for t in targets if t.checkpoint.path == reference.path), keys.reference)


def main(argv):
    recipe = load_recipe(*cli.split_stage_args(argv, USAGE, lambda: stage_help(STAGE)))
    vllm_engine.check(recipe, one_process=True)
    keys = recipe.keys(STAGE)
    check_keys(recipe, keys)
    seed = recipe.run.seed if keys.seed is None else keys.seed
    boot = {"n_boot": keys.bootstrap, "seed": seed}
    with runs.StageRun(recipe, STAGE) as run:
        rows = load_prompts(recipe, keys)
        ppl_rows = load_perplexity_rows(recipe, keys)
        targets, baseline = targets_of(recipe, run, keys)
        reference = run.checkpoint("reference") if keys.reference else None
        if reference is not None:
            check_model(recipe, reference, "reference")
        reward = run.checkpoint("reward_model") if keys.reward_model else None
        if reward is None and recipe.section(STAGE).get("reward_model", "auto") == "auto" and "reward" in recipe.stages:
            log.info("the reward stage has not finished: no reward-model scores (name one with eval.reward_model)")
        data.warn_world_eval(recipe, STAGE, keys)
        if reward is not None:
            check_model(recipe, reward, "reward_model", reward=True)
            check_reads(recipe, [reward], [r["prompt"] for r in rows], keys.prompts, "eval.reward_model")
        tool_plan = eval_tools.plan(recipe, keys) if keys.tool_prompts else None
        for target in targets:  # each checkpoint's chat template renders the prompts and the perplexity rows
            tokenizer = models.load_tokenizer(recipe, target.checkpoint, as_saved=True)
            own = tokenizer.chat_template
            target.tokenizer = tokenizer = models.recipe_chat_template(recipe, tokenizer)
            models.check_chat_template(tokenizer, {keys.prompts: rows, keys.perplexity_data: ppl_rows})
            if own and own != tokenizer.chat_template:  # a model tuned elsewhere, answering in a format it never saw
                log.warning(f"{target.name}: evaluated with the pipeline's chat template over its own "
                            f"(tokenizer.chat_template: {recipe.tokenizer.chat_template}); set it to `own` to "
                            f"evaluate it in its own format")
        run.prepare()

        metrics = {}
        if run.state.is_main_process:  # generation is not sharded: other processes only wait
            device = run.state.device
            setup = EvalSetup(baseline=baseline, seed=seed, verified=sum(judges.has_verifier(r) for r in rows))
            samples_setup(setup, keys, reference, reward, targets)
            log.info(f"{len(rows)} prompts from {keys.prompts} ({setup.verified} with a verifier); "
                     f"checkpoints: {', '.join(t.name for t in targets)}; baseline {baseline}")
            tools = None
            if tool_plan is not None:
                tools = eval_tools.ToolEval(recipe, keys, tool_plan, run.out,
                                            recipe.stage_dir(STAGE).relative_to(recipe.run_dir), seed, device)
                log.info(f"{len(tool_plan.rows)} tool prompts from {keys.tool_prompts}; tools: "
                         f"{', '.join(tool_plan.tools)}")
            engines = vllm_engine.EvalEngines(recipe)
            tool_kl = tools is not None and keys.tool_samples > 0 and reference is not None
            reference_lm = load_lm(recipe, reference, device) if setup.kl or tool_kl else None
            if tool_kl:
                tools.reference = reference_lm
            for t in targets:
                t.parent = runs.trained_from(t.checkpoint.path) if t.checkpoint.source != "hub" else None
                run_checkpoint(recipe, keys, t, rows, ppl_rows, reference_lm if setup.kl else None,
                               setup.own_samples, seed, device, tools, engines)
            if tools is not None:
                tools.reference = None
            del reference_lm
            if reward is not None:
                setup.reward_standardised = score_rewards(recipe, reward, targets, rows, keys.batch_size, device)

            matrix = win_matrix(rows, targets, boot)
            per = {t.name: checkpoint_metrics(rows, t, baseline, matrix, boot, setup.best_of) for t in targets}
            if tools is not None:
                for t in targets:
                    per[t.name]["tools"] = tools.metrics(t.name, boot, setup.reference)
            collapse = collapse_checks(targets, per)
            for c in collapse:
                if c["collapsing"]:
                    log.warning(f"collapse: from {c['from']} to {c['to']} distinct-2 of the samples changed by "
                                f"{c['diversity_change']:+.3f}, their verifier accuracy by {c['accuracy_change']:+.3f}")
            metrics = {f"accuracy_{t.name}": per[t.name]["accuracy"] for t in targets if "accuracy" in per[t.name]}
            skills = Counter(r["skill"] for r in rows if r.get("skill"))
            metrics.update({
                "prompts": {"spec": keys.prompts, "n": len(rows), "verified": setup.verified,
                            "skills": dict(sorted(skills.items()))},
                "baseline": baseline,
                "reference": setup.reference if setup.kl else None,
                "reward_model": keys.reward_model,
                "generation": {"max_new_tokens": keys.max_new_tokens, "num_samples": keys.num_samples,
                               "temperature": keys.temperature, "top_p": keys.top_p, "seed": seed},
                "checkpoints": per,
                "win_rates": matrix,
                "collapse_checks": collapse,
            })
            if setup.kl_note:
                metrics["kl_note"] = setup.kl_note
            base = next(t for t in targets if t.name == baseline)
            versus = {t.name: {j: outcomes(rows, t, base, j) for j in judges.JUDGES} for t in targets if t is not base}
            eval_report.write_samples(run.out / "samples.jsonl", rows, targets, versus)
            plots = eval_report.plot_all(run.out, targets, per, matrix, baseline)
            tool_lines = [] if tools is None else eval_tools_report.write_outputs(
                run.out, tools, metrics, [t.name for t in targets], setup.reference)
            eval_report.write_report(run.out / "report.md", recipe, keys, setup, rows, targets, per, matrix, plots,
                                     collapse, tool_lines)
            eval_report.log_summary(targets, per, baseline)
            if tools is not None:
                eval_tools_report.log_summary({t.name: per[t.name]["tools"] for t in targets})
            eval_report.to_trackers(keys.report_to, run.out, per)
        run.finish(metrics, config=dataclasses.asdict(keys))
        log.info(f"report: {recipe.stage_dir(STAGE) / 'report.md'}")


if __name__ == "__main__":
    cli.run_main(main)
