"""The commands and links in README.md, docs/*.md and benchmarks/README.md work as written.

Every shell command in a fenced code block tagged bash / sh / shell (and every `$ ` line of a
console block) is extracted: backslash-continued lines are joined, `#` comments stripped, and
`&&`, `||`, `;` and `|` split the line into commands. Then, for each command:

- every path under scripts/, benchmarks/, experiments/, tests/, docs/ or diffusion/ that it
  names (`python scripts/X.py`, `bash benchmarks/gpu.sh`, `--config experiments/x.py:variant`)
  exists;
- a `python scripts/run.py ...` command parses as scripts/run.py would parse it: the flags are
  read from scripts/run.py's absl definitions (its source, not imported, so the global absl
  FLAGS stay untouched) into a fresh `absl.flags.FlagValues`, with `--config` defined by
  `ml_collections.config_flags.DEFINE_config_file` as run.py does (locked config). So the config
  file exists, its `get_config(variant)` loads, every `--config.a.b=v` override names an
  existing key and `v` converts to that key's type (ml_collections' own parsers), every other
  flag is one run.py defines, `--mode` is one of its values, `--workdir` is given and no
  positional argument is left over. Then the config must pass
  `diffusion.config_checks.check_config`, the checks `experiment.build` runs first (unknown and
  unused keys, values, combinations such as `n_iters` against `n_jitted_steps`); its notes on
  sampler keys the chosen sampler ignores are fine.

Placeholders: a flag value that is an all-capitals word (`DIR`, `N`, `FILE`), a shell variable
(`$HOME`, `${NODE}`) or `<...>` is a placeholder. Its flag or config key must still exist, but
its value is not converted (`--config.model.num_classes=K` is fine if `model.num_classes` exists).
Any other value is converted as written, so path-like placeholders (`/data/faces`,
`/path/to/dir`, `runs/...`) are fine only for string-valued keys and flags, which is where they
belong.

Every relative link of the markdown outside code (`[text](path)`, `![alt](path)`) names a file
that exists, and a `#fragment` into a markdown file names one of its headings (GitHub's slugs).

Each docs/*.md page starts with a command: its first fenced block is a bash block, before the
page's first `##` section. README.md starts with the two commands of a fresh machine.

Fast: no training and no JAX compilation; loading the configs imports `diffusion` once.
"""

import ast
import dataclasses
import functools
import re
import shlex
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

# ml_collections loads config files with importlib's deprecated load_module(); the warning is
# about ml_collections, once per config loaded here, not about this codebase.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:the load_module\(\) method is deprecated:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
RUN_PY = ROOT / "scripts" / "run.py"
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             ROOT / "benchmarks" / "README.md"]
SHELL_LANGUAGES = {"bash", "sh", "shell"}
SEPARATORS = {"&&", "||", ";", "|"}
REPO_DIRS = ("scripts", "benchmarks", "experiments", "tests", "docs", "diffusion")
FIRST_COMMANDS = ['pip install -e ".[dev]" && python scripts/run.py --config experiments/digits.py'
                  ' --workdir runs/digits',
                  "python -m pytest -q"]


@dataclasses.dataclass(frozen=True)
class Command:
    """One shell command of a markdown file: `path` and 1-based `line` where it starts."""
    path: Path
    line: int
    text: str
    argv: tuple[str, ...]

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.text}"


# --------------------------------------------------------------------------- markdown


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(language, line number of the first line inside, lines) of each fenced code block."""
    blocks, block = [], None
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*(```+|~~~+)\s*([\w+-]*)", line)
        if block is None and fence:
            block = (fence.group(1), fence.group(2).lower(), number + 1, [])
        elif block is not None and fence and fence.group(1).startswith(block[0]) \
                and not fence.group(2):
            blocks.append(block[1:])
            block = None
        elif block is not None:
            block[3].append(line)
    return blocks


def commands_in(path: Path, text: str | None = None) -> list[Command]:
    """The shell commands of the bash / sh / shell / console blocks of a markdown file."""
    text = path.read_text() if text is None else text
    commands = []
    for language, first, lines in fenced_blocks(text):
        if language not in SHELL_LANGUAGES | {"console"}:
            continue
        joined: list[tuple[int, str]] = []
        pending = None
        for number, line in enumerate(lines, first):
            if pending is None:
                if language == "console":
                    if not line.startswith("$ "):
                        continue
                    line = line[2:]
                pending = (number, "")
            start, so_far = pending
            if line.rstrip().endswith("\\"):
                pending = (start, so_far + line.rstrip()[:-1] + " ")
                continue
            joined.append((start, so_far + line))
            pending = None
        if pending is not None:
            joined.append(pending)
        for number, line in joined:
            tokens = shlex.split(line, comments=True)
            current: list[str] = []
            for token in [*tokens, ";"]:
                if token in SEPARATORS:
                    if current:
                        commands.append(Command(path, number, shlex.join(current),
                                                tuple(current)))
                    current = []
                else:
                    current.append(token)
    return commands


def _outside_fences(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        match = re.match(r"^\s*(```+|~~~+)", line)
        if match:
            fence = match.group(1) if fence is None else (
                None if match.group(1).startswith(fence) else fence)
        elif fence is None:
            lines.append((number, line))
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)      # links keep their text
    text = text.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The #fragments of the headings of a markdown file."""
    slugs, seen = set(), {}
    for _, line in _outside_fences(path.read_text()):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = github_slug(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            slugs.add(slug if count == 0 else f"{slug}-{count}")
    return slugs


def link_problems(path: Path, text: str | None = None) -> list[str]:
    """'file:line: [link] problem' for each relative link that names nothing."""
    text = path.read_text() if text is None else text
    problems = []
    for number, line in _outside_fences(text):
        line = re.sub(r"`[^`]*`", "", line)                           # inline code
        for target in re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):      # http:, https:, mailto:
                continue
            file, _, fragment = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{number}"
            if not resolved.exists():
                problems.append(f"{where}: link ({target}) names {file}, which does not exist")
            elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
                problems.append(f"{where}: link ({target}): {resolved.name} has no heading "
                                f"#{fragment}")
    return problems


# --------------------------------------------------------------------------- run.py's flags


@dataclasses.dataclass(frozen=True)
class FlagDef:
    """One `flags.DEFINE_<kind>(name, default, help, **kwargs)` of scripts/run.py."""
    kind: str
    name: str
    args: tuple
    kwargs: tuple


def _literal(expr: ast.expr):
    try:
        return ast.literal_eval(expr)
    except ValueError:
        return None


@functools.cache
def run_py_flags(source: str | None = None) -> tuple[FlagDef, ...]:
    """The absl flags scripts/run.py defines, read from its source (names, kinds, enum values,
    `required`); a default that is not a literal becomes None (the value is not what is
    checked here)."""
    tree = ast.parse(RUN_PY.read_text() if source is None else source)
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr.startswith("DEFINE_")):
            continue
        args = [_literal(a) for a in node.args]
        if not args or not isinstance(args[0], str):
            raise AssertionError(f"scripts/run.py:{node.lineno}: a flag whose name is not a "
                                 f"literal; tests/test_docs.py cannot read it")
        kwargs = tuple((k.arg, _literal(k.value)) for k in node.keywords if k.arg)
        found.append(FlagDef(node.func.attr.removeprefix("DEFINE_"), args[0], tuple(args[1:]),
                             kwargs))
    assert any(f.kind == "config_file" and f.name == "config" for f in found), \
        "scripts/run.py defines no --config (config_flags.DEFINE_config_file)"
    return tuple(found)


def _flag_values(argv: list[str], definitions) -> flags.FlagValues:
    """A fresh FlagValues holding run.py's flags; `--config` reads its overrides from `argv`."""
    values = flags.FlagValues()
    for d in definitions:
        kwargs = dict(d.kwargs)
        required = kwargs.pop("required", False)
        if d.kind == "config_file":
            config_flags.DEFINE_config_file(d.name, None, "", flag_values=values,
                                            lock_config=kwargs.get("lock_config", True),
                                            sys_argv=argv)
            continue
        kwargs.pop("help", None)
        define = getattr(flags, f"DEFINE_{d.kind}")
        if d.kind in ("enum", "multi_enum"):      # (default, enum_values, help)
            default, enum_values = (list(d.args) + [None, None])[:2]
            enum_values = kwargs.pop("enum_values", enum_values)
            define(d.name, kwargs.pop("default", default), enum_values, "",
                   flag_values=values, **kwargs)
        else:
            define(d.name, kwargs.pop("default", d.args[0] if d.args else None), "",
                   flag_values=values, **kwargs)
        if required:
            flags.mark_flag_as_required(d.name, flag_values=values)
    return values


def is_placeholder(value: str) -> bool:
    return bool(re.fullmatch(r"[A-Z][A-Z0-9_]*|\$\{?\w+\}?|<[^>]+>", value))


def check_run_command(argv: list[str], definitions=None) -> None:
    """Raises ValueError naming the problem unless `argv` (the words after `scripts/run.py`)
    parses as scripts/run.py parses its command line (see the module docstring)."""
    definitions = run_py_flags() if definitions is None else definitions
    kinds = {d.name: d.kind for d in definitions}
    plain, placeholders = [], []       # placeholders: flags (config.a.b) whose value is one
    i = 0
    while i < len(argv):
        token, value = argv[i], None
        if token.startswith("--") and "=" in token:
            token, value = token.split("=", 1)
        elif token.startswith("--") and i + 1 < len(argv) and is_placeholder(argv[i + 1]):
            i, value = i + 1, argv[i + 1]
        i += 1
        name = token[2:]
        if name == "config" and value is None and i < len(argv):     # --config FILE
            token, value, i = "--config", argv[i], i + 1
        if name == "config" and value and not value.startswith("/"):  # from any directory
            value = str(ROOT / value)
        if value is not None and is_placeholder(value) and kinds.get(name) != "string":
            placeholders.append(name)          # only its name is checked, not its value
        else:
            plain.append(token if value is None else f"{token}={value}")
    if not any(t == "--config" or t.startswith("--config=") for t in plain):
        raise ValueError("no --config: name the experiment (run.py's default is experiments/"
                         "digits.py, but a documented command should say it)")
    full = ["scripts/run.py", *plain]
    values = _flag_values(full, definitions)
    try:
        rest = values(full)
        config = values["config"].value
        config.keys()       # a config file that failed to load raises its error on first use
    except Exception as e:  # absl and ml_collections raise several types; all mean "bad flag"
        detail = e
        while isinstance(detail, (AttributeError, KeyError)) and detail.args:  # as run.py does
            detail = detail.args[0]
        detail = str(detail).strip()
        if isinstance(e, (AttributeError, KeyError)):
            detail = f"an override names a key the config does not have: {detail}"
        if "Traceback (most recent call last)" in detail:   # a config file's own error
            detail = detail.splitlines()[-1]
        detail = " ".join(detail.split())
        raise ValueError(f"does not parse: {type(e).__name__}: {detail}") from None
    if rest[1:]:
        raise ValueError(f"positional arguments {rest[1:]}: scripts/run.py takes none")
    for name in placeholders:
        if name.startswith("config."):
            node = config
            for part in name.split(".")[1:]:
                if not (hasattr(node, "keys") and part in node):
                    raise ValueError(f"--{name}: the config has no key {name[7:]}")
                node = node[part]
        elif name not in values:
            raise ValueError(f"--{name}: scripts/run.py defines no such flag")
    from diffusion import config_checks

    try:
        config_checks.check_config(config)          # notes on unused sampler keys are fine
    except ValueError as e:
        raise ValueError(" ".join(str(e).split())) from None


# --------------------------------------------------------------------------- the tests


def _all_commands() -> list[Command]:
    return [c for path in DOC_FILES if path.exists() for c in commands_in(path)]


COMMANDS = _all_commands()
RUN_COMMANDS = [c for c in COMMANDS if "scripts/run.py" in c.argv]


def _script_args(argv: tuple[str, ...], script: str) -> list[str]:
    return list(argv[argv.index(script) + 1:])


def _id(c: Command) -> str:
    return f"{c.path.relative_to(ROOT)}:{c.line}"


@pytest.mark.parametrize("command", RUN_COMMANDS, ids=_id)
def test_run_command_parses(command):
    try:
        check_run_command(_script_args(command.argv, "scripts/run.py"))
        problem = None
    except ValueError as e:
        problem = str(e)
    assert problem is None, f"{command.where()}\n  {problem}"


def _named_paths(argv) -> list[str]:
    paths = []
    for token in argv:
        value = token.split("=", 1)[1] if token.startswith("-") and "=" in token else token
        value = value.split(":", 1)[0]
        if re.fullmatch(rf"(?:{'|'.join(REPO_DIRS)})/[\w./-]*\w", value):
            paths.append(value)
    return paths


@pytest.mark.parametrize("command", [c for c in COMMANDS if _named_paths(c.argv)], ids=_id)
def test_named_files_exist(command):
    missing = [p for p in _named_paths(command.argv) if not (ROOT / p).exists()]
    assert not missing, f"{command.where()}\n  names {missing}, which do not exist"


@pytest.mark.parametrize("path", [p for p in DOC_FILES if p.exists()],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_links_exist(path):
    problems = link_problems(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_docs_page_starts_with_a_command(path):
    text = path.read_text()
    blocks = fenced_blocks(text)
    assert blocks and blocks[0][0] in SHELL_LANGUAGES, \
        f"{path.relative_to(ROOT)}: its first fenced block is not a bash command"
    first_section = next((n for n, line in enumerate(text.splitlines(), 1)
                          if line.startswith("## ")), None)
    assert first_section is None or blocks[0][1] < first_section, \
        f"{path.relative_to(ROOT)}: the first command comes after the first section (line " \
        f"{first_section}); a page starts with a command"


def test_readme_starts_with_the_two_commands():
    language, line, lines = fenced_blocks((ROOT / "README.md").read_text())[0]
    assert (language, [x.strip() for x in lines]) == ("bash", FIRST_COMMANDS), \
        f"README.md:{line}: the first block should be the two commands of a fresh machine"


def test_every_doc_page_has_commands_and_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    lines = len(readme.splitlines())
    assert lines <= 250, f"README.md has {lines} lines; the front door has at most 250"
    assert len(RUN_COMMANDS) > 20, "the command extraction found almost nothing"
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"


# --------------------------------------------------------------------------- the checker bites


def _rejects(argv: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_run_command(argv)


def test_checker_accepts_a_good_command():
    check_run_command(["--config", "experiments/digits.py:flow", "--workdir", "runs/x",
                       "--mode=sample", "--config.sampling.method=dpm_solver",
                       "--config.sampling.steps=20", "--config.data.data_dir=DIR",
                       "--process_id", "N", "--distributed"])


def test_checker_rejects_bad_commands():
    digits = ["--config", "experiments/digits.py", "--workdir", "runs/x"]
    _rejects([*digits, "--config.sampling.stepz=20"], "stepz")                 # misspelt key
    _rejects([*digits, "--config.sampling.steps=twenty"], "steps")             # wrong type
    _rejects([*digits, "--config.sampling.stepz=N"], "no key sampling.stepz")  # placeholder
    _rejects([*digits, "--wrokdir=runs/y"], "wrokdir")                         # unknown flag
    _rejects([*digits, "--mode=evaluate"], "mode")                             # bad --mode
    _rejects([*digits, "extra"], "positional")
    _rejects(["--config", "experiments/digits.py"], "workdir")                 # required flag
    _rejects(["--config", "experiments/nope.py", "--workdir", "w"], "nope")    # no such file
    _rejects(["--config", "experiments/digits.py:bogus", "--workdir", "w"], "bogus")  # variant
    _rejects(["--workdir", "w"], "no --config")
    _rejects([*digits, "--config.sde.sigma_max=10"], "sigma_max")     # unused by the VP SDE


def test_extraction_and_links(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n## A section\n\n[ok](page.md#a-section) [bad](nowhere.md) "
                    "[anchor](#no-such) `[code](ignored.md)` [web](https://example.com)\n\n"
                    "```bash\n# a comment\npip install -e . && python scripts/run.py \\\n"
                    "    --config experiments/digits.py --workdir w   # trailing comment\n```\n"
                    "```console\n$ python benchmarks/fault_injection.py\n| output | 1 |\n```\n"
                    "```\npython not/a/command.py\n```\n")
    commands = commands_in(page)
    assert [(c.line, c.argv) for c in commands] == [
        (9, ("pip", "install", "-e", ".")),
        (9, ("python", "scripts/run.py", "--config", "experiments/digits.py", "--workdir", "w")),
        (13, ("python", "benchmarks/fault_injection.py"))]
    problems = link_problems(page)
    assert len(problems) == 2 and "nowhere.md" in problems[0] and "#no-such" in problems[1], \
        problems
    assert _named_paths(("python", "scripts/nope.py", "--config=experiments/x.py:v")) == [
        "scripts/nope.py", "experiments/x.py"]
    assert github_slug("Rectified flow, v-prediction and `EDM`") == \
        "rectified-flow-v-prediction-and-edm"
