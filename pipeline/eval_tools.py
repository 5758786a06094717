"""Tool use in the eval stage (issue #16): each checkpoint answers held-out tool prompts with the recipe's tools.

Per checkpoint, one greedy rollout per prompt (pipeline/tool_rollout.py: assistant turns and tool turns, at most
`max_tool_calls` calls) with the recipe's tools (`stage_toolbox`: drawn images become PNGs in the eval folder's
images/, the world's gallery is there with `tools.world_gallery`). The figures:

- call rate (share of prompts with a call), valid rate (calls that parsed and passed the tool's schema / calls),
  execution errors (valid calls whose tool failed or timed out), calls per prompt; a call past `max_tool_calls` is
  never run and counts apart (`over_budget`), not as a call;
- correctness of the world's tasks (rows with `kind` and `expect`; `tool_world.verify`: the image judge reads the
  last image drawn, a read task's final answer is checked) with bootstrap 95% intervals over prompts, per kind;
- the sequence KL to the `reference` on `tool_samples` rollouts per prompt sampled at temperature 1, tools run as
  in the greedy ones: log pi(y|x) - log ref(y|x) summed over the tokens the policy chose (the rollout's `mask`);
  the tokens a tool's result put in are context for both models, never counted.

Metric functions (`tool_metrics`, `policy_token_sums`) work on stored results; the report's part and the image grid
are in pipeline/eval_tools_report.py.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline import data, log, metrics as M, tool_world
from pipeline.cli import PipelineError
from pipeline.formats import as_messages, bad_row, tools_of
from pipeline.generation import prompt_ids, same_tokenizer, token_logprobs
from pipeline.images import PROPERTIES
from pipeline.reward_model import offered_tools
from pipeline.key_checks import source_of, where_set
from pipeline.tool_rollout import BUDGET_MESSAGE, generate_with_tools, offered_views, recipe_toolbox, stage_toolbox

DRAW_KINDS = ("draw", "draw_sum")


# ---------------------------------------------------------------------------------------------- prompts


@dataclasses.dataclass
class ToolPlan:
    """What the tool evaluation needs, checked before the stage writes anything."""

    spec: str                   # eval.tool_prompts
    rows: list                  # the prompts
    judge: Path | None          # the image judge's folder, when draw tasks are verified
    tools: list                 # the recipe's tool names
    schemas: list               # per prompt: the tool schemas it offers, rendered with it (None: none)


def is_verified(row: dict) -> bool:
    """A world tool task: `kind` draw / draw_sum / read with its `expect` (pipeline/tool_world.py)."""
    return row.get("kind") in tool_world.KINDS and isinstance(row.get("expect"), dict)


def expect_problem(row: dict) -> str | None:
    """Why a row's `kind` / `expect` cannot be verified as a world task, or None (also None: neither is there)."""
    kind, exp = row.get("kind"), row.get("expect")
    if exp is None:
        return None
    if kind not in tool_world.KINDS:
        return f"'expect' needs 'kind' {', '.join(tool_world.KINDS)}, got {kind!r}"
    if not isinstance(exp, dict):
        return f"'expect' must be a JSON object, got {type(exp).__name__}"
    if kind == "read":
        if not str(exp.get("image_id") or "").strip() or exp.get("answer") is None:
            return "'expect' of a read task needs 'image_id' and 'answer'"
        exp["image_id"], exp["answer"] = str(exp["image_id"]), str(exp["answer"])
        return None
    if not isinstance(exp.get("digit"), int) or not 0 <= exp["digit"] <= 9:
        return f"'expect' of a {kind} task needs 'digit' 0-9, got {exp.get('digit')!r}"
    for prop, values in PROPERTIES.items():
        if exp.get(prop) is not None and exp[prop] not in values:
            return f"'expect.{prop}' must be one of {', '.join(values)}, got {exp[prop]!r}"
    return None


def checked_rows(recipe, keys) -> tuple[list[dict], str | None]:
    """The tool prompts (eval.tool_max_prompts of them) with every check that needs no stage folder: each row's task
    and the tools it offers (the recipe's tool names), the gallery its read tasks need, an image tool for its draw
    tasks. Also where the image judge of draw tasks is (tools.judge_source), None without draw tasks. `plan` and
    `--check` (before the tools' stages have run) both call it."""
    from pipeline.tools import judge_source, unknown_tool

    def set_at(tools_key: str) -> str:  # the last override that set the prompts or that tools key, else the recipe
        return where_set(recipe, [("eval", "tool_prompts"), ("tools", tools_key)])

    if not recipe.tools.tools:
        raise PipelineError(f"{set_at('tools')}: eval.tool_prompts: the recipe has no tools (section `tools`) for the "
                            f"policy to call; add them or leave tool_prompts empty")
    names = recipe.tools.names
    rows, where, source = data.read_rows(keys.tool_prompts, recipe)
    if keys.tool_max_prompts:
        rows, where = rows[:keys.tool_max_prompts], where[:keys.tool_max_prompts]
    rows = data.CHECKS["eval_prompts"]([dict(r) for r in rows], where, source)  # a CSV's `expect`: its object
    for i, (row, w) in enumerate(zip(rows, where)):
        row["id"] = str(row.get("id") or f"tool-prompt-{i + 1}")
        if isinstance(row.get("expect"), dict):
            row["expect"] = dict(row["expect"])  # normalised below; the world's rows are cached
        if (problem := expect_problem(row)):
            bad_row(source, w, problem)
        if (missing := unknown_tool(tools_of(row, source, w), names)):
            bad_row(source, w, f"tool {missing!r} is not among the recipe's tools ({', '.join(names)})")
    kinds = Counter(r["kind"] for r in rows if is_verified(r))
    if kinds["read"] and not recipe.tools.world_gallery:
        raise PipelineError(f"{set_at('world_gallery')}: tools.world_gallery: {keys.tool_prompts} has "
                            f"{kinds['read']} read tasks about the world's gallery images, which the tools see only "
                            f"with tools.world_gallery: true")
    if not sum(kinds[k] for k in DRAW_KINDS):
        return rows, None
    if not (judge := judge_source(recipe.tools)):
        raise PipelineError(f"{set_at('tools')}: eval.tool_prompts: {keys.tool_prompts} has draw tasks, verified "
                            f"by the image judge, but the recipe has no image tool to find one by (an image_judge "
                            f"or diffusion tool)")
    return rows, judge


def plan(recipe, keys) -> ToolPlan:
    """Read and check the tool prompts (`checked_rows`) and what verifying them needs; one line naming where the key
    was set (its override, else the recipe file) and the key if not."""
    from pipeline.tools import ImageStore, judge_folder

    # the tools as the stage will build them (stage folders looked up now, before anything is written; a missing one
    # is said before the rows, which name the tools)
    box = recipe_toolbox(recipe, ImageStore(None)) if recipe.tools.tools else None  # none: checked_rows says so
    rows, judge = checked_rows(recipe, keys)
    if judge is not None:
        judge = judge_folder(judge, recipe.run_dir, "tools (the image judge of draw tasks)",
                             source_of(recipe, "tools", "tools"))
    # each row offers its own tools (its `tools`, as ppo offers them: null or [] is none), a row without the column
    # every tool of the recipe
    schemas = [offer if "tools" in row else box.schemas() for row, offer in zip(rows, offered_tools(rows))]
    return ToolPlan(keys.tool_prompts, rows, judge, list(box.tools), schemas)


# ---------------------------------------------------------------------------------------------- metrics


def over_budget(result) -> bool:
    """A call past max_tool_calls: never run (tool_rollout.budget_result)."""
    return result.error == BUDGET_MESSAGE


def tool_metrics(rows, greedy: list[dict], verdicts: list, log_ratios, boot: dict) -> dict:
    """One checkpoint's `tools` block from its greedy rollouts ({"calls": [ToolResult], "ended"} per prompt), the
    verdicts (a tool_world.verify dict per prompt, None where the row is not a world task) and the log-ratios of
    its sampled rollouts to the reference ((prompts, samples), or None)."""
    calls = [[r for r in g["calls"] if not over_budget(r)] for g in greedy]
    made = [r for c in calls for r in c]
    valid = [r for r in made if r.valid]
    m = {"prompts": len(rows), "call_rate": float(np.mean([bool(c) for c in calls])),
         "calls_per_prompt": len(made) / max(len(rows), 1), "calls": len(made), "valid_calls": len(valid),
         "execution_errors": sum(not r.ok for r in valid),
         "over_budget": sum(over_budget(r) for g in greedy for r in g["calls"]),
         "ended": float(np.mean([bool(g["ended"]) for g in greedy]))}
    if made:
        m["valid_rate"] = len(valid) / len(made)
    judged = [(row, v) for row, v in zip(rows, verdicts) if v is not None]
    if judged:
        correct = M.mean_ci([float(v["correct"]) for _, v in judged], **boot)
        m.update(verified=correct["n"], correct=correct["mean"], correct_ci=correct["ci"])
        kinds = [k for k in tool_world.KINDS if any(row["kind"] == k for row, _ in judged)]
        m["correct_per_kind"] = {k: M.mean_ci([float(v["correct"]) for row, v in judged if row["kind"] == k],
                                              **boot) for k in kinds}
        looked = [v["looked"] for _, v in judged if "looked" in v]
        if looked:
            m["read_looked"] = float(np.mean(looked))  # read tasks where read_image was called on the image
    if log_ratios is not None:
        kl = M.mean_ci(np.asarray(log_ratios).mean(axis=1), **boot)  # per prompt, then a bootstrap over prompts
        m.update(kl=kl["mean"], kl_ci=kl["ci"], kl_samples=int(np.asarray(log_ratios).shape[1]))
    return m


def rollout_sequences(batch) -> tuple[list[list[int]], list[list[bool]]]:
    """Per row of a ToolRollout: its token ids (prompt + reply, no padding) and which of them the policy chose."""
    seqs, scored = [], []
    for i in range(len(batch.sequences)):
        prompt_len = int(batch.attention_mask[i, :batch.context_length].sum())
        ids = batch.sequences[i][batch.attention_mask[i].bool()].tolist()
        chose = (batch.mask[i, :len(ids) - prompt_len] > 0).tolist()
        seqs.append(ids)
        scored.append([False] * prompt_len + chose)
    return seqs, scored


def policy_token_sums(token_lps: list[list[float]], scored: list[list[bool]]) -> np.ndarray:
    """Sum of log p(token t | before) over the tokens t marked in `scored` (token_lps[t - 1] is token t's, as
    generation.token_logprobs gives them)."""
    return np.array([float(sum(lp[t - 1] for t in range(1, len(s)) if s[t])) for lp, s in zip(token_lps, scored)])


# ---------------------------------------------------------------------------------------------- running


@dataclasses.dataclass
class ToolRun:
    """One checkpoint on the tool prompts."""

    greedy: list                   # per prompt: {"calls", "turns", "final", "ended", "text"}
    verdicts: list                 # per prompt: tool_world.verify's dict, or None (not a world task)
    log_ratios: np.ndarray = None  # (prompts, tool_samples) over the policy's tokens, or None
    samples: list = None           # per prompt: its sampled rollouts (as greedy, with "log_ratio"), or None
    kl_note: str | None = None     # why there is no KL
    images: dict = None            # id -> image: what this checkpoint's rollouts drew, under images/<checkpoint>/


class ToolEval:
    """The recipe's tools and the tool prompts, run for one checkpoint after another (`run`)."""

    def __init__(self, recipe, keys, tool_plan: ToolPlan, folder: Path, stage_rel: Path, seed: int, device):
        images = Path(folder) / "images"
        if images.exists():  # an earlier try's images: ids would repeat
            shutil.rmtree(images)
        self.toolbox, self.store = stage_toolbox(recipe, folder, 0, save_gallery=True)
        self.images = images
        self.image_dir = Path(stage_rel) / "images"  # where the PNGs are, relative to the run folder
        self.draw_tools = {e["name"] for e in recipe.tools.tools if e["backend"] == "diffusion"}
        self.judge = None
        if tool_plan.judge is not None:
            from pipeline.image_judge import ImageJudge

            self.judge = ImageJudge.load(tool_plan.judge)
        self.plan, self.keys, self.seed, self.device = tool_plan, keys, seed, device
        self.rows = tool_plan.rows
        self.offers = offered_views(self.toolbox, tool_plan.schemas)
        self.reference = None  # the reference LoadedModel, set by the caller when the KL is measured
        self.runs: dict[str, ToolRun] = {}

    def rollouts(self, lm, rows: list[int], sample: bool, desc: str, engine=None) -> list[dict]:
        """One rollout per row (indices into self.rows; greedy, or sampled at temperature 1), in batches of
        eval.batch_size (vLLM: `engine`, holding lm's weights)."""
        keys, out = self.keys, []
        for start in tqdm(range(0, len(rows), keys.batch_size), desc=desc, leave=False):
            chunk = rows[start:start + keys.batch_size]
            messages = [as_messages(self.rows[i]["prompt"]) for i in chunk]
            offers = [self.offers[i] for i in chunk]
            ids = [prompt_ids(lm.tokenizer, m, offer and offer.schemas()) for m, offer in zip(messages, offers)]
            batch = generate_with_tools(lm.model, lm.tokenizer, ids, messages, offers,
                                        max_new_tokens=keys.tool_max_new_tokens, max_tool_calls=keys.max_tool_calls,
                                        max_total_tokens=keys.tool_max_total_tokens, do_sample=sample,
                                        temperature=1.0, top_p=1.0, device=self.device, engine=engine)
            seqs, scored = rollout_sequences(batch)
            out += [{"calls": batch.calls[i], "turns": batch.turns[i], "final": batch.final[i],
                     "ended": bool(batch.ended[i]), "text": batch.texts[i], "ids": seqs[i], "scored": scored[i]}
                    for i in range(len(messages))]
        return out

    def run(self, name: str, lm, engine=None) -> None:
        """Greedy rollouts with their verdicts, then the sampled ones for the KL (`lm`: model, tokenizer, path)."""
        # each checkpoint seeds its drawings from call 0 and numbers its images from the first free id, saved under
        # images/<name>/: what it draws depends on it alone, not on how many calls the checkpoints before it made
        self.toolbox.restart(0)
        self.store.restart(self.images / name)
        greedy = self.rollouts(lm, list(range(len(self.rows))), False, f"{name}: tool prompts", engine)
        verdicts = [tool_world.verify(row, g["calls"], g["final"], self.judge, self.store) if is_verified(row)
                    else None for row, g in zip(self.rows, greedy)]
        for g in greedy:
            del g["ids"], g["scored"]
        run = ToolRun(greedy, verdicts)
        if self.keys.tool_samples and self.reference is not None:
            self.sample_kl(run, name, lm, engine)
        run.images = self.store.drawn()
        self.runs[name] = run

    def sample_kl(self, run: ToolRun, name: str, lm, engine=None) -> None:
        n, k, ref = len(self.rows), self.keys.tool_samples, self.reference
        if ref.path == lm.path:
            run.log_ratios = np.zeros((n, k))
            return
        if not same_tokenizer(ref.tokenizer, lm.tokenizer):
            run.kl_note = "the reference's tokenizer differs: the rollouts' token ids cannot be scored under it"
            log.info(f"{name}: no KL on tool prompts: {run.kl_note}")
            return
        torch.manual_seed(self.seed)
        self.toolbox.restart(n * max(self.keys.max_tool_calls, 1))  # seeds after the greedy rollouts' calls
        rows = [i for i in range(n) for _ in range(k)]
        samples = self.rollouts(lm, rows, True, f"{name}: {k} sampled tool rollouts", engine)
        seqs, scored = [s["ids"] for s in samples], [s["scored"] for s in samples]
        bs = self.keys.batch_size
        policy = policy_token_sums(token_logprobs(lm.model, seqs, batch_size=bs, desc=f"{name}: log-probs"), scored)
        reference = policy_token_sums(token_logprobs(ref.model, seqs, batch_size=bs, desc=f"{name}: reference"),
                                      scored)
        ratios = policy - reference
        for s, r in zip(samples, ratios):
            del s["ids"], s["scored"]
            s["log_ratio"] = float(r)
        run.log_ratios = ratios.reshape(n, k)
        run.samples = [samples[i * k:(i + 1) * k] for i in range(n)]

    # ------------------------------------------------------------------------------------------ results

    def metrics(self, name: str, boot: dict, reference: str | None = None) -> dict:
        """The checkpoint's `tools` block; with `reference` (a checkpoint run here, e.g. sft) also `gain`: its
        correctness minus the reference's, paired by prompt, with a bootstrap interval over prompts."""
        run = self.runs[name]
        m = tool_metrics(self.rows, run.greedy, run.verdicts, run.log_ratios, boot)
        if run.kl_note:
            m["kl_note"] = run.kl_note
        if reference in self.runs and reference != name and "correct" in m:
            gain = M.mean_ci([float(v["correct"]) - float(r["correct"]) for v, r in
                              zip(run.verdicts, self.runs[reference].verdicts) if v is not None], **boot)
            m.update(gain=gain["mean"], gain_ci=gain["ci"], gain_vs=reference)
        return m

    def summary(self, reference: str | None) -> dict:
        """metrics.json's `tool_prompts`: the prompts and the settings."""
        kinds = Counter(r["kind"] for r in self.rows if is_verified(r))
        keys = self.keys
        return {"spec": self.plan.spec, "n": len(self.rows), "verified": sum(kinds.values()),
                "kinds": {k: kinds[k] for k in tool_world.KINDS if kinds[k]}, "tools": self.plan.tools,
                "judge": str(self.plan.judge) if self.plan.judge else None, "max_tool_calls": keys.max_tool_calls,
                "max_new_tokens": keys.tool_max_new_tokens, "max_total_tokens": keys.tool_max_total_tokens,
                "samples": keys.tool_samples, "reference": reference if keys.tool_samples else None}

    def drawn_image(self, name: str, i: int) -> str | None:
        """The image checkpoint `name` drew for prompt i: the one its verdict judged, else its last drawn one."""
        run = self.runs[name]
        if run.verdicts[i] is not None and self.rows[i]["kind"] in DRAW_KINDS:
            return run.verdicts[i]["image"]
        drawn = [r.image for r in run.greedy[i]["calls"] if r.ok and r.image and r.name in self.draw_tools]
        return drawn[-1] if drawn else None

    def image(self, name: str, image_id: str):
        """An image checkpoint `name` drew or read (the gallery's are shared), or None."""
        if image_id in self.runs[name].images:
            return self.runs[name].images[image_id]
        return self.store.get(image_id) if image_id in self.store else None

    def image_path(self, name: str, image_id: str) -> str:
        """The PNG of `image` relative to the run folder: images/<name>/<id>.png, or images/<id>.png (gallery)."""
        folder = self.image_dir / name if image_id in self.runs[name].images else self.image_dir
        return (folder / f"{image_id}.png").as_posix()
