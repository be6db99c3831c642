"""The scripted coding-agent session of agent.py, shaped like opencode's requests.

A system prompt and 10 tools like a real agent's, then tool steps whose calls are fixed
(written here as if the model had made them) and whose results are real file contents and
command outputs built deterministically (source slices of Python's own `textwrap` and `shlex`,
cut by token count), so every server sees byte-identical requests, run after run.
"""

from __future__ import annotations

import inspect
import json
import shlex as shlex_mod
import textwrap as textwrap_mod

ROOT = "/home/dev/textkit"
USER = ("The shorten() helper in src/textkit/wrap.py drops the placeholder when the width is smaller than the "
        "placeholder itself, and test_shorten_tiny_width fails. Find the bug, fix it, and add a regression test.")
USER_2 = ("Add a `--width` option to the textkit CLI (src/textkit/cli.py) that is passed through to fill(); "
          "keep the default at 70 and document it in the README.")


def _fn(name: str, description: str, props: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": props, "required": required, "additionalProperties": False}}}


def _s(description: str) -> dict:
    return {"type": "string", "description": description}


def _n(description: str) -> dict:
    return {"type": "number", "description": description}


TOOLS = [
    _fn("bash", "Executes a bash command in a persistent shell session with an optional timeout. Use it for "
        "terminal operations like git, running tests, installing packages; do not use it to read, search or edit "
        "files (use the dedicated tools). Always quote paths that contain spaces. Output beyond 30000 characters "
        "is truncated.",
        {"command": _s("The command to execute"), "timeout": _n("Optional timeout in milliseconds (max 600000)"),
         "description": _s("Clear, concise description of what this command does in 5-10 words")},
        ["command", "description"]),
    _fn("read", "Reads a file from the local filesystem. The filePath must be absolute. By default it reads up to "
        "2000 lines from the start; give an offset and limit for long files. Lines are returned with line numbers "
        "(cat -n format). Read a file before editing it.",
        {"filePath": _s("The absolute path to the file to read"),
         "offset": _n("The line number to start reading from (0-based)"),
         "limit": _n("The number of lines to read (defaults to 2000)")},
        ["filePath"]),
    _fn("edit", "Performs an exact string replacement in a file. oldString must match the file's content exactly, "
        "including indentation, and be unique in the file unless replaceAll is set. Prefer editing existing files "
        "over writing new ones.",
        {"filePath": _s("The absolute path to the file to modify"), "oldString": _s("The text to replace"),
         "newString": _s("The text to replace it with (must differ from oldString)"),
         "replaceAll": {"type": "boolean", "description": "Replace all occurrences of oldString (default false)"}},
        ["filePath", "oldString", "newString"]),
    _fn("write", "Writes a file to the local filesystem, overwriting it if it exists. Read an existing file first. "
        "Never create documentation files unless asked.",
        {"filePath": _s("The absolute path to the file to write"), "content": _s("The content to write")},
        ["filePath", "content"]),
    _fn("grep", "Fast content search over the codebase with regular expressions. Returns matching file paths and "
        "lines, sorted by modification time. Filter files with include (e.g. \"*.py\").",
        {"pattern": _s("The regex pattern to search for in file contents"),
         "path": _s("The directory to search in (defaults to the working directory)"),
         "include": _s("File pattern to include in the search (e.g. \"*.js\", \"*.{ts,tsx}\")")},
        ["pattern"]),
    _fn("glob", "Fast file pattern matching that works with any codebase size. Returns matching file paths sorted "
        "by modification time.",
        {"pattern": _s("The glob pattern to match files against"),
         "path": _s("The directory to search in (defaults to the working directory)")},
        ["pattern"]),
    _fn("list", "Lists files and directories in a given path, skipping common build and cache directories.",
        {"path": _s("The absolute path to the directory to list"),
         "ignore": {"type": "array", "items": {"type": "string"}, "description": "Glob patterns to ignore"}},
        []),
    _fn("webfetch", "Fetches content from a URL and returns it as text, markdown or html.",
        {"url": _s("The URL to fetch content from"),
         "format": {"type": "string", "enum": ["text", "markdown", "html"], "description": "The format to return"},
         "timeout": _n("Optional timeout in seconds (max 120)")},
        ["url", "format"]),
    _fn("todowrite", "Creates and updates the structured task list of the session. Use it for tasks with three or "
        "more steps; mark one task in_progress at a time and complete tasks as soon as they are done.",
        {"todos": {"type": "array", "description": "The updated todo list", "items": {
            "type": "object", "required": ["content", "status", "priority", "id"], "properties": {
                "content": _s("Brief description of the task"),
                "status": {"type": "string", "enum": ["pending", "in_progress", "completed", "cancelled"]},
                "priority": {"type": "string", "enum": ["high", "medium", "low"]},
                "id": _s("Unique identifier for the todo item")}}}},
        ["todos"]),
    _fn("task", "Launches a sub-agent to handle a complex, multi-step task autonomously, such as an open-ended "
        "search across many files. The sub-agent returns one message with its result.",
        {"description": _s("A short (3-5 words) description of the task"),
         "prompt": _s("The task for the agent to perform"),
         "subagent_type": {"type": "string", "enum": ["general", "explore"], "description": "The agent to use"}},
        ["description", "prompt", "subagent_type"]),
]

_RULES = """\
# Tone and style
You should be concise, direct, and to the point. When you run a non-trivial bash command, explain what the command \
does and why you are running it, so that the user understands what you are doing (this matters most when the command \
makes changes to the user's system). Your output is displayed on a command line interface and rendered as \
GitHub-flavored markdown in a monospace font. Output text to communicate with the user; all text outside of tool use \
is displayed to the user. Only use tools to complete tasks, never bash or code comments to talk to the user. If you \
cannot or will not help with something, do not explain why at length; offer helpful alternatives if possible and keep \
the answer to one or two sentences. Minimize output tokens while keeping helpfulness, quality and accuracy. Answer the \
question directly, without elaboration, preamble or postamble, unless the user asks for detail. Avoid phrases such as \
"The answer is", "Here is the content of the file" or "Based on the information provided".

# Proactiveness
You are allowed to be proactive, but only when the user asks you to do something. Strike a balance between doing the \
right thing when asked, including taking actions and follow-up actions, and not surprising the user with actions you \
take without asking. If the user asks how to approach something, answer their question first and do not jump into \
changing files. Do not add code explanation summaries unless requested. After working on a file, just stop.

# Following conventions
When making changes to files, first understand the file's code conventions. Mimic code style, use existing libraries \
and utilities, and follow existing patterns. Never assume that a given library is available, even if it is well \
known: check that this codebase already uses it (look at neighbouring files, or the pyproject.toml, package.json, \
Cargo.toml and so on). When you create a new component, look at existing components first; consider framework \
choice, naming conventions, typing and other conventions. When you edit a piece of code, look at its surrounding \
context, especially its imports, to understand the choice of frameworks and libraries, then make the change in the \
most idiomatic way. Always follow security best practices: never introduce code that exposes or logs secrets and \
keys, and never commit secrets or keys to the repository.

# Doing tasks
The user will mostly ask you to perform software engineering tasks: solving bugs, adding functionality, refactoring \
code, explaining code, and more. For these tasks the following steps are recommended:
- Use the todowrite tool to plan the task if it needs several steps.
- Use the available search tools to understand the codebase and the user's query. Use the search tools extensively, \
both in parallel and sequentially.
- Implement the solution using all tools available to you.
- Verify the solution with the project's tests where possible. Never assume a specific test framework or test \
script: check the README or search the codebase to find the testing approach.
- When you have completed a task, you MUST run the lint and typecheck commands (for example ruff, mypy, npm run lint, \
npm run typecheck) if they were provided to you, to make sure your code is correct. If you cannot find the right \
command, ask the user for it, and suggest writing it to AGENTS.md so that you will know to run it next time.
NEVER commit changes unless the user explicitly asks you to. It is VERY IMPORTANT to only commit when explicitly \
asked, otherwise the user will feel that you are being too proactive.

# Tool usage policy
- When doing a file search, prefer the task tool to reduce context usage.
- You can call multiple tools in a single response. When several independent pieces of information are requested, \
batch your tool calls together for optimal performance. When making several bash calls, send them in one message \
to run them in parallel.
- Read a file with the read tool before editing it; the edit tool fails on a file that has not been read.
- Use grep and glob instead of grep, find or ls in bash; use read instead of cat, head or tail.
- Tool results and user messages may include <system-reminder> tags. They contain useful information and \
reminders; they are NOT part of the user's input or the tool result.

# Code references
When referencing specific functions or pieces of code, include the pattern `file_path:line_number` so that the user \
can easily navigate to the source code location. For example: "Clients are marked as failed in the \
`connectToServer` function in src/services/process.ts:712."
"""

_AGENTS_MD = """\
# textkit

Small text utilities (wrapping, shortening, dedenting, shell-style splitting) used by the company's CLI tools.

## Commands
- Tests: `python -m pytest -q` (all), `python -m pytest tests/test_wrap.py -x -q` (one file).
- Lint: `ruff check src tests`; format: `ruff format src tests`; types: `mypy src`.
- Build: `python -m build`; the wheel must stay pure Python with no dependencies.

## Conventions
- Python 3.10+, type hints on public functions, docstrings in the reStructuredText style of the standard library.
- Public API lives in `src/textkit/__init__.py`; anything not re-exported there is private.
- Every bug fix comes with a regression test named after the bug (`test_<function>_<case>`).
- Keep behaviour identical to the standard library's `textwrap` unless a test documents the difference.
"""


MODULES = ["__init__", "wrap", "fill", "shorten", "dedent", "indent", "split", "quote", "cli", "_compat"]
FILES = (["pyproject.toml", "README.md", "AGENTS.md"] + [f"src/textkit/{m}.py" for m in MODULES]
         + ["tests/conftest.py"] + [f"tests/test_{m}.py" for m in MODULES[1:9]])


def _tree() -> str:
    return "\n".join([f"{ROOT}/"] + [f"  {f}" for f in FILES])


def system_prompt() -> str:
    return (
        "You are opencode, an interactive CLI tool that helps users with software engineering tasks. Use the "
        "instructions below and the tools available to you to assist the user.\n\nIMPORTANT: Refuse to write code "
        "or explain code that may be used maliciously. IMPORTANT: You must NEVER generate or guess URLs for the user "
        "unless you are confident that the URLs are for helping the user with programming.\n\n" + _RULES
        + "\nHere is useful information about the environment you are running in:\n<env>\n"
        f"Working directory: {ROOT}\nIs directory a git repo: yes\nPlatform: linux\nToday's date: Wed Nov 25 2026\n"
        f"</env>\n<project>\n{_tree()}\n</project>\n\nInstructions from: {ROOT}/AGENTS.md\n{_AGENTS_MD}")


# -- the tool steps ---------------------------------------------------------------------------

def _take(lines: list[str], n_tokens: int, count) -> list[str]:
    """The first lines whose text stays within n_tokens (by the model's tokenizer)."""
    out: list[str] = []
    for line in lines:
        if out and count("\n".join(out + [line])) > n_tokens:
            break
        out.append(line)
    return out


def _numbered(lines: list[str], start: int) -> list[str]:
    return [f"{i:05d}| {line}" for i, line in enumerate(lines, start)]


def steps(count) -> list[tuple[str, dict, str]]:
    """The 10 (tool, arguments, result) steps; `count(text)` is the number of tokens of a text."""
    wrap = inspect.getsource(textwrap_mod).splitlines()
    shlex = inspect.getsource(shlex_mod).splitlines()
    src = f"{ROOT}/src/textkit/wrap.py"
    at = next(i for i, line in enumerate(wrap) if line.startswith("def shorten"))
    defs = [(i + 1, line) for i, line in enumerate(wrap) if line.lstrip().startswith(("def ", "class "))]

    s1 = "\n".join(f"{ROOT}/{f}" for f in FILES + ["docs/conf.py", "scripts/release.py"] if f.endswith(".py"))
    s2 = f"Found {len(defs)} matches\n{src}:\n" + "\n".join(
        _take([f"  Line {n}: {line.strip()}" for n, line in defs], 250, count))
    s3 = "\n".join(_take(_numbered(wrap, 1), 380, count))
    body = _take(_numbered(wrap[at:], at + 1), 300, count)
    s4 = "\n".join(body)
    fail = _take(wrap[at - 40:at], 60, count)
    s5 = ("============================= test session starts ==============================\n"
          "platform linux -- Python 3.11.2, pytest-8.3.4, pluggy-1.5.0\nrootdir: " + ROOT + "\nconfigfile: "
          "pyproject.toml\ncollected 41 items\n\ntests/test_wrap.py " + "." * 27 + "F\n\n"
          "=================================== FAILURES ===================================\n"
          "___________________________ test_shorten_tiny_width ____________________________\n\n"
          "    def test_shorten_tiny_width():\n>       assert shorten(\"Hello  world!\", width=4) == \"[...]\"\n\n"
          f"tests/test_wrap.py:212:\n{src}:{at + 13}: in shorten\n    return w.fill(' '.join(text.strip().split()))\n"
          + "\n".join(f"    {line}" for line in fail) +
          f"\nE   ValueError: placeholder too large for max width\n\n{src}:{at - 3}: ValueError\n"
          "=========================== short test summary info ============================\n"
          "FAILED tests/test_wrap.py::test_shorten_tiny_width - ValueError: placeholder too large for max width\n"
          "!!!!!!!!!!!!!!!!!!!!!!!!!! stopping after 1 failures !!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
          "========================= 1 failed, 27 passed in 0.31s =========================")
    s6 = "\n".join(_take(_numbered(shlex, 1), 300, count))
    old = "    w = TextWrapper(width=width, max_lines=1, **kwargs)\n"
    new = ("    placeholder = kwargs.get('placeholder', ' [...]')\n    if width < len(placeholder.lstrip()):\n"
           "        return placeholder.lstrip()[:width]\n" + old)
    s7 = ("Edit applied successfully.\n\n" + "\n".join(" " + line for line in wrap[at:at + 12]) + "\n"
          + "\n".join("+" + line for line in new.splitlines()[:3]) + "\n" + "\n".join(
              " " + line for line in wrap[at + 12:at + 14]) + "\n\n<file_diagnostics>\nNo errors.\n</file_diagnostics>")
    names = [line.split("(")[0][4:] for _, line in defs if line.startswith("def ")]
    s8 = ("============================= test session starts ==============================\n"
          "platform linux -- Python 3.11.2, pytest-8.3.4, pluggy-1.5.0\nrootdir: " + ROOT + "\ncollected 42 items\n\n"
          + "\n".join(f"tests/test_wrap.py::test_{n}_{case} PASSED" for n in names
                      for case in ("basic", "tiny_width")) +
          "\n\n============================== 42 passed in 0.34s ==============================")
    todos = [{"id": str(i), "content": c, "status": st, "priority": p} for i, (c, st, p) in enumerate([
        ("Reproduce test_shorten_tiny_width failure", "completed", "high"),
        ("Find where shorten() builds its TextWrapper", "completed", "high"),
        ("Return the clipped placeholder when width is smaller than it", "completed", "high"),
        ("Add regression test test_shorten_tiny_width_placeholder", "in_progress", "high"),
        ("Run ruff, mypy and the whole test suite", "pending", "medium")], 1)]
    s9 = json.dumps(todos, indent=2)
    s10 = (f"diff --git a/src/textkit/wrap.py b/src/textkit/wrap.py\nindex 3f2a9c1..8d0e4b7 100644\n"
           f"--- a/src/textkit/wrap.py\n+++ b/src/textkit/wrap.py\n@@ -{at + 10},6 +{at + 10},9 @@\n"
           + "\n".join(" " + line for line in wrap[at + 6:at + 12]) + "\n"
           + "\n".join("+" + line for line in new.splitlines()[:3]) + "\n"
           "diff --git a/tests/test_wrap.py b/tests/test_wrap.py\nindex 77b1e02..c41d9aa 100644\n"
           "--- a/tests/test_wrap.py\n+++ b/tests/test_wrap.py\n@@ -209,3 +209,12 @@\n"
           "     assert shorten(\"Hello  world!\", width=11) == \"Hello [...]\"\n+\n"
           "+def test_shorten_tiny_width_placeholder():\n"
           "+    assert shorten(\"Hello  world!\", width=4) == \"[...\"\n"
           "+    assert shorten(\"Hello  world!\", width=5) == \"[...]\"\n"
           "+    assert shorten(\"Hello  world!\", width=0) == \"\"")
    return [
        ("glob", {"pattern": "**/*.py"}, s1),
        ("grep", {"pattern": r"^\s*(def|class) ", "include": "wrap.py"}, s2),
        ("read", {"filePath": src}, s3),
        ("read", {"filePath": src, "offset": at, "limit": len(body)}, s4),
        ("bash", {"command": "python -m pytest tests/test_wrap.py -x -q", "description": "Run the wrap tests"}, s5),
        ("read", {"filePath": f"{ROOT}/src/textkit/split.py", "limit": 120}, s6),
        ("edit", {"filePath": src, "oldString": old, "newString": new}, s7),
        ("bash", {"command": "python -m pytest tests/test_wrap.py -v", "description": "Rerun the wrap tests"}, s8),
        ("todowrite", {"todos": todos}, s9),
        ("bash", {"command": "git diff", "description": "Show the change"}, s10),
    ]


def session(count, user: str = USER, n_steps: int = 10) -> list[list[dict]]:
    """The messages of each request: the opening one, then one after each tool result."""
    msgs = [{"role": "system", "content": system_prompt()}, {"role": "user", "content": user}]
    out = [list(msgs)]
    for i, (name, args, result) in enumerate(steps(count)[:n_steps], 1):
        cid = f"call_{i:02d}"
        msgs += [{"role": "assistant", "content": "", "tool_calls": [
                     {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]},
                 {"role": "tool", "tool_call_id": cid, "content": result}]
        out.append(list(msgs))
    return out


def fallback_render(messages: list[dict]) -> list[dict]:
    """The session as plain template messages, with the tools in the system prompt and the calls in
    Hermes-style <tool_call> tags: what a template without tool support is given by a server that
    keeps them (for the floor's token stream; the floor takes its token counts from mlxd)."""
    tools = "\n".join(json.dumps(t) for t in TOOLS)
    out = []
    for m in messages:
        if m["role"] == "system":
            out.append({"role": "system", "content": m["content"] + "\n\n# Tools\n\nYou may call one or more "
                        "functions to assist with the user query. The functions are:\n<tools>\n" + tools +
                        "\n</tools>\n\nFor each call, return a JSON object with the function name and arguments "
                        "within <tool_call></tool_call> tags:\n<tool_call>\n{\"name\": <function-name>, "
                        "\"arguments\": <args-json-object>}\n</tool_call>"})
        elif m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
                     for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(
                f"<tool_call>\n{json.dumps(c)}\n</tool_call>" for c in calls)})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out
