"""The configuration reference: one Markdown page rendered from the YAML files under conf/.

    python -m handclip.tools.confdoc [CONF_DIR] > configuration.md

The documentation site builds this page on every build (docs/gen_pages.py), so it always shows
what conf/ holds now. For `train.yaml` and every option file of every group folder it shows the
file's opening comments, the `_target_` it builds, its `defaults:` list (what it inherits or
overrides) and every key as the override path a command line uses (`data.sampler`), with its value
and the comments written above it or beside it. No comment of a file is dropped: one that belongs
to no key is shown under the file's table.

Comments are found with PyYAML's own scanner (text after the last token of a line), so a `#` inside
a quoted string is never taken for a comment.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PACKAGE_DIRECTIVE = re.compile(r"#\s*@package\s+(\S+)")
LIST_ITEM = re.compile(r"(\d+\.|[-*])\s")


@dataclass
class Entry:
    """A key (or a `defaults:` item) of a file, with the comments that belong to it."""

    path: str  # dotted override path (`data.sampler`); for a defaults item, the item as written
    value: str | None  # the value in YAML flow style; None for a mapping written as a block
    line: int  # 0-based line of the key in the file
    comments: list[str] = field(default_factory=list)


@dataclass
class ConfigFile:
    """One YAML file of conf/: its opening comments, package, defaults list and keys."""

    name: str  # the option name (file stem), or `train` for the primary config
    relpath: str  # path relative to the conf directory's parent, e.g. conf/data/synthetic.yaml
    package: str | None  # the `# @package` directive, if any
    header: list[str]  # opening comment lines, without `#`
    target: str | None  # the top-level `_target_`
    defaults: list[Entry]
    keys: list[Entry]
    footer: list[str]  # comments after the last key


@dataclass
class Group:
    """A config group folder (`conf/freeze/`): its options and the option train.yaml selects."""

    name: str
    default: str | None
    options: list[ConfigFile]


def _comment_text(raw: str) -> str:
    """A comment line's text without `#` and the one space after it (further indentation is kept)."""
    text = raw.lstrip()[1:]
    return text[1:] if text.startswith(" ") else text


def _find_comments(text: str) -> dict[int, tuple[str, bool]]:
    """Line -> (comment text, whether it is the whole line) for every comment in `text`."""
    lines = text.splitlines()
    covered: dict[int, int] = {}  # line -> column after the last token on it
    for token in yaml.scan(text):
        start, end = token.start_mark, token.end_mark
        for line in range(start.line, end.line + 1):
            column = end.column if line == end.line else len(lines[line]) if line < len(lines) else 0
            covered[line] = max(covered.get(line, 0), column)
    comments = {}
    for number, line in enumerate(lines):
        rest = line[covered.get(number, 0) :]
        if rest.lstrip().startswith("#"):
            comments[number] = (_comment_text(rest), number not in covered or not line[: covered[number]].strip())
    return comments


def _flow(node: yaml.Node) -> str:
    """A node's value written back in YAML flow style, scalars as they were written."""
    if isinstance(node, yaml.ScalarNode):
        if node.style in ("'", '"'):
            escaped = node.value.replace(node.style, "\\" + node.style if node.style == '"' else "''")
            return f"{node.style}{escaped}{node.style}"
        return node.value if node.value != "" else "null"
    if isinstance(node, yaml.SequenceNode):
        return "[" + ", ".join(_flow(item) for item in node.value) + "]"
    return "{" + ", ".join(f"{_flow(k)}: {_flow(v)}" for k, v in node.value) + "}"


def _walk(node: yaml.MappingNode, prefix: str, out: list[Entry]) -> None:
    """Entries for every key under `node`: block mappings are opened, everything else is one value."""
    for key_node, value_node in node.value:
        path = f"{prefix}{key_node.value}"
        if isinstance(value_node, yaml.MappingNode) and not value_node.flow_style and value_node.value:
            out.append(Entry(path, None, key_node.start_mark.line))
            _walk(value_node, path + ".", out)
        else:
            out.append(Entry(path, _flow(value_node), key_node.start_mark.line))


def read_config(path: Path, name: str, relpath: str, prefix: str) -> ConfigFile:
    """Parse one config file; `prefix` is the override path its keys live under (`data.`, or `` for global)."""
    text = path.read_text(encoding="utf-8")
    comments = _find_comments(text)
    lines = text.splitlines()

    header, package, first = [], None, 0
    while first < len(lines) and first in comments and comments[first][1]:
        directive = PACKAGE_DIRECTIVE.fullmatch(lines[first].strip())
        if directive:
            package = directive.group(1)
        else:
            header.append(comments[first][0])
        first += 1
    if package == "_global_":
        prefix = ""
    elif package:
        prefix = package + "."

    root = yaml.compose(text)
    defaults, keys, target = [], [], None
    if root is not None:
        if not isinstance(root, yaml.MappingNode):
            raise ValueError(f"{relpath}: the top level must be a mapping")
        body = yaml.MappingNode(root.tag, [], flow_style=False)
        for key_node, value_node in root.value:
            if key_node.value == "defaults" and isinstance(value_node, yaml.SequenceNode):
                defaults = [Entry(_flow(item).strip("{}"), None, item.start_mark.line) for item in value_node.value]
            elif key_node.value == "_target_":
                target = value_node.value
                keys.append(Entry("_target_", value_node.value, key_node.start_mark.line))  # a home for its comments
            else:
                body.value.append((key_node, value_node))
        _walk(body, prefix, keys)

    # every comment after the header goes to an entry: one beside a key to that key, one on a line of
    # its own to the next entry; one on a line with no key (inside a list) to the entry it is inside
    entries = sorted(defaults + keys, key=lambda e: e.line)
    by_line = {}
    for entry in entries:
        by_line.setdefault(entry.line, entry)
    footer = []
    for number in sorted(comments):
        if number < first:
            continue
        comment, whole_line = comments[number]
        if whole_line:
            following = [e for e in entries if e.line > number]
            if following:
                following[0].comments.append(comment)
            else:
                footer.append(comment)
        else:
            owner = by_line.get(number) or next((e for e in reversed(entries) if e.line <= number), None)
            if owner is not None:
                owner.comments.append(comment)
            else:
                footer.append(comment)
    # the top-level _target_ is shown on its own, and a block mapping's key only where a comment explains it
    keys = [e for e in keys if e.comments or (e.path != "_target_" and e.value is not None)]
    return ConfigFile(name, relpath, package, header, target, defaults, keys, footer)


def read_groups(conf_dir: Path) -> tuple[ConfigFile, list[Group]]:
    """The primary config (`train.yaml`) and every group folder of `conf_dir`, in train.yaml's order."""
    conf_dir = Path(conf_dir)
    base = conf_dir.name
    primary = read_config(conf_dir / "train.yaml", "train", f"{base}/train.yaml", "")
    chosen: dict[str, str | None] = {}
    for entry in primary.defaults:
        group, sep, option = entry.path.partition(": ")
        if sep and "/" not in group and group != "override hydra":
            chosen[group] = option
    folders = sorted(p for p in conf_dir.iterdir() if p.is_dir() and any(p.rglob("*.yaml")))
    order = {name: i for i, name in enumerate(chosen)}
    folders.sort(key=lambda p: (order.get(p.name, len(order)), p.name))
    groups = []
    for folder in folders:
        options = [
            read_config(path, path.relative_to(folder).with_suffix("").as_posix(),
                        f"{base}/{path.relative_to(conf_dir).as_posix()}", folder.name + ".")
            for path in sorted(folder.rglob("*.yaml"))
        ]  # fmt: skip
        default = chosen.get(folder.name)
        groups.append(Group(folder.name, None if default in (None, "null") else default, options))
    return primary, groups


def inline(text: str) -> str:
    """Comment text for Markdown: code spans kept, everything that Markdown would read as markup escaped."""
    parts = re.split(r"(`[^`]+`)", text)
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(part.replace("|", "\\|"))
            continue
        part = part.replace("\\", "\\\\").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        out.append(re.sub(r"([*_\[\]{}|#!])", r"\\\1", part))
    return "".join(out)


def _code(value: str) -> str:
    value = value.replace("|", "\\|")
    return f"`` {value} ``" if "`" in value else f"`{value}`"


def _prose(lines: list[str]) -> list[str]:
    """Comment lines as Markdown: lines joined into paragraphs, `1.`/`-` items as a list, and lines
    indented further (an example command) as a code block, unless they continue a list item."""
    blocks: list[tuple[str, list[str]]] = []
    for line in lines:
        indented = line.startswith("  ")
        if not line.strip():
            blocks.append(("blank", []))
        elif indented and blocks and blocks[-1][0] == "item":
            blocks[-1][1].append(line.strip())
        elif indented:
            if blocks and blocks[-1][0] == "code":
                blocks[-1][1].append(line.strip())
            else:
                blocks.append(("code", [line.strip()]))
        elif LIST_ITEM.match(line):
            blocks.append(("item", [line.strip()]))
        elif blocks and blocks[-1][0] == "text":
            blocks[-1][1].append(line.strip())
        else:
            blocks.append(("text", [line.strip()]))
    out: list[str] = []
    previous = None
    for kind, body in blocks:
        if kind == "blank":
            previous = None
            continue
        if out and not (kind == "item" and previous == "item"):
            out.append("")
        if kind == "code":
            out += ["```", *body, "```"]
        elif kind == "item":
            marker, _, rest = body[0].partition(" ")
            out.append(f"{marker} " + inline(" ".join([rest, *body[1:]])))
        else:
            out.append(inline(" ".join(body)))
        previous = kind
    return out


def _anchor(group: str, option: str) -> str:
    return f"{group}-{option}".replace("/", "-")


def _defaults_item(item: str, group: str | None, groups: dict[str, Group]) -> str:
    """A defaults item as code, linked to the option it names where that option is in conf/."""
    target = None
    match = re.fullmatch(r"(?:override\s+)?/?([\w/]+):\s*(\S+)", item)
    if match and match.group(1) in groups:
        target = (match.group(1), match.group(2))
    elif group and re.fullmatch(r"[\w/]+", item) and item != "_self_":
        target = (group, item)
    if target and any(o.name == target[1] for o in groups[target[0]].options):
        return f"[{_code(item)}](#{_anchor(*target)})"
    return _code(item)


def _keys_table(config: ConfigFile) -> list[str]:
    if not config.keys:
        return []
    out = ["| key | value | comment |", "|---|---|---|"]
    for entry in config.keys:
        value = _code(entry.value) if entry.value is not None else ""
        out.append(f"| {_code(entry.path)} | {value} | {inline(' '.join(c.strip() for c in entry.comments))} |")
    return out


def _file_body(config: ConfigFile, group: str | None, groups: dict[str, Group]) -> list[str]:
    out = [f"`{config.relpath}`", ""]
    if config.header:
        out += _prose(config.header) + [""]
    # one paragraph each (a list here would run into a list that ends the header)
    if config.target:
        out += [f"**Builds** {_code(config.target)}", ""]
    if config.package:
        where = "the top level of the configuration" if config.package == "_global_" else f"`{config.package}`"
        out += [f"**Package** `{config.package}`: its keys are set at {where}", ""]
    if config.defaults:
        items = []
        for entry in config.defaults:
            note = f" ({inline(' '.join(entry.comments))})" if entry.comments else ""
            items.append(_defaults_item(entry.path, group, groups) + note)
        out += ["**Defaults** " + ", ".join(items), ""]
    table = _keys_table(config)
    if table:
        out += table + [""]
    if config.footer:
        out += ["Closing comments:", ""] + _prose(config.footer) + [""]
    return out


def render(conf_dir: str | Path) -> str:
    """The configuration reference page (Markdown) for the Hydra configuration in `conf_dir`."""
    primary, group_list = read_groups(Path(conf_dir))
    groups = {g.name: g for g in group_list}
    out = [
        "# Configuration reference",
        "",
        "Generated from the YAML files under `conf/` each time the documentation is built "
        "(`handclip/tools/confdoc.py`), so it shows what those files hold now. Every key is written as "
        "the path a command line overrides (`python train.py data.batch_size=64`); *defaults* lists the "
        "files composed into an option before its own keys (or over them, where they come after `_self_`); "
        "`???` marks a value the command line must give. The "
        "[configuration guide](../configuration.md) explains how the groups fit together.",
        "",
        "## Run settings: `train.yaml` {#train}",
        "",
    ]
    out += _prose(primary.header) + [""]
    out += ["Groups and the option each takes unless a command line or an `experiment=` file chooses another:", ""]
    out += ["| group | default | comment |", "|---|---|---|"]
    other_defaults = []
    for entry in primary.defaults:
        group, sep, option = entry.path.partition(": ")
        comment = inline(" ".join(entry.comments))
        if sep and group in groups:
            known = any(o.name == option for o in groups[group].options)
            chosen = (f"[{_code(option)}](#{_anchor(group, option)})" if known
                      else "`null` (none)" if option == "null" else _code(option))  # fmt: skip
            out.append(f"| [`{group}`](#{group.replace('/', '-')}) | {chosen} | {comment} |")
        else:
            other_defaults.append(f"- {_code(entry.path)}" + (f": {comment}" if comment else ""))
    out.append("")
    if other_defaults:
        out += ["Also in its defaults list:", "", *other_defaults, ""]
    out += _keys_table(primary) + [""]
    if primary.footer:
        out += ["Closing comments:", ""] + _prose(primary.footer) + [""]
    for group in group_list:
        out += [f"## `{group.name}` {{#{group.name.replace('/', '-')}}}", ""]
        names = ", ".join(f"[`{o.name}`](#{_anchor(group.name, o.name)})" for o in group.options)
        default = f"; default `{group.default}`" if group.default else "; none unless chosen"
        out += [f"Choose with `{group.name}=NAME`{default}. Options: {names}.", ""]
        for option in group.options:
            out += [f"### `{group.name}={option.name}` {{#{_anchor(group.name, option.name)}}}", ""]
            out += _file_body(option, group.name, groups)
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 or (argv and argv[0] in ("-h", "--help")):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    conf_dir = Path(argv[0] if argv else "conf")
    if not (conf_dir / "train.yaml").is_file():
        print(f"error: {conf_dir}/train.yaml not found; give the conf/ directory", file=sys.stderr)
        return 2
    sys.stdout.write(render(conf_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
