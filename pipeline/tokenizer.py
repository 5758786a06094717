"""Tokenizer utilities: byte-level BPE training, the ChatML chat template, loading.

Conventions (shared by the whole pipeline)
------------------------------------------
* ``EOS = "<|im_end|>"`` closes every chat turn and is the tokenizer's ``eos_token``, so generation stops at the end
  of an assistant reply.
* ``PAD = "<|pad|>"`` is a dedicated padding token (never equal to EOS, so masking pads never masks the stop token).
* ``DOC_SEP = "<|endoftext|>"`` separates documents when packing pretraining text. It is *not* registered as the
  tokenizer's ``bos_token`` (same choice as Qwen2.5: ``bos_token`` is ``None``), so nothing ever gets auto-prepended
  to encodings, and TRL code paths that prepend ``bos_token_id`` when it is set (ORPO/CPO/online-DPO) stay no-ops.
  Use :func:`doc_sep_id` to get its id.
* ``CHAT_TEMPLATE`` is a ChatML template (Qwen2.5 style, without a default system prompt) whose assistant output
  (content, tool calls and the closing ``<|im_end|>``) is wrapped in ``{% generation %}`` so that
  ``apply_chat_template(..., return_dict=True, return_assistant_tokens_mask=True)`` and TRL's
  ``SFTConfig(assistant_only_loss=True)`` train on exactly the assistant reply plus its stop token.

Rendering::

    <|im_start|>system
    {system}

    # Tools
    ...<tools>
    {"type": "function", "function": {...}}
    </tools>...<|im_end|>
    <|im_start|>user
    {user}<|im_end|>
    <|im_start|>assistant
    {content}
    <tool_call>
    {"name": "f", "arguments": {"x": 1}}
    </tool_call><|im_end|>
    <|im_start|>tool
    <tool_response>
    {tool output}
    </tool_response><|im_end|>
    <|im_start|>assistant
    ...

Only ``{content}...</tool_call><|im_end|>`` of each assistant turn is inside the generation block; the
``<|im_start|>assistant\\n`` header (identical to the generation prompt) and the ``\\n`` after ``<|im_end|>`` are not.
Each ``tool`` message gets its own turn (the template is therefore prefix-preserving: rendering a conversation and
then appending messages never changes the tokens of the earlier part, which TRL's multi-turn tool code relies on).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = [
    "EOS",
    "PAD",
    "DOC_SEP",
    "IM_START",
    "TOOL_CALL_START",
    "TOOL_CALL_END",
    "TOOL_RESPONSE_START",
    "TOOL_RESPONSE_END",
    "SPECIAL_TOKENS",
    "TOOL_TOKENS",
    "CHAT_TEMPLATE",
    "RESPONSE_TEMPLATE",
    "DEFAULT_MODEL_MAX_LENGTH",
    "train_tokenizer",
    "rendered_chats",
    "apply_chat_format",
    "load_tokenizer",
    "has_generation_block",
    "doc_sep_id",
    "chat_template_problem",
    "trains_as_is",
]

EOS = "<|im_end|>"
PAD = "<|pad|>"
DOC_SEP = "<|endoftext|>"
IM_START = "<|im_start|>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
TOOL_RESPONSE_START = "<tool_response>"
TOOL_RESPONSE_END = "</tool_response>"

# Special tokens (skipped by ``decode(skip_special_tokens=True)``), in id order for a freshly trained tokenizer:
# DOC_SEP=0, EOS=1, PAD=2, IM_START=3.
SPECIAL_TOKENS = [DOC_SEP, EOS, PAD, IM_START]
# Tool tags are added tokens (never split) but NOT special, so they survive ``skip_special_tokens=True`` and a tool
# call can still be parsed from decoded generations (same as Qwen2.5).
TOOL_TOKENS = [TOOL_CALL_START, TOOL_CALL_END, TOOL_RESPONSE_START, TOOL_RESPONSE_END]

DEFAULT_MODEL_MAX_LENGTH = 2048

# ChatML (Qwen2.5-like) template. Notes:
# * transformers drops keys whose value is None before rendering, so `content=None` arrives as an *undefined*
#   attribute: the template never concatenates `message.content` with `+` (that raises on Undefined); it uses the
#   `render_content` macro, which also accepts OpenAI-style lists of {"type": "text", "text": ...} parts.
# * tool-call `arguments` may be a dict (rendered with `tojson`) or an already-serialised JSON string (kept as is).
CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- elif content is iterable and content is not mapping -%}"
    "{%- for part in content -%}"
    "{%- if part is string -%}{{- part -}}"
    "{%- elif part is mapping and part.type == 'text' -%}{{- part.text -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- elif content is defined and content is not none -%}{{- content -}}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    # ---- system turn (+ tools) ----
    "{%- if messages and messages[0].role == 'system' -%}"
    "{%- set system_message = render_content(messages[0].content) -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_message = none -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if system_message -%}{{- system_message + '\\n\\n' -}}{%- endif -%}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' -}}"
    "{%- elif system_message is not none -%}"
    "{{- '<|im_start|>system\\n' + system_message + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    # ---- conversation ----
    "{%- for message in loop_messages -%}"
    "{%- if message.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}"
    "{%- set content = render_content(message.content) -%}"
    "{{- content -}}"
    "{%- if message.tool_calls is defined and message.tool_calls -%}"
    "{%- for tool_call in message.tool_calls -%}"
    "{%- if tool_call.function is defined -%}{%- set tool_call = tool_call.function -%}{%- endif -%}"
    "{%- if content or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<tool_call>\\n{\"name\": ' + (tool_call.name | tojson) + ', \"arguments\": ' -}}"
    "{%- if tool_call.arguments is string -%}{{- tool_call.arguments -}}"
    "{%- elif tool_call.arguments is defined and tool_call.arguments is not none -%}"
    "{{- tool_call.arguments | tojson -}}"
    "{%- else -%}{{- '{}' -}}"
    "{%- endif -%}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>' -}}"
    "{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- elif message.role == 'tool' -%}"
    "{{- '<|im_start|>tool\\n<tool_response>\\n' + render_content(message.content) "
    "+ '\\n</tool_response><|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + render_content(message.content) + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Response parser for ``tokenizer.parse_response(completion, prefix=prompt)`` (transformers >= 5.13). TRL's
# GRPOTrainer(tools=...) needs one to parse tool calls out of generations; its built-in registry
# (trl.chat_template_utils.add_response_schema) only recognises known hub templates and raises on ours, so the
# tokenizer carries this (it is saved in tokenizer_config.json). Same as TRL's Qwen3 template minus <think>.
RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "tool_calls": {
            "open": TOOL_CALL_START,
            "close_pattern": r"</tool_call>\s*",
            "repeats": True,
            "content": "json",
            "transform": {"type": "function", "function": "{content}"},
        },
        "content": {
            "close_pattern": r"<\|im_end\|>\s*",
            "content": "text",
        },
    },
}


def _set_response_template(tokenizer: PreTrainedTokenizerBase) -> None:
    import copy

    tokenizer.response_template = copy.deepcopy(RESPONSE_TEMPLATE)


def has_generation_block(chat_template: str | dict | None) -> bool:
    """True if the template (or its ``default`` variant) has ``{% generation %}`` markers (same test as TRL)."""
    import re

    if isinstance(chat_template, dict):
        chat_template = chat_template.get("default")
    if not chat_template:
        return False
    return re.search(r"\{%-?\s*generation\s*-?%\}", chat_template) is not None


# End-of-text tokens that separate documents: ours (GPT-2's, Qwen's), Llama 3's, Gemma's, Llama 2's and Mistral's.
END_OF_TEXT = (DOC_SEP, "<|end_of_text|>", "<eos>", "</s>")


def doc_sep_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Id of the token that separates packed documents: the tokenizer's end-of-text token (END_OF_TEXT), never the
    chat turn end that its eos may be (Llama 3 Instruct's ``<|eot_id|>``, Gemma's ``<end_of_turn>``, ours after
    apply_chat_format); without one the eos of a tokenizer without a chat template (a base model's: it ends text),
    else the bos token (documents start with it), else the eos."""
    added = tokenizer.added_tokens_encoder  # special tokens, never a merge that happens to read the same
    for token in END_OF_TEXT:
        if token in added:
            return added[token]
    if not tokenizer.chat_template or tokenizer.bos_token_id is None:
        return tokenizer.eos_token_id
    return tokenizer.bos_token_id


def _batched(texts: Iterable[str], batch_size: int = 1000) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def rendered_chats(rows, chat_template: str = CHAT_TEMPLATE) -> list[str]:
    """Conversations (rows with `messages`, or `prompt` + `completion`, and optional `tools`, as pipeline.data loads
    them) as text, the way `chat_template` renders them for the model, tool schemas included: tokenizer training
    text, so the chat markup and the tools' JSON become tokens instead of single bytes."""
    from transformers.utils.chat_template_utils import render_jinja_template

    texts = []
    for row in rows:
        for messages in _conversations(row):
            texts += render_jinja_template(conversations=[messages], tools=_tools(row), chat_template=chat_template)[0]
    return texts


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
    show_progress: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a chat-ready ``PreTrainedTokenizerFast``.

    * ids 0..3 are the special tokens ``DOC_SEP, EOS, PAD, IM_START``; the 256 byte symbols follow, then merges; the
      tool tags (``TOOL_TOKENS``) are added tokens at the end of the vocabulary. ``vocab_size`` counts the special
      tokens and the byte alphabet (the four tool tags may push ``len(tokenizer)`` up to ``vocab_size + 4``); size the
      model's embedding with ``len(tokenizer)``.
    * ``eos_token=EOS``, ``pad_token=PAD``, ``bos_token=None``, ``unk_token=None`` (byte level: nothing is unknown);
      no token is added automatically by ``tokenizer(text)``.
    * ``chat_template=CHAT_TEMPLATE`` and ``response_template=RESPONSE_TEMPLATE`` (for ``parse_response``).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    # Digits are split into single tokens (as in Llama/Qwen): numbers are then compared and added digit by digit,
    # which a small model learns and generalizes; whole-number tokens would need a learned order over every number.
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    bpe.decoder = decoders.ByteLevel()
    # No post-processor: no BOS/EOS is ever inserted automatically (ByteLevel post-processor only adjusts offsets,
    # with trim_offsets=False it is a no-op; leaving it out keeps offsets exact for assistant masks).
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    bpe.train_from_iterator(_batched(texts), trainer=trainer)
    bpe.add_tokens([AddedToken(t, normalized=False, special=False) for t in TOOL_TOKENS])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS,
        pad_token=PAD,
        bos_token=None,
        unk_token=None,
        model_max_length=model_max_length,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    # Make IM_START special too (skipped when decoding with skip_special_tokens=True).
    tokenizer.add_special_tokens({"extra_special_tokens": [IM_START, DOC_SEP]}, replace_extra_special_tokens=False)
    _set_response_template(tokenizer)
    return tokenizer


def apply_chat_format(
    tokenizer: PreTrainedTokenizerBase, force: bool = False
) -> tuple[PreTrainedTokenizerBase, int]:
    """Make a (pretrained, e.g. hub) tokenizer use this pipeline's chat format. Modifies ``tokenizer`` in place.

    Adds the missing tokens (``IM_START``/``EOS`` as special tokens, the tool tags as plain added tokens, ``PAD`` if the
    tokenizer has no pad token or its pad token would equal the new eos), sets ``chat_template=CHAT_TEMPLATE``,
    ``response_template=RESPONSE_TEMPLATE`` and ``eos_token=EOS``.

    If the tokenizer already has a template with ``{% generation %}`` markers it is left untouched (returns 0 added)
    unless ``force=True``. A template without markers is replaced by ``CHAT_TEMPLATE``.

    Returns ``(tokenizer, n_added)``. If ``n_added > 0`` the caller MUST resize the model embeddings::

        tokenizer, n_added = apply_chat_format(tokenizer)
        if n_added:
            model.resize_token_embeddings(len(tokenizer))
        model.config.eos_token_id = tokenizer.eos_token_id          # and model.generation_config.eos_token_id
        model.config.pad_token_id = tokenizer.pad_token_id

    (``len(tokenizer)`` may be below the model's embedding size for hub models whose embeddings are padded; only
    resize when ``len(tokenizer) > embedding rows`` if you want to keep the padding.)
    """
    if not force and has_generation_block(tokenizer.chat_template):
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer, 0

    vocab = tokenizer.get_vocab()
    n_added = 0
    # The previous eos (e.g. "<|endoftext|>") stays a special token (skipped by skip_special_tokens) after the switch.
    special = [t for t in (IM_START, tokenizer.eos_token) if t and t != EOS and t not in tokenizer.all_special_tokens]
    special += [EOS] if EOS not in vocab else []
    if special:
        n_added += tokenizer.add_special_tokens({"extra_special_tokens": special}, replace_extra_special_tokens=False)
    tool = [t for t in TOOL_TOKENS if t not in vocab]
    if tool:
        n_added += tokenizer.add_tokens(tool, special_tokens=False)
    tokenizer.eos_token = EOS
    if tokenizer.pad_token is None or tokenizer.pad_token == EOS:
        n_added += tokenizer.add_special_tokens({"pad_token": PAD})
    tokenizer.chat_template = CHAT_TEMPLATE
    _set_response_template(tokenizer)
    return tokenizer, n_added


def load_tokenizer(
    name_or_path: str, trust_remote_code: bool = False, revision: str | None = None, **kwargs
) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` plus a guaranteed pad token (the eos token if the tokenizer has none).

    Does not change the chat template; call :func:`apply_chat_format` for hub tokenizers without a training template.
    """
    tokenizer = AutoTokenizer.from_pretrained(
        name_or_path, trust_remote_code=trust_remote_code, revision=revision, **kwargs
    )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"Tokenizer {name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def trains_as_is(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether assistant-only loss can train on the tokenizer's own template: it has ``{% generation %}`` markers, or
    TRL has a training version of it (Llama 3, Qwen 2.5 and 3, Gemma, Phi-3, ...: trl.chat_template_utils)."""
    if has_generation_block(tokenizer.chat_template):
        return True
    if not tokenizer.chat_template:
        return False
    from trl.chat_template_utils import get_training_chat_template

    try:
        get_training_chat_template(tokenizer)
    except ValueError:
        return False
    return True


def _tools(row) -> list[dict] | None:
    """A row's tool schemas (a list, or JSON text of one, as pipeline.data keeps them); None for none."""
    import json

    tools = row.get("tools")
    return json.loads(tools) if isinstance(tools, str) and tools else tools or None


def _conversations(row) -> list[list[dict]]:
    """A data row's conversations as the stages render them: messages, prompt + completion, prompt + each reply."""
    if row.get("messages"):
        return [row["messages"]]
    prompt = row.get("prompt")
    if not isinstance(prompt, list):
        return []  # plain text rows: no chat template
    replies = [row[k] for k in ("completion", "chosen", "rejected") if isinstance(row.get(k), list)]
    return [prompt + reply for reply in replies] or [prompt]


def chat_template_problem(tokenizer: PreTrainedTokenizerBase, rows, assistant_only: bool = False,
                          places: list[str] | None = None) -> str | None:
    """Why a template that is not ours cannot train on `rows` (messages, prompt/completion or preference rows, as
    pipeline.data loads them), or None: no template; a row it raises on (Mistral's and Gemma's refuse a system
    message or turns that do not alternate), by its place (`places`: where each row is from, e.g. `b.jsonl line 2`
    of a list of files; else its index, from 1); a first tool row whose tool schemas or calls it leaves out
    (a template without tool support trains on replies with the calls missing); for assistant-only loss, no
    `{% generation %}` markers and no training version of it in TRL. Our own template renders every row."""
    from jinja2 import TemplateError

    if tokenizer.chat_template == CHAT_TEMPLATE:
        return None
    if not tokenizer.chat_template:
        return "it has no chat template (a base model)"
    if assistant_only and not trains_as_is(tokenizer):
        return ("its chat template has no {% generation %} markers around assistant replies and TRL has no "
                "training version of it, so assistant-only loss cannot find the replies")
    tool_checked = False
    for i, row in enumerate(rows, 1):
        tools, place = _tools(row), places[i - 1] if places else f"row {i}"
        for messages in _conversations(row):
            try:
                text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
            except TemplateError as err:
                return f"{place}: its chat template refuses the row: {err}"
            calls = [(c.get("function") or c).get("name") for m in messages for c in m.get("tool_calls") or []]
            names = [(t.get("function") or t).get("name") for t in tools or []]
            if (calls or names) and not tool_checked:
                tool_checked = True
                left_out = [n for n in calls + names if n and n not in text]
                if left_out:
                    return (f"{place}: its chat template leaves out the row's tools or tool calls "
                            f"({', '.join(dict.fromkeys(left_out))}): it has no tool support")
    return None
