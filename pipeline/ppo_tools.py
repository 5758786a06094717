"""Our PPO with tools (issue #16): prompts that offer tools (a `tools` column) are answered in multi-turn rollouts
(pipeline/tool_rollout.py) in which the policy calls the recipe's tools; everything else is PPO as before.

    env = ToolEnv(recipe, cfg, keys, prompts, folder=run.out, rank=0, num_processes=1)   # once per process
    batch = env.rollout(policy, tokenizer, prompt_ids, rows, step=0, keep_images=True, device="cpu")
    env.judge(prompt_rows, batch)    # tool_world.verify on tool tasks: batch.verdicts, batch.tool_correct
    tool_counts(batch.calls, batch.tools, batch.verdicts)   # the step's tool statistics, (numerator, denominator)

- A prompt is rendered with the tools its row offers, and its calls are run by the recipe's ToolBox (schemas checked
  before anything runs); a call to a tool the row does not offer is refused as an unknown tool. A row without tools
  gets no tools and one turn, never parsed for calls, as without tools at all (and as the eval stage samples it).
- Seeding: before step s, process r numbers its tool calls from (s * processes + r) * batch_size * max_tool_calls
  (draw_image seeds call k with seed + k; a step runs at most batch_size * max_tool_calls calls per process) and the
  image store numbers new images from the first free id again, so a step's draws and image ids depend on the step
  alone and a resumed run repeats them. The tools load when the trainer starts, before the first step: a model load
  that draws random numbers then does so in every run at the same point.
- Images: the store keeps a step's drawn images in memory until the next step; the PNGs (and images.jsonl: id, tool,
  prompt, seed) of logged steps (every `logging_steps`, and the last) are kept under <stage>/images/step-N/
  (images-rankR/ for process R); other steps' images are never written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from pipeline import log, tool_world
from pipeline.cli import PipelineError
from pipeline.formats import as_messages
from pipeline.ppo_rollout import Rollout
from pipeline.reward_model import offered_tools
from pipeline.tool_rollout import generate_with_tools, offered_views, stage_toolbox
from pipeline.tools import judge_folder, unknown_tool

DRAW_KINDS = ("draw", "draw_sum")


def check_offers(prompts, names: list[str], spec) -> list[list[dict] | None]:
    """The tools each prompt offers (None: none); a tool the recipe does not have is a PipelineError naming the row."""
    offers = offered_tools(prompts)
    for i, offer in enumerate(offers):
        if (name := unknown_tool(offer, names)):
            raise PipelineError(f"{spec}: row {i + 1} offers the tool '{name}', which the recipe's `tools` "
                                f"section does not have (tools: {', '.join(names)})")
    return offers


def is_tool_task(row: dict) -> bool:
    """A row tool_world.verify can judge: it offers tools and is one of the world's tool tasks."""
    return bool(row.get("tools")) and (row.get("kind") in tool_world.KINDS or bool(row.get("expect")))


def load_judge(recipe, keys, prompts):
    """The image judge, when some prompt is a draw task (tool_world.verify reads the drawn image with it)."""
    if not any(is_tool_task(row) and row.get("kind") in DRAW_KINDS for row in prompts):
        return None
    if not keys.image_judge:
        raise PipelineError(f"{recipe.path}: ppo.image_judge: the prompts hold draw tasks, and the gold score needs "
                            f"an image judge: name a stage or a folder holding judge/")
    from pipeline.image_judge import ImageJudge

    return ImageJudge.load(judge_folder(keys.image_judge, recipe.run_dir, "ppo.image_judge", str(recipe.path)))


class ToolEnv:
    """The recipe's tools, the image store and judge, and each prompt's offered tools, for one PPO process."""

    def __init__(self, recipe, cfg, keys, prompts, *, folder: Path, rank: int, num_processes: int):
        self.cfg, self.rank, self.num_processes = cfg, rank, num_processes
        self.box, self.store = stage_toolbox(recipe, folder, rank)
        self.images = self.store.folder
        self.store.restart(None)  # nothing on disk until a logged step
        self.offers = check_offers(prompts, list(self.box.tools), keys.prompts)
        self.messages = [as_messages(p) for p in prompts["prompt"]]
        self.views = offered_views(self.box, self.offers)
        self.box.setup()  # every tool loads now (see the module docstring)
        self.judge_model = load_judge(recipe, keys, prompts)
        tasks = sum(is_tool_task(row) for row in prompts)
        log.info("tools %s: %d of %d prompts offer tools (%d tool tasks the gold score judges); %d calls per reply, "
                 "%d tokens per reply", ", ".join(self.box.tools), sum(o is not None for o in self.offers),
                 len(self.offers), tasks, cfg.max_tool_calls, cfg.total_tokens())

    def rollout(self, policy, tokenizer, prompt_ids: list[list[int]], rows: list[int], *, step: int,
                keep_images: bool, device, engine=None) -> Rollout:
        """One reply per prompt of `rows`, tools run where the prompt offers them; `step` counts from 0."""
        cfg = self.cfg
        self.box.restart((step * self.num_processes + self.rank) * cfg.batch_size * max(cfg.max_tool_calls, 1))
        folder = self.images / f"step-{step + 1}" if keep_images and self.images is not None else None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)  # a step redone after a resume
        self.store.restart(folder)
        out = generate_with_tools(policy, tokenizer, [prompt_ids[i] for i in rows], [self.messages[i] for i in rows],
                                  [self.views[i] for i in rows], max_new_tokens=cfg.max_new_tokens,
                                  max_tool_calls=cfg.max_tool_calls, max_total_tokens=cfg.total_tokens(),
                                  do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, device=device,
                                  engine=engine)
        return Rollout(rows=rows, sequences=out.sequences, attention_mask=out.attention_mask, replies=out.replies,
                       mask=out.mask, ended=out.ended, context_length=out.context_length, texts=out.texts,
                       tools=[self.offers[i] for i in rows], tool_mask=out.tool_mask, calls=out.calls,
                       turns=out.turns, final=out.final)

    def judge(self, prompt_rows, batch: Rollout) -> None:
        """The gold score of tool tasks: tool_world.verify's outcome (`correct`: the judge reads the last drawn
        image as asked, or the read's final answer is the image's digit)."""
        batch.verdicts = [tool_world.verify(row, calls, final, self.judge_model, self.store) if is_tool_task(row)
                          else None for row, calls, final in zip(prompt_rows, batch.calls, batch.final)]
        batch.tool_correct = torch.tensor([float(bool(v and v["correct"])) for v in batch.verdicts],
                                          device=batch.ended.device)


def conversation(batch: Rollout) -> list:
    """What the reward model reads of each reply: the text without tools; with tools its turns (assistant text
    stripped, as the reward stage's data has it), without the tool messages of a reply that stopped after them (their
    tokens are not in the rollout)."""
    if batch.turns is None:
        return batch.texts
    out = []
    for text, offer, turns in zip(batch.texts, batch.tools, batch.turns):
        if not offer:
            out.append(text)
            continue
        turns = list(turns)
        while turns and turns[-1]["role"] == "tool":
            turns.pop()
        out.append([{**m, "content": m["content"].strip()} if m["role"] == "assistant" and
                    isinstance(m.get("content"), str) else m for m in turns])
    return out


def tool_counts(calls: list, offers: list, verdicts: list | None) -> dict[str, tuple[float, float]]:
    """Tool statistics as (numerator, denominator), over the replies to prompts that offer tools (`offers[i]`
    truthy; `calls[i]`: reply i's ToolResults): replies with a call, calls per reply, calls that passed the schema
    (`valid_call_rate`, of all calls), valid calls that failed when run (`tool_error_rate`: exceptions, timeouts, "no
    image 12"), and the gold score of the tool tasks (`image_verifier`, of the verdicts that are not None)."""
    offered = [c for c, offer in zip(calls, offers) if offer]
    results = [r for c in offered for r in c]
    valid = [r for r in results if r.valid]
    verdicts = [v for v in verdicts or [] if v is not None]
    return {"tool_call_rate": (sum(bool(c) for c in offered), len(offered)),
            "tool_calls": (len(results), len(offered)),
            "valid_call_rate": (len(valid), len(results)),
            "tool_error_rate": (sum(not r.ok for r in valid), len(valid)),
            "image_verifier": (sum(bool(v["correct"]) for v in verdicts), len(verdicts))}
