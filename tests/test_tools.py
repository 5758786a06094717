"""Tools the policy calls (pipeline/tools.py, pipeline/tool_calls.py): parsing `<tool_call>` blocks, schema checks
that keep bad calls from running, timeouts (threads, and subprocesses that are killed), and the recipe backends on a
tiny untrained diffusers pipeline and an untrained judge."""

import json
import os
import re
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import images
from pipeline.cli import PipelineError
from pipeline.image_judge import ImageJudge, _net
from pipeline.tools import (ImageStore, Tool, ToolBox, ToolCall, ToolOutput, parse_tool_calls, tools_from_config)
from test_diffusion import TINY_TEXT, TINY_UNET

CALL = '<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


def counting_tool(name="echo", schema_props=None, required=("text",), fn=None):
    """A tool whose runs are counted in `tool.calls`."""
    calls = []
    props = schema_props or {"text": {"type": "string"}}

    def run(args):
        calls.append(args)
        return fn(args) if fn else f"echo {args['text']}"

    tool = Tool(name, {"type": "function", "function": {"name": name, "description": "test",
                "parameters": {"type": "object", "properties": props, "required": list(required)}}}, run)
    tool.calls = calls
    return tool


# ---------------------------------------------------------------------------------------------- parsing


def test_parse_one_call_with_text_before():
    text, calls = parse_tool_calls('Let me draw it.\n' + CALL.format(name="draw_image", args='{"prompt": "a 7"}'))
    assert text == "Let me draw it."
    assert [(c.name, c.arguments, c.error) for c in calls] == [("draw_image", {"prompt": "a 7"}, None)]
    assert calls[0].text == '{"name": "draw_image", "arguments": {"prompt": "a 7"}}'


def test_parse_two_calls_in_order_and_aliases():
    text, calls = parse_tool_calls(CALL.format(name="a", args='{"x": 1}') + "\n"
                                   + '<tool_call>\n{"name": "b", "parameters": {"y": 2}}\n</tool_call>\n'
                                   + '<tool_call>{"name": "c", "arguments": "{\\"z\\": 3}"}</tool_call> done')
    assert text == "done"
    assert [(c.name, c.arguments, c.error) for c in calls] == [("a", {"x": 1}, None), ("b", {"y": 2}, None),
                                                               ("c", {"z": 3}, None)]
    assert parse_tool_calls("no calls here ") == ("no calls here", [])


@pytest.mark.parametrize("body, error", [
    ('{"name": "a", "arguments": {"x": 1}', "bad JSON"),
    ('{"arguments": {"x": 1}}', "no tool name"),
    ('{"name": "a", "arguments": [1, 2]}', "arguments must be a JSON object, got list"),
    ('{"name": "a", "arguments": "{not json"}', "arguments must be a JSON object, got a string that is not JSON"),
    ('["a"]', "expected a JSON object"),
])
def test_parse_errors_say_why(body, error):
    _, calls = parse_tool_calls(f"<tool_call>\n{body}\n</tool_call>")
    assert len(calls) == 1 and error in calls[0].error and calls[0].text == body


def test_unclosed_final_call_is_an_error():
    text, calls = parse_tool_calls('ok ' + CALL.format(name="a", args="{}") + ' <tool_call>\n{"name": "b", "argu')
    assert text == "ok" and [c.error for c in calls][0] is None
    assert calls[1].error.startswith("no </tool_call>") and "bad JSON" in calls[1].error
    _, calls = parse_tool_calls('<tool_call>{"name": "b", "arguments": {}}')  # complete JSON, still unclosed
    assert calls[0].name == "b" and calls[0].error == "no </tool_call>"


# ---------------------------------------------------------------------------------------------- running


@pytest.mark.parametrize("args, error", [
    ("{}", "invalid: 'text' is a required property"),
    ('{"text": 5}', "invalid: text: 5 is not of type 'string'"),
    ('{"text": "hi", "loud": true}', "invalid: Additional properties are not allowed ('loud' was unexpected)"),
])
def test_calls_that_break_the_schema_are_never_run(args, error):
    tool = counting_tool()
    box = ToolBox([tool])
    text, results = box.run_text(CALL.format(name="echo", args=args))
    (r,) = results
    assert (r.valid, r.ok, r.error, r.content) == (False, False, error, error)
    assert tool.calls == []  # never executed
    r = box.call(parse_tool_calls(CALL.format(name="echo", args='{"text": "hi"}'))[1][0])
    assert (r.valid, r.ok, r.content, r.error) == (True, True, "echo hi", None) and tool.calls == [{"text": "hi"}]


def test_unknown_tools_and_unparsed_calls_are_invalid_and_not_run():
    tool = counting_tool()
    box = ToolBox([tool])
    _, results = box.run_text(CALL.format(name="nope", args="{}") + '<tool_call>{"name": "echo"')
    assert [r.valid for r in results] == [False, False] and tool.calls == []
    assert results[0].error == "invalid: unknown tool 'nope' (tools: echo)"
    assert results[1].error.startswith("invalid: no </tool_call>")


def test_a_call_nested_past_pythons_stack_is_an_invalid_call_not_a_crash():
    # json.loads raises RecursionError (not JSONDecodeError) on ~1,000 nested brackets: a sampled reply can hold them
    tool = counting_tool()
    box = ToolBox([tool])
    deep = "[" * 5000 + "]" * 5000
    for body in (deep, '{"name": "echo", "arguments": ' + deep + "}", '{"name": "echo", "arguments": "' + deep + '"}'):
        text, results = box.run_text(f"before <tool_call>{body}</tool_call>")
        assert text == "before" and len(results) == 1 and not results[0].valid and tool.calls == []
    assert [r.error for r in box.run_text(f"<tool_call>{deep}</tool_call>")[1]] == ["invalid: bad JSON (nested too "
                                                                                   "deeply)"]


def test_exceptions_become_errors_and_long_content_is_cut():
    def fail(args):
        raise ValueError("bad text\nsecond line")

    box = ToolBox([counting_tool(fn=fail), counting_tool("long", fn=lambda a: ToolOutput("x" * 1000, image="3"))],
                  max_chars=50)
    r = box.call(ToolCall("echo", {"text": "hi"}, "", None))
    assert (r.valid, r.ok, r.error) == (True, False, "error: ValueError: bad text")
    r = box.call(ToolCall("long", {"text": "hi"}, "", None))
    assert r.ok and len(r.content) == 50 and r.content.endswith("…") and r.image == "3"


def test_slow_in_process_tool_times_out_and_the_next_call_waits_for_it():
    box = ToolBox([counting_tool("slow", fn=lambda a: time.sleep(float(a["text"])) or "slept")], timeout_s=0.5)
    start = time.monotonic()
    r = box.call(ToolCall("slow", {"text": "2"}, "", None))
    assert time.monotonic() - start < 1.5
    assert (r.valid, r.ok, r.error) == (True, False, "timeout after 0.5 s")
    r = box.call(ToolCall("slow", {"text": "0"}, "", None))  # the first still sleeps, holding the tool
    assert r.error == "timeout after 0.5 s (its previous call is still running)"
    time.sleep(1.2)
    assert box.call(ToolCall("slow", {"text": "0"}, "", None)).ok


def test_loading_a_tool_is_not_timed():
    loaded = []
    tool = counting_tool()
    tool.setup = lambda: time.sleep(1) or loaded.append(1)
    box = ToolBox([tool], timeout_s=0.5)
    assert [box.call(ToolCall("echo", {"text": t}, "", None)).ok for t in "ab"] == [True, True] and loaded == [1]


# ---------------------------------------------------------------------------------------------- python tools


@pytest.fixture()
def user_module(tmp_path):
    (tmp_path / "usertools.py").write_text(textwrap.dedent('''
        import os, time

        def add(a: int, b: int) -> int:
            """Add two numbers.

            Args:
                a: the first number
                b: the second number
            """
            print("noise on stdout")
            with open(os.environ["TOOL_LOG"], "a") as f:
                f.write("ran\\n")
            return a + b

        def nap(seconds: float, pid_file: str) -> str:
            """Sleep.

            Args:
                seconds: how long
                pid_file: where to write the process id
            """
            open(pid_file, "w").write(str(os.getpid()))
            time.sleep(seconds)
            return "awake"

        def boom(x: int) -> int:
            """Fail.

            Args:
                x: anything
            """
            raise ValueError(f"boom {x}")

        def undocumented(x):
            return x
    '''))
    return tmp_path


def python_box(folder, names, timeout_s=30, allow_code=True):
    tools = [{"name": n, "backend": "python", "function": f"usertools:{n}"} for n in names]
    return tools_from_config({"timeout_s": timeout_s, "allow_code": allow_code, "tools": tools},
                             run_root=folder, store=ImageStore(None), where=str(folder / "recipe.yaml"))


def test_python_tools_run_in_a_subprocess_with_checked_arguments(user_module, monkeypatch):
    log = user_module / "ran.txt"
    monkeypatch.setenv("TOOL_LOG", str(log))
    box = python_box(user_module, ["add", "boom"])
    add = box.tools["add"].schema["function"]
    assert add["description"] == "Add two numbers." and add["parameters"]["required"] == ["a", "b"]
    _, (ok, bad, failed) = box.run_text(CALL.format(name="add", args='{"a": 2, "b": 3}')
                                        + CALL.format(name="add", args='{"a": 2, "b": "3"}')
                                        + CALL.format(name="boom", args='{"x": 4}'))
    assert (ok.ok, ok.content) == (True, "5")  # the function's own print does not leak into the answer
    assert (bad.valid, bad.error) == (False, "invalid: b: '3' is not of type 'integer'")
    assert (failed.valid, failed.ok, failed.error) == (True, False, "error: ValueError: boom 4")
    assert log.read_text() == "ran\n"  # the call that broke the schema never ran


def test_slow_python_tool_is_killed_at_the_timeout(user_module):
    box = python_box(user_module, ["nap"], timeout_s=2)
    pid_file = user_module / "pid"
    start = time.monotonic()
    r = box.call(ToolCall("nap", {"seconds": 60, "pid_file": str(pid_file)}, "", None))
    assert time.monotonic() - start < 10 and r.error == "timeout after 2 s" and not r.ok
    pid = int(pid_file.read_text())
    for _ in range(50):  # the process is gone (killed, not left sleeping)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the tool's process {pid} is still alive")


def test_python_tools_need_allow_code_and_a_usable_function(user_module):
    with pytest.raises(PipelineError, match=r"recipe.yaml: tools.tools\[0\].backend: 'python' runs code .*"
                                            r"allow_code: true"):
        python_box(user_module, ["add"], allow_code=False)
    for function, error in [("usertools", "is not module:function"),
                            ("usertools:undocumented", "DocstringParsingException"),
                            ("missing_module:f", "ModuleNotFoundError")]:
        with pytest.raises(PipelineError, match=r"tools.tools\[0\].function: ") as err:
            tools_from_config({"allow_code": True, "tools": [{"name": "f", "backend": "python", "function": function}]},
                              run_root=user_module, store=ImageStore(None), where=str(user_module / "recipe.yaml"))
        assert error in str(err.value) and "\n" not in str(err.value)


def test_check_makes_the_python_tools_as_the_stages_do(user_module):
    """`run.py --check` said ok to a python tool whose schema cannot be made; eval then stopped on it (exit 2)."""
    from conftest import run_cli, tiny_recipe

    tools = {"allow_code": True, "tools": [{"name": "add", "backend": "python", "function": "usertools:add"},
                                           {"name": "u", "backend": "python", "function": "usertools:undocumented"}]}
    recipe = tiny_recipe(user_module, tools=tools, eval={"checkpoints": ["model"]},
                         ppo={"init_from": "model", "reward_model": "model"})
    proc = run_cli(["pipeline/run.py", recipe, "--check", "--only", "ppo,eval"], cwd=user_module)
    # ppo and eval both run the tools: the broken one is one error, not one per stage
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
    # (eval's default tool prompts, world:tool_eval, also offer draw_image, which these tools lack: its own line)
    errors = [line.strip() for line in proc.stdout.splitlines() if "error: " in line and "tools.tools" in line]
    assert len(errors) == 1 and f"{recipe}: tools.tools[1].function: cannot make a tool of 'usertools:undocumented'" \
        in errors[0] and "DocstringParsingException" in errors[0], errors
    assert not (user_module / "runs").exists()


# ---------------------------------------------------------------------------------------------- image tools


def save_tiny_image_stage(folder: Path) -> None:
    """A `diffusion` stage folder: a tiny untrained text-to-image pipeline and an untrained judge in judge/."""
    torch.manual_seed(0)
    pipe = images.build_pipeline(TINY_UNET, TINY_TEXT, {"num_train_timesteps": 10})
    pipe.save_pretrained(str(folder), safe_serialization=True)
    ImageJudge(_net(4), {"width": 4}).save(Path(folder) / "judge")


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A run folder whose `diffusion` stage holds a tiny untrained pipeline and an untrained judge."""
    root = tmp_path_factory.mktemp("run")
    save_tiny_image_stage(root / "diffusion")
    return root


def image_box(root, store, **draw):
    return tools_from_config({"timeout_s": 60, "tools": [
        {"name": "draw_image", "backend": "diffusion", "source": "diffusion", "steps": 3, "seed": 5, **draw},
        {"name": "read_image", "backend": "image_judge", "source": "diffusion"}]},
        run_root=root, store=store, where="recipe.yaml")


def test_draw_image_stores_a_png_and_read_image_reads_it_back(image_run, tmp_path):
    store = ImageStore(tmp_path / "images", prefix="r0-")
    box = image_box(image_run, store)
    assert [s["function"]["name"] for s in box.schemas()] == ["draw_image", "read_image"]
    _, (drawn,) = box.run_text(CALL.format(name="draw_image", args='{"prompt": "a large thin 7 on the left"}'))
    assert (drawn.ok, drawn.content, drawn.image) == (True, "Drew image r0-1.", "r0-1")
    assert store.get("r0-1").shape == (1, 16, 16)
    png = torch.tensor(np.asarray(Image.open(tmp_path / "images" / "r0-1.png")), dtype=torch.float32) / 255
    assert float((png - store.get("r0-1")[0]).abs().max()) <= 0.5 / 255
    assert store.meta("r0-1") == {"tool": "draw_image", "prompt": "a large thin 7 on the left", "seed": 5}
    # the tool draws what images.generate draws for the same caption and seed
    expected = images.generate(images.load_pipeline(str(image_run / "diffusion")), ["a large thin 7 on the left"],
                               steps=3, guidance=1.0, seed=5)[0]
    assert torch.allclose(store.get("r0-1"), expected, atol=1e-5)

    _, (read, missing) = box.run_text(CALL.format(name="read_image", args='{"image_id": "r0-1"}')
                                      + CALL.format(name="read_image", args='{"image_id": 12}'))
    assert read.ok and read.image == "r0-1"
    assert re.fullmatch(r"Image r0-1 shows a (small|large) (thin|thick) \d on the (left|right)\.", read.content)
    assert (missing.valid, missing.ok, missing.error) == (True, False, "no image 12")


def test_model_tools_run_on_the_calling_thread_and_a_draw_stops_at_its_deadline(image_run):
    """The draw and the judge run on the caller's thread (a worker thread's OpenMP team made the draw 2.7x slower);
    a draw past its time stops at the next sampler step with a timeout, and the tool is free for the next call."""
    store = ImageStore(None)
    box = image_box(image_run, store)
    seen = []
    box.setup()
    box.tools["draw_image"].setup().unet.register_forward_pre_hook(lambda *_: seen.append(threading.current_thread()))
    assert box.call(ToolCall("draw_image", {"prompt": "a 3"}, "", None)).ok
    assert box.call(ToolCall("read_image", {"image_id": "1"}, "", None)).ok
    assert len(seen) == 3 and set(seen) == {threading.current_thread()}  # 3 sampler steps, all on this thread

    slow = image_box(image_run, store, steps=10)  # the tiny scheduler's 10 timesteps
    slow.setup()
    steps = []
    slow.tools["draw_image"].setup().unet.register_forward_pre_hook(lambda *_: steps.append(1))
    slow.timeout_s = 1e-6  # past before the first step ends
    timed_out = slow.call(ToolCall("draw_image", {"prompt": "a 3"}, "", None))
    assert (timed_out.valid, timed_out.ok, timed_out.error) == (True, False, "timeout after 1e-06 s")
    assert len(steps) == 1  # it stopped after its first sampler step, not after all 10
    slow.timeout_s = 60
    assert slow.call(ToolCall("draw_image", {"prompt": "a 3"}, "", None)).ok and len(steps) == 11  # nothing holds it


def test_drawing_is_reproducible_and_batches_draw_what_single_calls_draw(image_run):
    prompts = ["a 3", "a small thick 8 on the right", "a 3"]
    calls = [ToolCall("draw_image", {"prompt": p}, "", None) for p in prompts]
    one_by_one, batched = ImageStore(None), ImageStore(None)
    image_box(image_run, one_by_one).call(calls[0])  # image "1": the first call of a first box
    box = image_box(image_run, one_by_one)
    singles = [box.call(c) for c in calls]  # "2", "3", "4" from a second box
    results = image_box(image_run, batched).call_many(calls + [ToolCall("draw_image", {}, "", None)])
    assert [r.image for r in singles] == ["2", "3", "4"] and [r.image for r in results[:3]] == ["1", "2", "3"]
    assert results[3].valid is False and len(batched) == 3
    for r, s in zip(results, singles):
        assert torch.allclose(batched.get(r.image), one_by_one.get(s.image), atol=1e-4)
    # call k is seeded seed + k: a new box repeats the first box's images, the same prompt twice differs
    assert torch.equal(one_by_one.get("1"), one_by_one.get("2"))
    assert not torch.allclose(batched.get("1"), batched.get("3"))


def test_bad_tool_configs_are_one_line_errors(image_run):
    def config(tools, **section):
        return {"tools": tools, **section}

    cases = [
        (config([{"name": "x", "backend": "magic"}]), r"tools.tools\[0\].backend: 'magic' is not one of"),
        (config([{"backend": "diffusion", "source": "diffusion"}]), r"tools.tools\[0\].name: missing"),
        (config([{"name": "x", "backend": "image_judge"}]), r"tools.tools\[0\].source: missing"),
        (config([{"name": "x", "backend": "diffusion", "source": "sft"}]), r"tools.tools\[0\].source: 'sft' is not a "
                                                                           r"stage folder .*run that stage first"),
        (config([{"name": "x", "backend": "image_judge", "source": "diffusion/judge"},
                 {"name": "x", "backend": "image_judge", "source": "diffusion"}]),
         r"tools.tools\[1\].name: 'x' is taken"),
        (config([{"name": "x", "backend": "diffusion", "source": "diffusion", "stpes": 3}]),
         r"unknown key 'stpes' in tools.tools\[0\] \(closest: steps\)"),
        (config([{"name": "x", "backend": "diffusion", "source": "diffusion", "steps": "many"}]),
         r"tools.tools\[0\].steps: expected int"),
        (config([{"name": "x", "backend": "image_judge", "source": str(image_run)}]),
         r"tools.tools\[0\].source: no image judge in"),
        (config([]), r"tools.tools: a non-empty list"),
        (config([{"name": "x", "backend": "image_judge", "source": "diffusion"}], timeout=3),
         r"unknown key 'timeout' in tools \(closest: timeout_s\)"),
    ]
    for section, pattern in cases:
        with pytest.raises(PipelineError, match=r"^my.yaml: " + pattern) as err:
            tools_from_config(section, run_root=image_run, store=ImageStore(None), where="my.yaml")
        assert "\n" not in str(err.value)


def test_image_store_new_ids_skip_ids_given_explicitly():
    """A gallery registered under ids "1".."3" keeps them; drawn images get the next free ids."""
    import torch

    store = ImageStore(None)
    for i in ("1", "2", "3"):
        store.add(torch.zeros(1, 4, 4), {"gallery": True}, image_id=i)
    assert store.add(torch.ones(1, 4, 4)) == "4" and store.meta("1") == {"gallery": True}
    with pytest.raises(ValueError):
        store.add(torch.zeros(1, 4, 4), image_id="2")


def test_image_store_restart_keeps_given_ids_and_numbers_new_images_again(tmp_path):
    """Online RL restarts the store before each step: drawn images are forgotten and numbered from the first free
    id again, the gallery stays, and images go to the new folder (made at its first image; None: memory only)."""
    store = ImageStore(None)
    store.add(torch.zeros(1, 4, 4), {"gallery": True}, image_id="1")
    assert store.add(torch.ones(1, 4, 4)) == "2" and store.add(torch.ones(1, 4, 4)) == "3"
    store.restart(tmp_path / "step-2")
    assert "1" in store and "2" not in store and len(store) == 1 and not (tmp_path / "step-2").exists()
    assert store.add(torch.ones(1, 4, 4), {"tool": "draw_image"}) == "2"
    assert sorted(p.name for p in (tmp_path / "step-2").iterdir()) == ["2.png", "images.jsonl"]
    store.restart(None)
    assert store.add(torch.ones(1, 4, 4)) == "2" and len(list(tmp_path.rglob("*.png"))) == 1


def test_a_restarted_toolbox_draws_again_what_its_call_k_drew(image_run):
    """ToolBox.restart(k): the next draw is seeded seed + k, whatever the box drew before (a resumed PPO step)."""
    calls = [ToolCall("draw_image", {"prompt": p}, "", None) for p in ("a 3", "a 5", "a 3")]
    store = ImageStore(None)
    box = image_box(image_run, store)
    first = [box.call(c).image for c in calls]
    box.restart(1)
    again = [box.call(c).image for c in calls[1:]]
    assert torch.equal(store.get(again[0]), store.get(first[1]))
    assert torch.equal(store.get(again[1]), store.get(first[2]))
    assert store.meta(again[1])["seed"] == 5 + 2


def test_recipe_tools_section_is_checked_when_the_recipe_loads(tmp_path):
    """A bad tool entry stops at load time with one line naming the recipe and the key, before any stage runs;
    stage folders are looked for only when a stage builds the tools."""
    from pipeline.cli import PipelineError
    from pipeline.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("tools:\n  world_gallery: true\n  tools:\n    - {name: draw_image, backend: diffusion, "
                      "source: diffusion}\n    - {name: read_image, backend: image_judge, source: diffusion}\n")
    loaded = load_recipe(recipe)
    assert [t["name"] for t in loaded.tools.tools] == ["draw_image", "read_image"] and loaded.tools.world_gallery
    paint = "tools.tools=[{name: a, backend: diffusion, source: x}, {name: b, backend: paint}]"
    with pytest.raises(PipelineError, match=re.escape(f"override '{paint}': tools.tools[1].backend: 'paint'")):
        load_recipe(recipe, [paint])  # the override that set the key, not the recipe file
    with pytest.raises(PipelineError, match=r"tools\.tools\[0\]\.backend: 'python' runs code"):
        load_recipe(recipe, ["tools.tools=[{name: a, backend: python, function: m:f}]"])
    for value, problem in ((".inf", "guidance must be a finite number"), (".nan", "guidance must be a finite number"),
                           ("1e999", "guidance must be a finite number")):
        with pytest.raises(PipelineError, match=rf"tools\.tools\[0\]\.{problem}"):  # drew NaN images, no error
            load_recipe(recipe, [f"tools.tools=[{{name: a, backend: diffusion, source: x, guidance: {value}}}]"])
    with pytest.raises(PipelineError, match=r"tools\.tools\[0\]\.seed must fit in 64 bits"):  # failed each draw
        load_recipe(recipe, [f"tools.tools=[{{name: a, backend: diffusion, source: x, seed: {10**30}}}]"])
    from pipeline.tool_rollout import stage_toolbox

    with pytest.raises(PipelineError, match="is not a stage folder"):
        stage_toolbox(loaded, tmp_path / "stage")
    assert load_recipe(tmp_path / "r.yaml", ["tools.tools=[]"]).tools.tools == []


def test_stages_that_run_tools_come_after_the_tools_stages_and_rerun_when_tools_change(tmp_path):
    """eval and ppo run the recipe's tools: the stages the tools load come first in the run order, and the tools'
    settings are part of the stage's fingerprint (another sampler step count reruns eval)."""
    from pipeline.fingerprints import hash_obj
    from pipeline.recipe import load_recipe
    from pipeline.run import dependencies, order_stages
    from pipeline.runs import stage_inputs

    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(
        "run: {output_dir: " + str(tmp_path / "runs") + "}\nmodel: {config: {model_type: llama}}\n"
        "tools:\n  world_gallery: true\n  tools:\n    - {name: draw_image, backend: diffusion, source: diffusion_dpo}\n"
        "    - {name: read_image, backend: image_judge, source: diffusion}\n"
        "eval: {checkpoints: [model]}\ndiffusion: {}\ndiffusion_dpo: {init_from: diffusion}\n")
    recipe = load_recipe(recipe_file)
    assert set(dependencies(recipe, "eval")) == {"diffusion_dpo", "diffusion"}
    order = order_stages(recipe)
    assert order.index("eval") > order.index("diffusion_dpo") > order.index("diffusion")
    inputs = stage_inputs(recipe, "eval", must_exist=False)
    assert {k: c["ref"] for k, c in inputs["checkpoints"].items() if k.startswith(("tools.", "image_judge"))} == {
        "tools.draw_image": "diffusion_dpo", "tools.read_image": "diffusion", "image_judge": "diffusion"}
    assert inputs["settings"]["tools"]["tools"][0]["source"] == "diffusion_dpo"
    other = load_recipe(recipe_file, ["tools.tools=[{name: draw_image, backend: diffusion, source: diffusion_dpo, "
                                      "steps: 20}, {name: read_image, backend: image_judge, source: diffusion}]"])
    assert hash_obj(stage_inputs(other, "eval", must_exist=False)) != hash_obj(inputs)
    no_tools = load_recipe(recipe_file, ["tools.tools=[]"])
    assert "tools" not in stage_inputs(no_tools, "eval", must_exist=False)["settings"]
    assert dependencies(no_tools, "eval") == [] and "tools" not in stage_inputs(recipe, "diffusion", False)["settings"]


def test_one_rule_finds_the_image_judge_for_eval_ppo_and_the_runner(image_run, tmp_path):
    """The judge that checks drawn images: ppo.image_judge when set, else the image_judge tool's source, else the
    diffusion tool's source. eval's plan, ppo's key and the runner's inputs all take it from `judge_source`."""
    from pipeline.eval_tools import plan
    from pipeline.recipe import load_recipe
    from pipeline.runs import stage_inputs
    from pipeline.tools import ToolsSection, judge_folder, judge_source

    draw = {"name": "draw_image", "backend": "diffusion", "source": "diffusion_dpo"}
    read = {"name": "read_image", "backend": "image_judge", "source": "diffusion"}
    assert judge_source(ToolsSection(tools=[draw, read])) == "diffusion"
    assert judge_source(ToolsSection(tools=[draw])) == "diffusion_dpo"
    assert judge_source(ToolsSection(tools=[draw, read]), "mine") == "mine"
    assert judge_source(ToolsSection(tools=[{"name": "f", "backend": "python", "function": "m:f"}])) is None
    assert judge_folder("diffusion", image_run, "k", "r.yaml") == image_run / "diffusion" / "judge"
    with pytest.raises(PipelineError, match=r"^r.yaml: k: no image judge in .*sft"):
        (image_run / "sft").mkdir(exist_ok=True)
        judge_folder("sft", image_run, "k", "r.yaml")

    # a recipe whose only image tool draws with the stage `painter` (not `diffusion`): eval, ppo and the runner all
    # check drawn images with painter/judge
    import shutil

    from pipeline import tool_world
    from pipeline.world import WorldConfig
    from pipeline.world_splits import build_split

    prompts = tmp_path / "draw_tasks.jsonl"
    prompts.write_text("".join(json.dumps({**r, "tools": json.dumps([tool_world.TOOL_SCHEMAS[0]])}) + "\n"
                               for r in build_split(WorldConfig(), "tool_eval")
                               if r["kind"] != "read"))
    run_dir = tmp_path / "runs" / "small"
    shutil.copytree(image_run / "diffusion", run_dir / "painter")
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(
        f"run: {{output_dir: {run_dir.parent}, name: small}}\nmodel: {{config: {{model_type: llama}}}}\n"
        "tools:\n  tools:\n    - {name: draw_image, backend: diffusion, source: painter}\n"
        f"eval: {{checkpoints: [model], tool_prompts: {prompts}}}\nppo: {{prompts: {prompts}}}\n")
    recipe = load_recipe(recipe_file)
    eval_plan = plan(recipe, recipe.keys("eval"))
    assert len(eval_plan.rows) > 0 and eval_plan.judge == run_dir / "painter" / "judge"
    assert recipe.keys("ppo").image_judge == "painter"
    assert stage_inputs(recipe, "eval", must_exist=False)["checkpoints"]["image_judge"]["ref"] == "painter"


def test_allow_code_turned_off_by_an_override_is_named_by_that_override(tmp_path):
    """The refusal of a python tool without tools.allow_code named whoever set tools.tools (the recipe file) when an
    override had turned allow_code off."""
    from pipeline.cli import PipelineError
    from pipeline.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("tools:\n  allow_code: true\n  tools:\n    - {name: add, backend: python, function: m:add}\n")
    assert load_recipe(recipe).tools.allow_code
    with pytest.raises(PipelineError, match=r"^override 'tools\.allow_code=false': tools\.tools\[0\]\.backend: "
                                            r"'python' runs code"):
        load_recipe(recipe, ["tools.allow_code=false"])
