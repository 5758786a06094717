"""The package's shape as tested properties: no import cycles, stage scripts that never import each other, no
private helper imported across modules, no module too long to read, no recipe key missing from the README. The import
graph is pipeline/imports_graph.py's, the one a stage's code hash follows (imports inside functions count)."""

import ast
import re

from pipeline.imports_graph import PACKAGE, graph as import_graph, imports, module_aliases, modules
from pipeline.stages import STAGES

README = PACKAGE.parent / "README.md"
MAX_LINES = 450


def graph() -> dict[str, set[str]]:
    return import_graph(modules())


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles_in_the_package():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_stage_module_imports_another_stage_module():
    stage_modules = {spec.module.split(".")[1] for spec in STAGES.values()}
    edges = graph()
    bad = [f"{a} imports {b}" for a in stage_modules for b in edges.get(a, ()) if b in stage_modules]
    assert not bad, bad
    for spec in STAGES.values():  # the registry names stage classes by module: none of them is a stage script
        if spec.config_class and spec.config_class.startswith("pipeline."):
            assert spec.config_class.split(":")[0].split(".")[1] not in stage_modules, spec


def test_no_private_name_is_used_across_modules():
    trees = modules()
    names = set(trees)
    bad = []
    for name, tree in trees.items():
        for target, imported, line in imports(tree, names):
            if imported and imported.startswith("_") and not imported.startswith("__"):
                bad.append(f"{name}.py:{line} imports {target}.{imported}")
        aliases = module_aliases(tree, names)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{name}.py:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, bad


def test_no_module_is_too_long_to_read():
    long = {p.name: n for p in PACKAGE.glob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_stage_scripts_do_not_print_directly():
    """Stages log through pipeline.log (main process only, stage prefix, log.txt in the stage folder)."""
    trees = modules()
    stage_modules = {spec.module.split(".")[1] for spec in STAGES.values()}
    bad = [f"{name}.py:{node.lineno}" for name in stage_modules for node in ast.walk(trees[name])
           if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"]
    assert not bad, bad


def readme_sections(text: str) -> dict[str, str]:
    """The README's "Recipe reference" as {heading: its text, subsections included}; a heading also under its
    anchor (GitHub's: lower case, punctuation but - and _ dropped, spaces as -), which the README's links name."""
    start = text.index("\n## Recipe reference\n")
    end = text.index("\n## ", start + 1)
    lines = text[start:end].splitlines()
    heads = [(i, len(m.group(1)), m.group(2).strip()) for i, line in enumerate(lines)
             if (m := re.match(r"(#{2,6}) (.+)", line))]
    out = {}
    for n, (i, level, title) in enumerate(heads):
        stop = next((j for j, lv, _ in heads[n + 1:] if lv <= level), len(lines))
        body = "\n".join(lines[i:stop])
        out[title] = out[re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")] = body
    return out


def names_in(text: str) -> set[str]:
    """What the text names in backticks, outside fenced code blocks."""
    return set(re.findall(r"`([^`]+)`", re.sub(r"(?ms)^```.*?^```", "", text)))


def named(key: str, names: set[str]) -> bool:
    """`key` is named, itself or by a pattern such as `heldout_*`."""
    return key in names or any(n.endswith("*") and key.startswith(n[:-1]) for n in names)


def undocumented_keys(text: str) -> list[str]:
    """Every key a recipe accepts, from the code's own classes (recipe.GLOBAL_SECTIONS, recipe.stage_fields,
    tools.BACKEND_KEYS), that the README's "Recipe reference" does not name, in backticks, where it documents that
    key: a global section's under its heading (`tools`: each backend and its entry keys too); a stage's pipeline,
    global-batch and LoRA/quantization keys in the stage's row of the "Stage sections" table (LoRA/quantization: in
    that subsection); the keys of a config class of ours (ppo, diffusion, diffusion_dpo) under a heading the row links
    to. The fields of TRL's and transformers' config classes are documented by those libraries."""
    from pipeline.recipe import GLOBAL_SECTIONS, stage_fields
    from pipeline.tools import BACKEND_KEYS
    from pipeline.values import field_types

    sections = readme_sections(text)
    missing = []
    for section, get in GLOBAL_SECTIONS.items():
        names = names_in(sections.get(f"`{section}`", ""))
        keys = list(field_types(get()))  # what the recipe loader accepts in the section
        if section == "tools":
            keys += [k for backend, entry in BACKEND_KEYS.items() for k in (backend, *entry)]
        missing += [f"{section}.{k}" for k in keys if not named(k, names)]
    table = sections.get("Stage sections", "")
    for stage, spec in STAGES.items():
        row = next((line for line in table.splitlines() if line.startswith(f"| `{stage}` |")), "")
        if not row:
            missing.append(f"{stage}: no row in the Stage sections table")
        linked = names_in("".join(sections.get(a, "") for a in re.findall(r"\]\(#([\w-]+)\)", row)))
        ours = (spec.config_class or "").startswith("pipeline.")
        for k, (dest, _) in stage_fields(stage).items():
            where = {"keys": names_in(row), "training": names_in(row), "peft": names_in(table),
                     "config": linked if ours else None}[dest]
            if where is not None and not named(k, where):
                missing.append(f"{stage}.{k} ({dest})")
    return missing


def test_every_recipe_key_is_in_the_readme_recipe_reference():
    missing = undocumented_keys(README.read_text())
    assert not missing, f"recipe keys the README's Recipe reference does not name: {missing}"
