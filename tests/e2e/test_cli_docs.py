"""docs/cli.md and `walbust --help` agree (both describe the option table in
cdc/opts.c): the same commands with the same summaries, the same options
with the same argument names and environment variables, each accepted by
the same commands (`walbust <command> --help`), and the environment summary
lists every variable. Also: -V works like --version, and the help text
keeps its column layout (no line wider than 79 columns; an option's text
starts in the same column on every line). Needs only WALBUST_BIN."""
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import BIN, SRC, Runner

DOC = os.path.join(SRC, "docs", "cli.md")
HELP_COL = 30


def wb(*args):
    p = subprocess.run([BIN, *args], capture_output=True, text=True, timeout=10)
    assert p.returncode == 0, (args, p.returncode, p.stderr)
    return p.stdout


def help_sections(text):
    """{"commands": {name: summary}, "options": {"--name": (arg, env, help)}}
    from --help output (wrapped lines joined)."""
    commands, options, where, cur = {}, {}, None, None
    for line in text.splitlines():
        if line == "commands:":
            where = "commands"
            continue
        if line.startswith("options"):
            where = "options"
            continue
        if not line.strip():
            where = None if where != "options" else where
            cur = None
            continue
        if where == "commands":
            m = re.match(r"  (\S+)\s+(.*)$", line)
            if m and not line.startswith(" " * 13):
                cur = m.group(1)
                commands[cur] = m.group(2)
            elif cur:
                commands[cur] += " " + line.strip()
        elif where == "options":
            m = re.match(r"  (--[a-z-]+)(?: (\S+))?(?:\s+(.*))?$", line)
            if m:
                cur = m.group(1)
                options[cur] = [m.group(2) or "", m.group(3) or ""]
            elif cur and line.startswith(" " * HELP_COL):
                options[cur][1] = (options[cur][1] + " " + line.strip()).strip()
    out = {}
    for name, (arg, txt) in options.items():
        env = re.search(r"\[(WALBUST_[A-Z_]+)\]$", txt)
        out[name] = (arg, env.group(1) if env else "", txt)
    return {"commands": commands, "options": out}


def md_table(text, header):
    """Rows (lists of cells) of the markdown table whose header row starts
    with `header`."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(header):
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                cells = re.split(r"(?<!\\)\|", row.strip().strip("|"))
                rows.append([c.strip().replace("\\|", "|") for c in cells])
            return rows
    raise AssertionError(f"no table with header {header!r} in {DOC}")


def doc_commands(doc):
    out = {}
    for name, summary in md_table(doc, "| command | what it does |"):
        m = re.match(r"\[`(\w+)`\]", name)
        assert m, name
        out[m.group(1)] = summary.replace("`", "")
    return out


def doc_options(doc, all_commands):
    out = {}
    for opt, env, _default, cmds in md_table(doc, "| option | env | default | commands |"):
        m = re.match(r"`(--[a-z-]+)(?: ([^`]+))?`", opt)
        assert m, opt
        names = set(all_commands) if cmds == "all" else {c.strip() for c in cmds.split(",")}
        out[m.group(1)] = (m.group(2) or "", env.strip("`"), names)
    return out


def test_commands_agree():
    doc = open(DOC).read()
    helped = help_sections(wb("--help"))["commands"]
    documented = doc_commands(doc)
    assert helped == documented, (
        f"commands differ between walbust --help and {DOC}:\n"
        + "\n".join(f"  {k}: help {helped.get(k)!r} / docs {documented.get(k)!r}"
                    for k in sorted(set(helped) | set(documented))
                    if helped.get(k) != documented.get(k)))
    for name in helped:
        assert f"## walbust {name}" in doc, f"{DOC} has no section for walbust {name}"


def test_options_agree():
    doc = open(DOC).read()
    helped = help_sections(wb("--help"))
    documented = doc_options(doc, helped["commands"])
    per_command = {c: set(help_sections(wb(c, "--help"))["options"]) for c in helped["commands"]}
    problems = []
    for name in sorted(set(helped["options"]) | set(documented)):
        if name not in documented:
            problems.append(f"{name}: in walbust --help, missing from the options table")
            continue
        if name not in helped["options"]:
            problems.append(f"{name}: in the options table, not in walbust --help")
            continue
        arg, env, _ = helped["options"][name]
        darg, denv, dcmds = documented[name]
        if arg != darg:
            problems.append(f"{name}: argument {arg!r} in --help, {darg!r} in the docs")
        if env != denv:
            problems.append(f"{name}: variable {env!r} in --help, {denv!r} in the docs")
        cmds = {c for c, opts in per_command.items() if name in opts}
        if cmds != dcmds:
            problems.append(f"{name}: accepted by {sorted(cmds)} (walbust <command> --help), "
                            f"the docs say {sorted(dcmds)}")
    assert not problems, f"{DOC} and walbust --help disagree:\n  " + "\n  ".join(problems)


def test_environment_summary_lists_every_variable():
    doc = open(DOC).read()
    helped = {env: name for name, (_, env, _) in help_sections(wb("--help"))["options"].items()
              if env}
    rows = md_table(doc, "| variable | option |")
    documented = {}
    for var, opt in rows:
        if var.startswith("`WALBUST_"):
            documented[var.strip("`")] = re.match(r"`(--[a-z-]+)", opt).group(1)
    assert helped == documented, (helped, documented)


def test_version_flags_and_help_layout():
    version = wb("--version")
    assert re.fullmatch(r"walbust \S+\n", version), version
    assert wb("-V") == version
    assert wb("run", "-V") == version
    texts = [wb("--help")] + [wb(c, "--help") for c in help_sections(wb("--help"))["commands"]]
    for text in texts:
        for line in text.splitlines():
            # wider only when one word (a URL form) does not fit
            assert len(line) <= 79 or " " not in line.strip(), \
                f"--help line wider than 79 columns: {line!r}"
            if line.startswith("  --") and not re.fullmatch(r"  --[a-z-]+( \S+)?", line):
                # the text starts at the help column (a long option is alone on its line)
                assert line[HELP_COL - 1] == " " and line[HELP_COL] != " ", \
                    f"misaligned --help line: {line!r}"
            elif line.startswith(" " * 3) and not line.startswith("       walbust"):
                assert line.startswith(" " * HELP_COL) and line[HELP_COL] != " " \
                    or line.startswith(" " * 13), f"misaligned --help line: {line!r}"


def main():
    runner = Runner("test_cli_docs")
    for t in (test_commands_agree, test_options_agree,
              test_environment_summary_lists_every_variable, test_version_flags_and_help_layout):
        runner.run(t)
    runner.done()


if __name__ == "__main__":
    sys.exit(main())
