"""GRPO with tools through TRL's GRPOTrainer(tools=...) (`ppo.algorithm: grpo` and a `tools` section): the recipe's
tools, gold score and statistics as our PPO has them (pipeline/ppo_tools.py), within what TRL's tool loop allows.

- TRL renders every prompt with one list of tools, so every prompt must offer the recipe's tools, no more and no
  fewer (a mixture with text prompts is refused: our PPO, `algorithm: ppo`, renders each row with its own tools).
- Each tool is a `SchemaTool`: a dict holding the recipe tool's JSON schema (what the chat template renders: the
  schema our PPO and the world's data show, not one rebuilt from a docstring) that TRL also calls by name. A call runs
  through the recipe's ToolBox, which checks its arguments against the schema before running anything; the policy
  reads the ToolResult's tool message.
- TRL parses calls with the tokenizer's response template; a call it cannot parse (bad JSON) is plain text to it:
  it never reaches the tools and is not counted as a call (our PPO counts it as an invalid one).
- Budgets: `max_tool_calls` becomes TRL's `max_tool_calling_iterations` (rounds of calls: one turn may hold several),
  `PPOConfig.total_tokens()` its `max_completion_length` (the whole completion, tool results included; TRL bounds no
  turn apart).
- TRL keeps the tool results out of the loss: `_tool_call_loop` marks their tokens 0 in `tool_mask`
  (trl/trainer/grpo_trainer.py in TRL 1.16, line 2154), and the loss, KL term included, is masked with
  completion_mask * tool_mask (lines 2497 and 3027).
- Seeding and images per optimizer step (`on_step_begin`): tool calls numbered from (step * processes + rank) *
  CALLS_PER_STEP, image ids from the first free one, the PNGs of logged steps kept under <stage>/images/step-N/.
- The reward model reads the whole completion (assistant and tool turns) with the tools; tool_world.verify judges
  tool tasks from the ToolResults behind the completion's tool messages.
"""

from __future__ import annotations

import shutil

from pipeline import tool_world
from pipeline.cli import PipelineError
from pipeline.ppo_tools import check_offers, is_tool_task, load_judge, tool_counts
from pipeline.tool_rollout import stage_toolbox, tool_message
from pipeline.tools import ToolCall, ToolResult, tool_name

CALLS_PER_STEP = 10 ** 6  # call numbers a step may use per process (TRL bounds rounds of calls, not calls)


def check_grpo_tools(recipe, cfg, keys, prompts) -> None:
    """RLOO has no tools in TRL 1.16; GRPO renders one tool list for every prompt: one line each."""
    if cfg.algorithm != "grpo":
        raise PipelineError(f"{recipe.path}: ppo.algorithm={cfg.algorithm} with tools: TRL's RLOOTrainer runs no "
                            f"tools (1.16); use algorithm: grpo or ppo")
    names = sorted(recipe.tools.names)
    for i, offer in enumerate(check_offers(prompts, names, keys.prompts)):
        offered = sorted(tool_name(s) for s in offer or [])
        if offered != names:
            raise PipelineError(f"{keys.prompts}: row {i + 1} offers {', '.join(offered) or 'no tools'}: with "
                                f"algorithm grpo every prompt is rendered with all the recipe's tools "
                                f"({', '.join(names)}); use algorithm: ppo, which renders each prompt with its own")


class SchemaTool(dict):
    """One recipe tool as TRL takes it: its JSON schema (a dict, rendered as is by the chat template) that is also
    the callable TRL runs with the parsed arguments; the ToolResult is kept for the reward functions."""

    def __init__(self, box, name: str, results: dict):
        super().__init__(box.tools[name].schema)
        self.__name__, self._box, self._results = name, box, results

    def __call__(self, **arguments) -> str:
        result = self._box.call(ToolCall(self.__name__, arguments, "", None))
        content = tool_message(result)["content"]
        self._results[(self.__name__, content)] = result
        return content


class TRLTools:
    """The recipe's tools, image store and judge for GRPO in one process (see the module docstring)."""

    def __init__(self, recipe, cfg, keys, prompts, *, folder, rank: int, num_processes: int):
        self.cfg, self.rank, self.num_processes = cfg, rank, num_processes
        self.box, self.store = stage_toolbox(recipe, folder, rank)
        self.images = self.store.folder
        self.store.restart(None)
        self.box.setup()  # every tool loads before training (a resumed run's random stream stays the same)
        self.judge_model = load_judge(recipe, keys, prompts)
        self.results: dict = {}  # (tool, tool message) -> ToolResult, this step's
        self.tools = [SchemaTool(self.box, name, self.results) for name in self.box.tools]
        self._verdicts = (None, None)

    def start_step(self, step: int) -> None:
        """Before optimizer step `step` (from 0): number calls and images for this step alone."""
        cfg = self.cfg
        self.box.restart((step * self.num_processes + self.rank) * CALLS_PER_STEP)
        keep = (step + 1) % cfg.logging_steps == 0 or step + 1 == cfg.max_steps
        folder = self.images / f"step-{step + 1}" if keep and self.images is not None else None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        self.store.restart(folder)
        self.results.clear()

    def callback(self):
        from transformers import TrainerCallback

        env = self

        class StartStep(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                env.start_step(state.global_step)

        return StartStep()

    def calls_of(self, completion: list[dict]) -> list[ToolResult]:
        """The ToolResults behind a completion's tool messages (a call TRL could not run: an invalid one)."""
        out = []
        for m in completion:
            if m.get("role") == "tool":
                content = m.get("content") if isinstance(m.get("content"), str) else str(m.get("content"))
                out.append(self.results.get((m.get("name"), content)) or
                           ToolResult(m.get("name"), None, False, False, content, content, None, 0.0))
        return out

    def verdicts(self, prompts, completions, kind=None, expect=None, tools=None) -> list[dict | None]:
        """tool_world.verify on each tool task (None elsewhere), once per batch of completions."""
        if self._verdicts[0] is not completions:
            rows = [{"prompt": p, "kind": k, "expect": e, "tools": t} for p, k, e, t in
                    zip(prompts, kind or [None] * len(prompts), expect or [None] * len(prompts),
                        tools or [None] * len(prompts))]
            verdicts = [tool_world.verify(row, self.calls_of(c), c[-1].get("content") or "", self.judge_model,
                                          self.store) if is_tool_task(row) else None
                        for row, c in zip(rows, completions)]
            self._verdicts = (completions, verdicts)
        return self._verdicts[1]

    def log_statistics(self, prompts, completions, log_metric, **columns) -> None:
        """The tool statistics of pipeline/ppo_tools.tool_counts for this process's completions."""
        calls = [self.calls_of(c) for c in completions]
        counts = tool_counts(calls, [True] * len(calls), self.verdicts(prompts, completions, **columns))
        for name, (n, d) in counts.items():
            if d:
                log_metric(name, n / d)

    def image_verifier(self, prompts, completions, kind=None, expect=None, tools=None, **_):
        """The gold score of tool tasks as a reward function (image_verifier_weight): 1/0, None elsewhere."""
        verdicts = self.verdicts(prompts, completions, kind=kind, expect=expect, tools=tools)
        return [None if v is None else float(bool(v["correct"])) for v in verdicts]
