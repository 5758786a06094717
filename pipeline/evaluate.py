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
`reference` model; reply length, the share of replies that end with end-of-turn, distinct-1/2 and perplexity on
held-out text. Accuracy, rewards, win rates and KL carry bootstrap 95% intervals over prompts. A metric that cannot
be computed (no verifier, no reward model, samples not at temperature 1) is absent, never zero.

Outputs in runs/<run>/eval/: metrics.json, samples.jsonl (every prompt with every checkpoint's replies and scores),
report.md, and accuracy.png, win_rate.png, reward.png (each when its metric exists).
Section keys: EvalKeys (pipeline/stages.py).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, never shadow libraries with our modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import dataclasses
import json
import time

import numpy as np

from pipeline import cli, data, metrics as M, models, runs, world
from pipeline.recipe import load_recipe

STAGE = "eval"
USAGE = "usage: pipeline/evaluate.py RECIPE [eval.KEY=VALUE ...]"
JUDGES = {"verifier": "verifier", "reward": "reward model", "annotator": "annotator"}


@dataclasses.dataclass
class Target:
    """A checkpoint being evaluated and what it produced."""

    name: str
    checkpoint: runs.Checkpoint
    greedy: list = None           # one generation.Reply per prompt
    correct: list = None          # the verifier's verdict on each greedy reply (None: the prompt has none)
    samples: list = None          # num_samples Replies per prompt, or None
    log_ratios: list = None       # per prompt: log pi(y|x) - log ref(y|x) of each sample, or None
    perplexity: tuple = None      # (perplexity, tokens), or None
    rewards: list = None          # reward-model score of each greedy reply, or None
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
             ("report_examples", keys.report_examples >= 0, "0 or more")]
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
    targets = [Target(d["ref"], runs.Checkpoint(**d)) for d in run.inputs["checkpoints"]["checkpoints"]]
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


# ---------------------------------------------------------------------------------------------- judging one reply


def as_messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def has_verifier(row) -> bool:
    return row.get("answer") is not None


def is_correct(row, text: str) -> bool | None:
    """A world skill's verifier; without a world skill, exact match of the final answer ("... the answer is X.",
    else the whole reply) with the reference; None when the row has no reference answer."""
    if not has_verifier(row):
        return None
    if row.get("skill") in world.SKILLS:
        return world.verify(row["skill"], text, row["answer"])
    final = world.extract_answer(text)
    return M.exact_match(final if final is not None else text, row["answer"])


def annotator_outcome(row, a: str, b: str) -> int | None:
    """+1 / 0 / -1: the world's noise-free annotator prefers a / neither (equal quality) / b. None off-world."""
    skill, answer = row.get("skill"), row.get("answer")
    if skill not in world.SKILLS or answer is None:
        return None
    if world.reply_quality(skill, a, answer) == world.reply_quality(skill, b, answer):
        return 0
    return 1 if world.annotator_prefers(skill, answer, a, b) == 0 else -1


# ---------------------------------------------------------------------------------------------- models at work


def load_lm(recipe, cp: runs.Checkpoint, device):
    model = models.load_causal_lm(recipe, cp.path, revision=recipe.model.revision if cp.source == "hub" else None)
    tokenizer = models.load_tokenizer(recipe, cp)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        raise cli.PipelineError(f"{cp.path}: its tokenizer has {len(tokenizer)} tokens but the model only "
                                f"{model.get_input_embeddings().weight.shape[0]} embeddings")
    models.configure_generation(model, tokenizer)
    return model.to(device).eval(), tokenizer


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.chat_template == b.chat_template and a.eos_token_id == b.eos_token_id


def sample_sequences(tokenizer, prompts, samples, policy_tokenizer=None) -> tuple[list[list[int]], list[int]]:
    """prompt + sampled reply (+ end-of-turn if it ended) token ids, and each prompt's length. With the policy's own
    tokenizer the reply keeps its sampled ids; another tokenizer re-encodes the reply text."""
    from pipeline.generation import prompt_ids

    reuse = policy_tokenizer is None or same_tokenizer(tokenizer, policy_tokenizer)
    seqs, starts = [], []
    for prompt, replies in zip(prompts, samples):
        head = prompt_ids(tokenizer, prompt)
        for r in replies:
            body = r.token_ids if reuse else tokenizer(r.text, add_special_tokens=False)["input_ids"]
            seqs.append(head + list(body) + ([tokenizer.eos_token_id] if r.ended else []))
            starts.append(len(head))
    return seqs, starts


def reply_logprob_sums(model, tokenizer, prompts, samples, batch_size, desc, policy_tokenizer=None) -> np.ndarray:
    """log p(reply | prompt) of every sample under `model`, shaped (prompts, samples)."""
    from pipeline.generation import token_logprobs

    seqs, starts = sample_sequences(tokenizer, prompts, samples, policy_tokenizer)
    lps = token_logprobs(model, seqs, batch_size=batch_size, desc=desc)
    sums = [float(np.sum(lp[s - 1:])) for lp, s in zip(lps, starts)]
    return np.array(sums).reshape(len(prompts), -1)


def perplexity_sequences(tokenizer, rows, max_len: int) -> list[tuple[list[int], list[bool]]]:
    """Token ids of each held-out row and which of them are scored: every token of `text`, the assistant turns
    of a conversation (the chat template's generation block), the completion of a prompt/completion row."""
    out = []
    for row in rows:
        if "text" in row:
            ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
            scored = [True] * len(ids)
        elif "messages" in row or isinstance(row.get("prompt"), list):
            if "messages" in row:
                messages = row["messages"]
            else:
                completion = row["completion"]
                messages = row["prompt"] + (as_messages(completion) if isinstance(completion, list)
                                            else [{"role": "assistant", "content": completion}])
            tools = row.get("tools")
            enc = tokenizer.apply_chat_template(messages, tools=json.loads(tools) if isinstance(tools, str) else tools,
                                                tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            ids, scored = list(enc["input_ids"]), [bool(m) for m in enc["assistant_masks"]]
        else:
            head = len(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
            ids = tokenizer(row["prompt"] + row["completion"], add_special_tokens=False)["input_ids"]
            scored = [i >= head for i in range(len(ids))]
        out.append((ids[:max_len], scored[:max_len]))
    return out


def held_out_perplexity(model, tokenizer, rows, batch_size, desc) -> tuple[float, int] | None:
    from pipeline.generation import token_logprobs

    max_len = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    pairs = [(ids, scored) for ids, scored in perplexity_sequences(tokenizer, rows, max_len) if len(ids) > 1]
    lps = token_logprobs(model, [ids for ids, _ in pairs], batch_size=batch_size, desc=desc)
    picked = [[lp[t - 1] for t in range(1, len(ids)) if scored[t]] for (ids, scored), lp in zip(pairs, lps)]
    n = sum(len(p) for p in picked)
    return (M.perplexity(picked), n) if n else None


def run_checkpoint(recipe, keys, target: Target, rows, ppl_rows, reference, seed, device) -> None:
    """Generate greedy and sampled replies, score the samples under the policy and the reference (loaded when the
    sequence KL applies, else None), perplexity."""
    from pipeline.generation import generate

    started = time.time()
    if reference is not None and reference[2] == target.checkpoint.path:  # the reference is loaded already
        model, tokenizer = reference[:2]
    else:
        model, tokenizer = load_lm(recipe, target.checkpoint, device)
    print(f"[eval] {target.name}: {models.describe(model)} from {target.checkpoint.path}", flush=True)
    prompts = [row["prompt"] for row in rows]
    gen = dict(max_new_tokens=keys.max_new_tokens, batch_size=keys.batch_size, seed=seed)
    target.greedy = [r[0] for r in generate(model, tokenizer, prompts, desc=f"{target.name}: greedy", **gen)]
    target.correct = [is_correct(row, r.text) for row, r in zip(rows, target.greedy)]
    if keys.num_samples:
        target.samples = generate(model, tokenizer, prompts, do_sample=True, temperature=keys.temperature,
                                  top_p=keys.top_p, num_samples=keys.num_samples,
                                  desc=f"{target.name}: {keys.num_samples} samples", **gen)
    if reference is not None:
        ref_model, ref_tokenizer, ref_path = reference
        if ref_path == target.checkpoint.path:
            target.log_ratios = np.zeros((len(prompts), keys.num_samples))
        else:
            own = reply_logprob_sums(model, tokenizer, prompts, target.samples, keys.batch_size,
                                     desc=f"{target.name}: sample log-probs")
            ref = reply_logprob_sums(ref_model, ref_tokenizer, prompts, target.samples, keys.batch_size,
                                     desc=f"{target.name}: reference log-probs", policy_tokenizer=tokenizer)
            target.log_ratios = own - ref
    if ppl_rows:
        target.perplexity = held_out_perplexity(model, tokenizer, ppl_rows, keys.batch_size,
                                                desc=f"{target.name}: perplexity")
        if target.perplexity is None:
            print(f"[eval] {target.name}: no perplexity: no scored token in {keys.perplexity_data} (a chat "
                  f"template without a generation block marks no assistant token)", flush=True)
    target.seconds = time.time() - started
    del model


def score_rewards(recipe, cp: runs.Checkpoint, targets, rows, batch_size, device) -> bool:
    """The reward model's score of every greedy reply, standardised with the reward_mean / reward_std of its
    training replies when its config carries them (as the reward stage saves it)."""
    from pipeline.reward import encode, load_reward_model, score

    model = load_reward_model(recipe, cp.path).to(device).eval()
    tokenizer = models.load_tokenizer(recipe, cp)
    mean, std = getattr(model.config, "reward_mean", None), getattr(model.config, "reward_std", None)
    standardise = mean is not None and std is not None and std > 0
    max_len = getattr(model.config, "max_position_embeddings", None)
    for t in targets:
        seqs = [encode(tokenizer, as_messages(row["prompt"]), [{"role": "assistant", "content": r.text}])
                for row, r in zip(rows, t.greedy)]
        raw, _ = score(model, seqs, tokenizer.pad_token_id, batch_size, max_len, desc=f"{t.name}: rewards")
        t.rewards = [(x - mean) / std for x in raw] if standardise else raw
    del model
    return standardise


# ---------------------------------------------------------------------------------------------- metrics


def prompt_outcomes(rows, a: Target, b: Target, judge: str) -> list[int | None]:
    """Per prompt, +1 / 0 / -1 when the judge finds a's greedy reply better than / as good as / worse than b's;
    None where it cannot judge (no verifier, no reward model, a prompt off the world for the annotator)."""
    if judge == "annotator":
        return [annotator_outcome(row, x.text, y.text) for row, x, y in zip(rows, a.greedy, b.greedy)]
    sa, sb = (a.correct, b.correct) if judge == "verifier" else (a.rewards, b.rewards)
    if sa is None or sb is None:
        return [None] * len(rows)
    both = [i for i, (x, y) in enumerate(zip(sa, sb)) if x is not None and y is not None]
    out: list[int | None] = [None] * len(rows)
    if both:
        for i, o in zip(both, M.pairwise_outcomes([sa[i] for i in both], [sb[i] for i in both]).tolist()):
            out[i] = o
    return out


def judged(outcomes: list[int | None]) -> list[int]:
    return [o for o in outcomes if o is not None]


def win_matrix(rows, targets, boot) -> dict:
    """{judge: {a: {b: win-rate summary of a over b}}} for every judge that can compare anything."""
    matrix = {}
    for judge in JUDGES:
        table = {a.name: {b.name: M.win_rate_summary(judged(prompt_outcomes(rows, a, b, judge)), **boot)
                          for b in targets if b is not a} for a in targets}
        if any(s is not None for row in table.values() for s in row.values()):
            matrix[judge] = table
    return matrix


def checkpoint_metrics(rows, t: Target, baseline: str, matrix: dict, boot: dict) -> dict:
    m: dict = {"ref": t.checkpoint.ref, "path": t.checkpoint.path}
    verified = [(row, c) for row, c in zip(rows, t.correct) if c is not None]
    if verified:
        acc = M.mean_ci([c for _, c in verified], **boot)
        m.update(accuracy=acc["mean"], accuracy_ci=acc["ci"], verified=acc["n"])
        skills = sorted({row["skill"] for row, _ in verified if row.get("skill")})
        if skills:
            m["accuracy_per_skill"] = {s: M.mean_ci([c for row, c in verified if row.get("skill") == s], **boot)
                                       for s in skills}
        levels = {"easy": [c for row, c in verified if row.get("hard") is False],
                  "hard": [c for row, c in verified if row.get("hard") is True]}
        if any(levels.values()):
            m["accuracy_by_difficulty"] = {level: M.mean_ci(v, **boot) for level, v in levels.items() if v}
        if t.samples is not None:
            per_row = [[is_correct(row, s.text) for s in samples] for row, samples in zip(rows, t.samples)
                       if has_verifier(row)]
            m["sample_accuracy"] = float(np.mean(per_row))
            m["pass_at_n"] = float(np.mean([any(x) for x in per_row]))
    if t.rewards is not None:
        reward = M.mean_ci(t.rewards, **boot)
        m.update(reward=reward["mean"], reward_ci=reward["ci"])
    if t.name != baseline:
        wins = {judge: matrix[judge][t.name][baseline] for judge in matrix
                if matrix[judge][t.name][baseline] is not None}
        if wins:
            m["win_rate"] = wins
    if t.log_ratios is not None:
        kl = M.mean_ci(t.log_ratios.mean(axis=1), **boot)  # per prompt, then a bootstrap over prompts
        m.update(kl=kl["mean"], kl_ci=kl["ci"])
    m["reply_tokens"] = float(np.mean([r.n_tokens for r in t.greedy]))
    m["reply_words"] = float(np.mean([len(r.text.split()) for r in t.greedy]))
    m["ended"] = float(np.mean([r.ended for r in t.greedy]))
    if t.samples is not None:  # diversity among the samples of one prompt, averaged over prompts
        for n in (1, 2):
            values = [v for samples in t.samples if (v := M.distinct_n([s.text for s in samples], n)) is not None]
            if values:
                m[f"distinct_{n}"] = float(np.mean(values))
        m["sample_ended"] = float(np.mean([s.ended for samples in t.samples for s in samples]))
    if t.perplexity is not None:
        m["perplexity"], m["perplexity_tokens"] = t.perplexity
    m["seconds"] = round(t.seconds, 1)
    return m


# ---------------------------------------------------------------------------------------------- outputs


def write_samples(path: Path, rows, targets, baseline: str) -> None:
    """One line per prompt: the prompt, its reference, and each checkpoint's greedy reply with its verdict, reward
    and outcome against the baseline per judge, and its samples (verdict, log-ratio to the reference)."""
    base = next(t for t in targets if t.name == baseline)
    versus = {t.name: {j: prompt_outcomes(rows, t, base, j) for j in JUDGES} for t in targets if t is not base}
    words = {1: "win", 0: "tie", -1: "loss"}
    with open(path, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            replies = {}
            for t in targets:
                r = t.greedy[i]
                entry = {"text": r.text, "ended": r.ended, "tokens": r.n_tokens}
                if t.correct[i] is not None:
                    entry["correct"] = t.correct[i]
                if t.rewards is not None:
                    entry["reward"] = round(float(t.rewards[i]), 4)
                vs = {j: words[o[i]] for j, o in versus.get(t.name, {}).items() if o[i] is not None}
                if vs:
                    entry["vs_baseline"] = vs
                if t.samples is not None:
                    entry["samples"] = []
                    for k, sample in enumerate(t.samples[i]):
                        item = {"text": sample.text, "ended": sample.ended}
                        if t.correct[i] is not None:
                            item["correct"] = is_correct(row, sample.text)
                        if t.log_ratios is not None:
                            item["log_ratio"] = round(float(t.log_ratios[i, k]), 4)
                        entry["samples"].append(item)
                replies[t.name] = entry
            out = {k: row[k] for k in ("id", "prompt", "skill", "hard", "answer") if row.get(k) is not None}
            f.write(json.dumps({**out, "replies": replies}, ensure_ascii=False) + "\n")


def _fmt(value, ci=None, digits=3) -> str:
    if value is None:
        return "—"
    text = f"{value:.{digits}f}"
    return f"{text} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else text


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[:limit - 1] + "…"
    return text.replace("|", "\\|") or "(empty)"


def _prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else " / ".join(f"{m['role']}: {m.get('content') or ''}" for m in prompt)


def write_report(path: Path, recipe, keys, info: dict, rows, targets, per: dict, matrix: dict, plots) -> None:
    baseline = info["baseline"]
    lines = [f"# Evaluation: run `{recipe.run.name}`", "",
             f"- prompts: `{keys.prompts}` ({len(rows)} prompts, "
             + (f"{info['verified']} with a verifier or reference answer)" if info["verified"] else
                "none with a reference answer: no accuracy, no verifier or annotator judgements)"),
             f"- replies: greedy, plus {keys.num_samples} samples per prompt at temperature {keys.temperature}, "
             f"top_p {keys.top_p}; at most {keys.max_new_tokens} new tokens; seed {info['seed']}",
             f"- baseline for win rates: `{baseline}`; KL reference: "
             + (f"`{info['reference']}`" if info.get("kl") else f"none ({info.get('kl_note', 'not set')})"),
             "- reward model: " + (f"`{keys.reward_model}`" + (" (scores standardised with its training "
                                                                "reward_mean / reward_std)"
                                                                if info.get("reward_standardised") else "")
                                    if keys.reward_model else "none"),
             "- intervals: bootstrap 95% over prompts; win rate = (wins + ties / 2) / comparisons", ""]

    columns = [("accuracy", lambda m: _fmt(m.get("accuracy"), m.get("accuracy_ci"))),
               (f"pass@{keys.num_samples}", lambda m: _fmt(m.get("pass_at_n"))),
               *[(f"win vs {baseline}: {JUDGES[j]}",
                  (lambda j: lambda m: _fmt(m.get("win_rate", {}).get(j, {}).get("win_rate"),
                                            m.get("win_rate", {}).get(j, {}).get("ci")))(j)) for j in matrix],
               ("reward", lambda m: _fmt(m.get("reward"), m.get("reward_ci"))),
               ("KL to reference", lambda m: _fmt(m.get("kl"), m.get("kl_ci"), digits=2)),
               ("words", lambda m: _fmt(m.get("reply_words"), digits=1)),
               ("ended", lambda m: _fmt(m.get("ended"), digits=2)),
               ("distinct-1 / 2 of samples", lambda m: f"{_fmt(m.get('distinct_1'), digits=2)} / "
                                            f"{_fmt(m.get('distinct_2'), digits=2)}"),
               ("perplexity", lambda m: _fmt(m.get("perplexity"), digits=2))]
    columns = [(title, get) for title, get in columns
               if any(get(m).strip("— /") for m in per.values())]  # drop columns no checkpoint has
    lines += ["## Checkpoints", "", "| checkpoint | " + " | ".join(t for t, _ in columns) + " |",
              "|---|" + "---|" * len(columns)]
    for t in targets:
        lines.append(f"| `{t.name}` | " + " | ".join(get(per[t.name]) for _, get in columns) + " |")
    lines.append("")
    if "perplexity" in [c for c, _ in columns]:
        lines += [f"Perplexity on `{keys.perplexity_data}` (at most {keys.perplexity_max_rows} rows).", ""]

    skills = sorted({s for m in per.values() for s in m.get("accuracy_per_skill", {})})
    levels = [lv for lv in ("easy", "hard") if any(lv in m.get("accuracy_by_difficulty", {}) for m in per.values())]
    if skills or levels:
        lines += ["## Accuracy by skill", "", "| checkpoint | " + " | ".join(skills + levels) + " |",
                  "|---|" + "---|" * (len(skills) + len(levels))]
        for t in targets:
            m = per[t.name]
            cells = [m.get("accuracy_per_skill", {}).get(s) for s in skills] + \
                    [m.get("accuracy_by_difficulty", {}).get(lv) for lv in levels]
            lines.append(f"| `{t.name}` | " + " | ".join(_fmt(c["mean"], c["ci"]) if c else "—" for c in cells)
                         + " |")
        lines.append("")

    if matrix:
        lines += ["## Win rates", "", "Row against column: the share of prompts where the row's greedy reply is "
                  "judged better (ties count half), with its 95% interval.", ""]
        for judge, table in matrix.items():
            lines += [f"### {JUDGES[judge]}", "", "| | " + " | ".join(f"`{t.name}`" for t in targets) + " |",
                      "|---|" + "---|" * len(targets)]
            for a in targets:
                cells = ["—" if a is b or table[a.name][b.name] is None else
                         _fmt(table[a.name][b.name]["win_rate"], table[a.name][b.name]["ci"], digits=2)
                         for b in targets]
                lines.append(f"| `{a.name}` | " + " | ".join(cells) + " |")
            lines.append("")

    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]

    examples = pick_examples(rows, targets, keys.report_examples)
    if examples:
        lines += ["## Example replies", "", "| prompt | reference | " + " | ".join(f"`{t.name}`" for t in targets)
                  + " |", "|---|---|" + "---|" * len(targets)]
        for i in examples:
            row = rows[i]
            cells = []
            for t in targets:
                ok = t.correct[i]
                mark = "" if ok is None else ("✓ " if ok else "✗ ")
                cells.append(mark + _cell(t.greedy[i].text) + ("" if t.greedy[i].ended else " *(cut)*"))
            lines.append(f"| {_cell(_prompt_text(row['prompt']))} | {_cell(row.get('answer') or '—')} | "
                         + " | ".join(cells) + " |")
        verdicts = any(rows[i].get("answer") is not None for i in examples)
        legend = ["✓ / ✗: the verifier's verdict"] if verdicts else []
        legend += ["*(cut)*: the reply hit max_new_tokens", "every reply is in samples.jsonl"]
        lines += ["", "; ".join(legend) + ".", ""]
    path.write_text("\n".join(lines))


def pick_examples(rows, targets, k: int) -> list[int]:
    """Prompts where the checkpoints disagree most (verdicts, then reply texts) first, then in file order."""
    def spread(i):
        verdicts = {t.correct[i] for t in targets}
        return (-len(verdicts), -len({t.greedy[i].text for t in targets}), i)
    return sorted(range(len(rows)), key=spread)[:k]


def plot_all(out: Path, targets, per: dict, matrix: dict, baseline: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [t.name for t in targets]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []

    def bars(ax, groups, series, values):
        """Grouped bars: values[s][g] = (value, (lo, hi)) or None."""
        width = 0.8 / max(len(series), 1)
        for k, s in enumerate(series):
            xs = [g + (k - (len(series) - 1) / 2) * width for g in range(len(groups))]
            vals = [values[s][g] for g in range(len(groups))]
            ys = [v[0] if v else np.nan for v in vals]
            err = np.array([[max(v[0] - v[1][0], 0), max(v[1][1] - v[0], 0)] if v and v[1] else [0, 0]
                            for v in vals]).T
            ax.bar(xs, ys, width, yerr=err, capsize=3, label=s, color=colors[k % len(colors)])
        ax.set_xticks(range(len(groups)), groups)

    def save(fig, ax, name):
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out / name)
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    accuracy = [t for t in names if "accuracy" in per[t]]
    if accuracy:
        skills = sorted({s for t in accuracy for s in per[t].get("accuracy_per_skill", {})})
        groups = ["all"] + skills
        values = {t: [(per[t]["accuracy"], per[t]["accuracy_ci"])] +
                  [(c["mean"], c["ci"]) if (c := per[t].get("accuracy_per_skill", {}).get(s)) else None
                   for s in skills] for t in accuracy}
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * max(1, len(accuracy) / 2)), 4))
        bars(ax, groups, accuracy, values)
        ax.set_ylim(0, 1)
        ax.set_ylabel("verifier accuracy (greedy)")
        ax.set_title("verifier accuracy per checkpoint, 95% bootstrap intervals", fontsize=10)
        save(fig, ax, "accuracy.png")

    others = [t for t in names if t != baseline]
    if matrix and others:
        judges = list(matrix)
        values = {JUDGES[j]: [(s["win_rate"], s["ci"]) if (s := matrix[j][t][baseline]) else None for t in others]
                  for j in judges}
        fig, ax = plt.subplots(figsize=(max(6, 2 + 1.2 * len(others) * len(judges)), 4))
        bars(ax, others, [JUDGES[j] for j in judges], values)
        ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("win rate (ties count half)")
        ax.set_title(f"win rate against {baseline}, 95% bootstrap intervals", fontsize=10)
        save(fig, ax, "win_rate.png")

    scored = [t for t in targets if t.rewards is not None]
    if scored:
        fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(scored) + 2), 4))
        ax.violinplot([t.rewards for t in scored], showmedians=True)
        ax.scatter(range(1, len(scored) + 1), [np.mean(t.rewards) for t in scored], color="black", zorder=3,
                   label="mean")
        ax.set_xticks(range(1, len(scored) + 1), [t.name for t in scored])
        ax.set_ylabel("reward of the greedy reply")
        ax.set_title("reward-model score of each greedy reply", fontsize=10)
        save(fig, ax, "reward.png")
    return written


# ---------------------------------------------------------------------------------------------- main


def main(argv):
    recipe = load_recipe(*cli.split_stage_args(argv, USAGE))
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
        if reward is not None:
            check_model(recipe, reward, "reward_model", reward=True)
        run.prepare()

        info: dict = {"baseline": baseline, "seed": seed, "verified": sum(has_verifier(r) for r in rows)}
        if run.state.is_main_process:  # generation is not sharded: other processes only wait
            device = run.state.device
            if not keys.num_samples:
                info["kl_note"] = "no samples (num_samples: 0)"
            elif keys.temperature != 1.0 or keys.top_p != 1.0:
                info["kl_note"] = "samples not from the model's own distribution (temperature or top_p not 1)"
            kl_ok = reference is not None and "kl_note" not in info
            if reference is not None and not kl_ok:
                print(f"[eval] sequence KL skipped: {info['kl_note']}", flush=True)
            ref_models = (*load_lm(recipe, reference, device), reference.path) if kl_ok else None
            info["kl"] = kl_ok
            if reference is not None:
                info["reference"] = next((t.name for t in targets if t.checkpoint.path == reference.path),
                                         keys.reference)
            print(f"[eval] {len(rows)} prompts from {keys.prompts} ({info['verified']} with a verifier); "
                  f"checkpoints: {', '.join(t.name for t in targets)}; baseline {baseline}", flush=True)
            for t in targets:
                run_checkpoint(recipe, keys, t, rows, ppl_rows, ref_models, seed, device)
            del ref_models
            if reward is not None:
                info["reward_standardised"] = score_rewards(recipe, reward, targets, rows, keys.batch_size, device)

            matrix = win_matrix(rows, targets, boot)
            per = {t.name: checkpoint_metrics(rows, t, baseline, matrix, boot) for t in targets}
            metrics = {f"accuracy_{t.name}": per[t.name]["accuracy"] for t in targets if "accuracy" in per[t.name]}
            metrics.update({
                "prompts": {"spec": keys.prompts, "n": len(rows), "verified": info["verified"],
                            "skills": dict(sorted(_counts(r.get("skill") for r in rows if r.get("skill")).items()))},
                "baseline": baseline,
                "reference": info["reference"] if kl_ok else None,
                "reward_model": keys.reward_model,
                "generation": {"max_new_tokens": keys.max_new_tokens, "num_samples": keys.num_samples,
                               "temperature": keys.temperature, "top_p": keys.top_p, "seed": seed},
                "checkpoints": per,
                "win_rates": matrix,
            })
            if "kl_note" in info:
                metrics["kl_note"] = info["kl_note"]
            write_samples(run.out / "samples.jsonl", rows, targets, baseline)
            plots = plot_all(run.out, targets, per, matrix, baseline)
            write_report(run.out / "report.md", recipe, keys, info, rows, targets, per, matrix, plots)
            print_summary(targets, per, baseline)
        else:
            metrics = {}
        run.finish(metrics, config=dataclasses.asdict(keys))
        if run.state.is_main_process:
            print(f"[eval] report: {recipe.stage_dir(STAGE) / 'report.md'}", flush=True)


def _counts(values) -> dict:
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def print_summary(targets, per, baseline) -> None:
    for t in targets:
        m = per[t.name]
        parts = []
        if "accuracy" in m:
            parts.append(f"accuracy {_fmt(m['accuracy'], m['accuracy_ci'])}")
        for judge, s in m.get("win_rate", {}).items():
            parts.append(f"win vs {baseline} ({JUDGES[judge]}) {_fmt(s['win_rate'], s['ci'], digits=2)}")
        if "reward" in m:
            parts.append(f"reward {m['reward']:.3f}")
        if "kl" in m:
            parts.append(f"KL {m['kl']:.2f}")
        parts.append(f"ended {m['ended']:.2f}")
        print(f"[eval] {t.name}: " + ", ".join(parts), flush=True)


if __name__ == "__main__":
    cli.run_main(main)
