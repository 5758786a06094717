"""Rollouts in which the policy calls tools in the middle of its reply (PPO/GRPO with tools, issue #16).

    batch = generate_with_tools(policy, tokenizer, prompt_ids, messages, toolbox, max_new_tokens=64,
                                max_tool_calls=3, max_total_tokens=256, do_sample=True, temperature=1.0,
                                top_p=1.0, device="cpu")
    # batch.mask: 1 on the tokens the policy chose; batch.tool_mask: 1 on the tokens the tools' results put in

One reply is a run of turns: assistant, tool(s), assistant, ... Rows move in lock-step: each round generates one
assistant turn for every row still going (left-padded batch, KV cache within the turn, stops at end-of-turn), parses
its tool calls, runs them, and appends the tool turn. A turn without a call is the final answer.

Token ids are never re-tokenised (TRL #5224): a row's ids are the prompt's ids, then each turn's ids exactly as
sampled, then the ids of the text the chat template puts between that turn's end-of-turn token and the next
assistant turn (the "delta": for our template `\\n<|im_start|>tool\\n<tool_response>\\n...<|im_start|>assistant\\n`;
the `\\n` after end-of-turn is the template's and belongs to the delta, cf. verl #6921). The delta is computed from the
template, so hub templates work too: render the conversation with and without the tool messages and take the
difference (see `tool_turn_text`). Only the delta is tokenised, on its own; its first character follows a special
token, so tokenising it alone gives the ids a whole-conversation tokenisation would give.

Each round re-pads the rows' whole (prompt + reply so far) sequences and runs `generate` from scratch: the KV cache
is not carried across turns (simple, and correct whatever padding the new turn needs; on CPU with short replies
the re-read prompt costs little next to the sampling).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline import log
from pipeline.generation import UNSHAPED, stop_ids, turn_end_id
from pipeline.tools import ImageStore, ToolBox, ToolResult, tool_name

BUDGET_MESSAGE = "tool call budget exhausted"
POLICY, TOOL = 1, 2  # what put each reply token in: the policy's sampling, or a tool result (and the template)
_warned: set[str] = set()


@dataclass
class ToolRollout:
    """One batch of replies with tool calls. B: rows, P: the longest prompt (the others left-padded to it),
    R: the longest reply (the others right-padded with pad). A reply is assistant turns and tool turns in order."""

    sequences: torch.Tensor        # (B, P + R) long: prompt then reply token ids
    attention_mask: torch.Tensor   # (B, P + R) long: 0 on left padding and after the reply's end, 1 elsewhere
    context_length: int            # P
    replies: torch.Tensor          # (B, R) long: reply token ids (policy and tool tokens), pad after the end
    mask: torch.Tensor             # (B, R) float: 1 only on tokens the policy generated (incl. each turn's end-of-turn)
    tool_mask: torch.Tensor        # (B, R) float: 1 on tokens inserted from tool results (incl. the template's headers)
    ended: torch.Tensor            # (B,) bool: finished with a final answer (a turn without calls, ended by EOS)
    calls: list = field(default_factory=list)   # (B,) list of ToolResult per row, in call order
    turns: list = field(default_factory=list)   # (B,) list of message dicts per row: assistant and tool turns
    #   (a turn's calls as parsed: rendering them again may differ from the sampled text; the ids are what count)
    final: list = field(default_factory=list)   # (B,) str: the last assistant turn's text
    texts: list = field(default_factory=list)   # (B,) str: the whole decoded reply, what a reward model reads


def tool_message(result) -> dict:
    """The `tool` chat message of one result: its content, or its error when it has no content."""
    content = result.content or (f"error: {result.error}" if result.error else "")
    return {"role": "tool", "name": result.name, "content": content}


def assistant_message(content: str, calls) -> dict:
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [{"type": "function", "function": {"name": c.name or "",
                                                                   "arguments": c.arguments or {}}} for c in calls]
    return message


def budget_result(call):
    """The result of a call over max_tool_calls: not executed, an error the policy reads."""
    return ToolResult(name=call.name, arguments=call.arguments, valid=False, ok=False, content=BUDGET_MESSAGE,
                      error=BUDGET_MESSAGE, image=None, seconds=0.0)


def tool_turn_text(tokenizer, conversation: list[dict], tool_messages: list[dict], tools=None) -> str:
    """The text the chat template puts after the last assistant turn's end-of-turn token (the last message of
    `conversation`) up to and including the next assistant header, given the tool messages in between.

    Generic: render(conversation + tools' messages, generation prompt)[len(render(conversation)):], preceded by what
    the template writes after the end-of-turn token of the last assistant turn (`\\n` for ChatML). If the template
    is not prefix-preserving for this conversation, falls back to ChatML's tool turn (and warns once).
    """
    def render(messages, generation_prompt):
        return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    before = render(conversation, False)
    after = render(conversation + tool_messages, True)
    eos = tokenizer.convert_ids_to_tokens(turn_end_id(tokenizer))  # the template's end of turn (ChatML: the eos)
    end = before.rfind(eos) if eos else -1
    if end >= 0 and after.startswith(before):
        return before[end + len(eos):] + after[len(before):]
    if "prefix" not in _warned:
        _warned.add("prefix")
        log.warning("the chat template is not prefix-preserving for tool turns (rendering the conversation with the "
                    "tool results changed its earlier text); using ChatML's tool turn instead")
    return "\n" + "".join(f"<|im_start|>tool\n<tool_response>\n{m['content']}\n</tool_response><|im_end|>\n"
                          for m in tool_messages) + "<|im_start|>assistant\n"


def left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        att[i, width - len(r):] = 1
    return ids.to(device), att.to(device)


@torch.no_grad()
def generate_with_tools(policy, tokenizer, prompts_ids: list[list[int]], messages: list[list[dict]], toolbox, *,
                        max_new_tokens: int, max_tool_calls: int, max_total_tokens: int, do_sample: bool = True,
                        temperature: float = 1.0, top_p: float = 1.0, device="cpu", parse=None,
                        engine=None) -> ToolRollout:
    """Sample one reply per prompt, running the tools the policy calls (see the module docstring).

    `prompts_ids[i]` are the ids of `messages[i]` rendered with the generation prompt (and `toolbox.schemas()`);
    `messages` is used only to render the tool turns. `toolbox` may also be a list, one per row (prompts that
    offer different tools); None in it: the row was offered no tools, and its reply is one turn, never parsed for
    calls (as a reply sampled without tools). `max_new_tokens` bounds each assistant turn,
    `max_total_tokens` the whole reply (tool tokens included), `max_tool_calls` the calls per reply: a call past it
    is not run, gets the tool message BUDGET_MESSAGE, and the row stops. A row stops (ended=False) when a turn runs
    out of tokens before its end-of-turn. A row that stops keeps the tool messages of its last turn in `turns` and
    `calls` for the record, but their tokens are not appended (no policy token follows them): every reply ends
    on a policy token. `parse(text) -> (content, [ToolCall])` reads a turn's text; by default the tokenizer's own
    format is read (pipeline/tool_formats.py: its response schema, or our `<tool_call>` parser for our template).
    With `engine` (pipeline/vllm_engine.py, holding the policy's weights) vLLM samples each round's turns instead.
    """
    from pipeline.tool_formats import call_reader

    read = call_reader(tokenizer, parse)
    stops = stop_ids(tokenizer, policy)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    B = len(prompts_ids)
    boxes = list(toolbox) if isinstance(toolbox, (list, tuple)) else [toolbox] * B
    reply: list[list[int]] = [[] for _ in range(B)]
    source: list[list[int]] = [[] for _ in range(B)]  # POLICY or TOOL per reply token
    calls: list[list] = [[] for _ in range(B)]
    turns: list[list[dict]] = [[] for _ in range(B)]
    final, ended, n_calls = [""] * B, [False] * B, [0] * B
    active = [i for i in range(B) if max_total_tokens > 0]
    was_training = policy.training
    policy.eval()
    try:
        while active:
            room = {i: max_total_tokens - len(reply[i]) for i in active}
            contexts = [list(prompts_ids[i]) + reply[i] for i in active]
            turn_tokens = min(max_new_tokens, max(room.values()))
            if engine is not None:
                new_rows = engine.sample(contexts, stops=stops, max_new_tokens=turn_tokens, do_sample=do_sample,
                                         temperature=temperature, top_p=top_p)
            else:
                ids, att = left_pad(contexts, pad, device)
                out = policy.generate(input_ids=ids, attention_mask=att, max_new_tokens=turn_tokens,
                                      do_sample=do_sample, temperature=temperature if do_sample else None,
                                      top_p=top_p if do_sample else None, top_k=0 if do_sample else None,
                                      eos_token_id=stops, pad_token_id=pad, use_cache=True, **UNSHAPED)
                new_rows = out[:, ids.shape[1]:].tolist()
            pending = {}  # row -> (its calls' results, or None where a call is to run, the calls, budget exhausted)
            for i, row in zip(active, new_rows):
                end = next((k for k, t in enumerate(row) if t in stops), None)
                turn = row if end is None else row[:end + 1]  # pads only ever follow the end-of-turn
                turn = turn[:room[i]]
                context = list(prompts_ids[i]) + reply[i]  # what the turn followed: the schema reads its prompt
                reply[i] += turn
                source[i] += [POLICY] * len(turn)
                done = bool(turn) and turn[-1] in stops
                text = tokenizer.decode(turn[:-1] if done else turn, skip_special_tokens=True)
                final[i] = text.strip()
                content, parsed = (read(turn, context, boxes[i].schemas()) if done and boxes[i] is not None
                                   else (text, []))
                turns[i].append(assistant_message(content if parsed else text, parsed))
                if not done:  # out of tokens within the turn, or of the reply's budget
                    continue
                if not parsed:  # the final answer
                    ended[i] = True
                    continue
                results, exhausted = [], False
                for call in parsed:
                    if n_calls[i] >= max_tool_calls:
                        results.append(budget_result(call))
                        exhausted = True
                    else:
                        results.append(None)
                        n_calls[i] += 1
                pending[i] = (results, parsed, exhausted)
            # every row's calls of this round at once, per toolbox: the image tool draws them in one batch
            to_run = [(i, k) for i, (results, _, _) in pending.items() for k, r in enumerate(results) if r is None]
            for box in {id(boxes[i]): boxes[i] for i, _ in to_run}.values():
                mine = [(i, k) for i, k in to_run if boxes[i] is box]
                calls_to_run = [pending[i][1][k] for i, k in mine]
                ran = (box.call_many(calls_to_run) if hasattr(box, "call_many")
                       else [box.call(c) for c in calls_to_run])
                for (i, k), result in zip(mine, ran):
                    pending[i][0][k] = result
            still = []
            for i, (results, _, exhausted) in pending.items():
                calls[i] += results
                tool_messages = [tool_message(r) for r in results]
                delta = tool_turn_text(tokenizer, list(messages[i]) + turns[i], tool_messages, boxes[i].schemas())
                turns[i] += tool_messages
                if exhausted:
                    continue
                delta_ids = tokenizer(delta, add_special_tokens=False)["input_ids"]
                if len(reply[i]) + len(delta_ids) >= max_total_tokens:  # no room left for the policy's next token
                    continue
                reply[i] += delta_ids
                source[i] += [TOOL] * len(delta_ids)
                still.append(i)
            active = still
    finally:
        policy.train(was_training)
    return pack(tokenizer, prompts_ids, reply, source, ended, calls, turns, final, pad, device)


def pack(tokenizer, prompts_ids, reply, source, ended, calls, turns, final, pad, device) -> ToolRollout:
    """Left-padded prompts and right-padded replies into one ToolRollout."""
    prompts, prompt_att = left_pad([list(p) for p in prompts_ids], pad, device)
    B, R = len(reply), max([len(r) for r in reply] + [1])
    replies = torch.full((B, R), pad, dtype=torch.long)
    kinds = torch.zeros((B, R), dtype=torch.long)
    for i, (r, s) in enumerate(zip(reply, source)):
        replies[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        kinds[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    replies, kinds = replies.to(device), kinds.to(device)
    texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in reply]
    return ToolRollout(sequences=torch.cat([prompts, replies], 1),
                       attention_mask=torch.cat([prompt_att, (kinds > 0).long()], 1),
                       context_length=prompts.shape[1], replies=replies, mask=(kinds == POLICY).float(),
                       tool_mask=(kinds == TOOL).float(), ended=torch.tensor(ended, device=device),
                       calls=calls, turns=turns, final=final, texts=texts)


class OfferedTools:
    """The tools one prompt offers (the schemas it was rendered with), run by the stage's ToolBox, which checks each
    call against the recipe's schema before running it."""

    def __init__(self, box, schemas: list[dict]):
        self.box, self._schemas = box, schemas
        self.names = [tool_name(s) for s in schemas]

    def schemas(self) -> list[dict]:
        return self._schemas

    def _refused(self, call) -> ToolResult | None:
        if call.error is None and call.name not in self.names:
            error = f"invalid: unknown tool {call.name!r} (tools: {', '.join(self.names)})"
            return ToolResult(call.name, call.arguments, False, False, error[:self.box.max_chars], error, None, 0.0)
        return None

    def call(self, call) -> ToolResult:
        return self._refused(call) or self.box.call(call)

    def call_many(self, calls: list) -> list[ToolResult]:
        """As `call` for each, the offered ones through the ToolBox's batch (one diffusion batch per round)."""
        results = [self._refused(c) for c in calls]
        todo = [i for i, r in enumerate(results) if r is None]
        for i, result in zip(todo, self.box.call_many([calls[i] for i in todo]) if todo else []):
            results[i] = result
        return results


def offered_views(box, offers: list[list[dict] | None]) -> list[OfferedTools | None]:
    """One OfferedTools per row (None where it offers none), shared by rows offering the same schemas."""
    views = {}
    for offer in filter(None, offers):
        views.setdefault(json.dumps(offer, sort_keys=True), OfferedTools(box, offer))
    return [views[json.dumps(o, sort_keys=True)] if o else None for o in offers]


def stage_toolbox(recipe, folder: Path, rank: int = 0, save_gallery: bool = False) -> tuple[ToolBox, ImageStore]:
    """The recipe's tools for a stage writing into `folder`: drawn images go to <folder>/images/ (one folder per
    process: ids are per store), with the world's gallery under ids "1".."200" when `world_gallery` is set (in
    memory only, as `tool_world.gallery()` draws it again; `save_gallery`: saved with the others, so a report can
    show the images that were read)."""
    images = Path(folder) / ("images" if rank == 0 else f"images-rank{rank}")
    store = ImageStore(None)
    if recipe.tools.world_gallery:
        from pipeline.tool_world import register_gallery

        store.restart(images if save_gallery else None)
        register_gallery(store)
    store.restart(images)
    return recipe_toolbox(recipe, store), store


def recipe_toolbox(recipe, store) -> ToolBox:
    """The recipe's tools (tools_from_config), drawing into `store`; a line refusing them names the override that set
    tools.tools, if one did, else the recipe file."""
    import dataclasses

    from pipeline.tools import tools_from_config

    return tools_from_config(dataclasses.asdict(recipe.tools), run_root=recipe.run_dir, store=store,
                             where=str(recipe.path), recipe=recipe)
