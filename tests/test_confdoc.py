"""The configuration reference is rendered from conf/ and leaves nothing of it out."""

import re
import textwrap
from pathlib import Path

import pytest

from handclip.tools.confdoc import main, render

CONF = Path(__file__).resolve().parent.parent / "conf"


def plain(text: str) -> str:
    """Text as a reader sees it: Markdown escapes undone, whitespace runs made one space."""
    text = text.replace("\\", "").replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return re.sub(r"\s+", " ", text)


def comments_of(path: Path) -> list[str]:
    """Every comment written in a YAML file (conf/ has no '#' inside its values)."""
    found = []
    for line in path.read_text().splitlines():
        match = re.search(r"(?:^|\s)#(.*)$", line)
        if match and not match.group(1).strip().startswith("@package"):
            found.append(match.group(1).strip())
    return [c for c in found if c]


def section(page: str, heading: str) -> str:
    """The text under a heading, up to the next heading of the same or a higher level."""
    level = heading.split(" ")[0]
    start = page.index(heading + " ")
    following = re.compile(rf"^#{{1,{len(level)}}} ", re.M)
    end = following.search(page, start + len(heading))
    return page[start : end.start() if end else len(page)]


def row(text: str, key: str) -> str:
    """The table row of `key` in `text`."""
    rows = [line for line in text.splitlines() if line.startswith(f"| `{key}` |")]
    assert len(rows) == 1, f"{key}: {len(rows)} rows"
    return rows[0]


@pytest.fixture(scope="module")
def page():
    return render(CONF)


def test_every_group_and_every_option_file_under_conf_has_its_section(page):
    groups = sorted(p for p in CONF.iterdir() if p.is_dir())
    assert {"backbone", "freeze", "loss", "data", "optim", "experiment"} <= {g.name for g in groups}
    for group in groups:
        assert f"## `{group.name}` {{#{group.name}}}" in page
        for option in sorted(group.glob("*.yaml")):
            text = section(page, f"### `{group.name}={option.stem}`")
            assert f"`conf/{group.name}/{option.name}`" in text


def test_every_comment_of_every_file_appears_in_its_own_section(page):
    for path in sorted(CONF.rglob("*.yaml")):
        if path.name == "train.yaml":
            text = section(page, "## Run settings: `train.yaml`")
        else:  # an option of a group, or of a group inside a group (data=loader/default)
            group, *inner = path.relative_to(CONF).with_suffix("").parts
            text = section(page, f"### `{group}={'/'.join(inner)}`")
        for comment in comments_of(path):
            assert plain(comment) in plain(text), f"{path}: {comment!r} is missing"


def test_comments_sit_in_the_row_of_the_key_they_explain(page):
    train = section(page, "## Run settings: `train.yaml`")
    # a comment on the line above a key
    assert "resume: `last`" in row(train, "ckpt_path")
    assert "| `null` |" in row(train, "ckpt_path")
    loader = section(page, "### `data=loader/default`")
    # a comment beside a key, with its value
    assert row(loader, "data.sampler").startswith("| `data.sampler` | `random` | random \\| identity\\_balanced")
    assert "seeds the split" in row(loader, "data.draw")
    optim = section(page, "### `optim=adamw`")
    # a comment beside a key whose value is a block mapping, and the keys inside it
    assert "layer-wise lr decay per tower" in row(optim, "optim.layer_decay")
    assert "| `null` |" in row(optim, "optim.layer_decay.vision")
    assert "| `[0.9, 0.98]` |" in row(optim, "optim.optimizer.betas")
    compute = section(page, "### `compute=default`")
    assert "micro-batches per batch" in row(compute, "compute.accumulate")
    # a global experiment's keys are top-level paths; what it inherits links to that option
    experiment = section(page, "### `experiment=demo_clipreid`")
    assert "stage 1: only the identity prompts train" in row(experiment, "stages.prompts")
    assert "[`override /loss: clipreid`](#loss-clipreid)" in experiment
    assert "[`demo`](#experiment-demo)" in experiment


def test_what_each_option_builds_and_the_default_of_each_group(page):
    assert "**Builds** `handclip.model.freeze.LastN`" in section(page, "### `freeze=last_n`")
    assert "[`tiny`](#backbone-tiny)" in section(page, "### `backbone=tiny_pretrained`")
    train = section(page, "## Run settings: `train.yaml`")
    assert "| [`freeze`](#freeze) | [`text_frozen`](#freeze-text_frozen) |" in train
    assert "Hydra writes no .hydra/ or log file" in plain(train)


def test_a_group_added_to_conf_appears_with_its_comments(tmp_path):
    (tmp_path / "widget").mkdir()
    (tmp_path / "train.yaml").write_text(
        textwrap.dedent("""\
        # a primary config
        defaults:
          - _self_
          - widget: round
        seed: 0  # the seed
        """)
    )
    (tmp_path / "widget" / "round.yaml").write_text(
        textwrap.dedent("""\
        # a round widget
        # made for tests:
        #   python train.py widget=round
        _target_: shop.Round
        size: 3        # in mm | or <inches>
        label: "a # b"
        parts:
          # the first part
          first: {kind: bolt}
        # a last word
        """)
    )
    (tmp_path / "widget" / "square.yaml").write_text("defaults:\n  - round\n  - _self_\nsize: 4\n")
    page = render(tmp_path)
    round_ = section(page, "### `widget=round`")
    assert "a round widget made for tests:" in round_
    assert "```\npython train.py widget=round\n```" in round_
    assert "**Builds** `shop.Round`" in round_
    assert row(round_, "widget.size") == "| `widget.size` | `3` | in mm \\| or &lt;inches&gt; |"
    assert row(round_, "widget.label") == '| `widget.label` | `"a # b"` |  |'  # a '#' in a string is no comment
    assert row(round_, "widget.parts.first") == "| `widget.parts.first` | `{kind: bolt}` | the first part |"
    assert "Closing comments:\n\na last word" in round_
    square = section(page, "### `widget=square`")
    assert "**Defaults** [`round`](#widget-round), `_self_`" in square
    assert "| [`widget`](#widget) | [`round`](#widget-round) |" in page


def test_the_page_is_valid_markdown_with_one_cell_per_column(page):
    markdown = pytest.importorskip("markdown")
    html = markdown.markdown(page, extensions=["tables", "attr_list", "fenced_code"])
    assert 'id="data-hands11k"' in html and 'id="train"' in html
    for table in re.findall(r"<table>.*?</table>", html, re.S):
        header = re.findall(r"<th(?:\s[^>]*)?>", table)
        for tr in re.findall(r"<tr>(.*?)</tr>", table, re.S)[1:]:
            assert len(re.findall(r"<td(?:\s[^>]*)?>", tr)) == len(header), tr


def test_the_command_line_prints_the_page_and_refuses_a_folder_without_train_yaml(tmp_path, capsys):
    assert main([str(CONF)]) == 0
    assert capsys.readouterr().out == render(CONF)
    assert main([str(tmp_path)]) == 2
    assert "train.yaml not found" in capsys.readouterr().err
