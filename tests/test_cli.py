"""The ``entdyn rules`` subcommand, and ``docs/rules.md`` kept in step with the registered rules' defaults."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from entdyn.cli import build_parser, format_rules, main
from theory.rules import RULES, describe_rules, make_rule

ROOT = Path(__file__).resolve().parents[1]
RULES_DOC = ROOT / "docs" / "rules.md"
NAMES = sorted(RULES)
SECTION_HEADINGS = ("**What it does.**", "**Formula.**", "**Returns.**", "**Source.**", "**Known differences")
PARAM_ROW = re.compile(r"^\|\s*`(?P<name>[A-Za-z_]\w*)`\s*\|\s*`(?P<default>[^`]*)`\s*\|")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "entdyn", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def parse_blocks(text: str) -> dict[str, dict[str, str]]:
    """``entdyn rules`` text -> {rule name: {parameter: rendered default}}."""
    blocks: dict[str, dict[str, str]] = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"^(\w+)  \[(token|detector)\]  \((\w+)\)$", line)
        if head:
            current = blocks.setdefault(head.group(1), {})
            continue
        param = re.match(r"^    (\w+)\s+= (.*)$", line)
        if param and current is not None:
            current[param.group(1)] = param.group(2)
    return blocks


# ------------------------------------------------------------------------------------ entdyn rules


def test_registry_has_the_thirteen_documented_rules():
    assert NAMES == [
        "clip_b",
        "clip_cov",
        "clip_v",
        "entropic_pi",
        "entropy_bonus",
        "entropy_target",
        "high_entropy_mask",
        "kl_cov",
        "position_bonus",
        "ppl_shaping",
        "prob_weighted",
        "quadrant_mask",
        "stage_detector",
    ]


def test_rules_subprocess_lists_every_rule_with_defaults_and_sources():
    proc = run_cli("rules")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for rec in describe_rules():
        assert f"{rec['name']}  [{rec['kind']}]  ({rec['class']})" in out
        assert rec["source"].split(";")[0] in out
    assert re.search(r"^    mu\s+= 2\.5$", out, re.M)  # clip_b
    assert re.search(r"^    mu\s+= 8\.5$", out, re.M)  # clip_v
    assert re.search(r"^    max_frac\s+= 0\.0001$", out, re.M)
    assert re.search(r"^    clamp\s+= 0\.8/1\.2$", out, re.M)  # spec-string tuple syntax
    assert re.search(r"^    start_step\s+= 201$", out, re.M)
    assert "docs/rules.md" in out


def test_rules_subprocess_json_is_describe_rules():
    proc = run_cli("rules", "--json")
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)
    assert [r["name"] for r in records] == NAMES
    expected = json.loads(json.dumps(describe_rules()))  # tuples -> lists, as JSON has them
    assert records == expected
    by_name = {r["name"]: r for r in records}
    assert by_name["kl_cov"]["defaults"] == {"frac": 0.0002, "coef": 1.0}
    assert by_name["ppl_shaping"]["defaults"]["clamp"] == [0.8, 1.2]
    assert by_name["stage_detector"]["kind"] == "detector"


def test_rules_via_main(capsys):
    assert main(["rules"]) == 0
    out = capsys.readouterr().out
    for name in NAMES:
        assert re.search(rf"^{name}  \[", out, re.M), name
    assert out.strip() == format_rules(describe_rules())


def test_rules_filter_and_json_via_main(capsys):
    assert main(["rules", "clip-v", "kl_cov", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in records] == ["clip_v", "kl_cov"]
    assert records[0]["defaults"]["mu"] == 8.5


def test_rules_unknown_name_fails(capsys):
    assert main(["rules", "clip_z"]) == 2
    err = capsys.readouterr().err
    assert "clip_z" in err and "clip_b" in err


def test_rules_text_defaults_round_trip_through_make_rule():
    """Every ``key = value`` the CLI prints for a token rule is spec syntax that rebuilds the default rule."""
    blocks = parse_blocks(format_rules(describe_rules()))
    assert sorted(blocks) == NAMES
    records = describe_rules_by_name()
    for name, params in blocks.items():
        assert list(params) == list(records[name]["defaults"]), name
        if records[name]["kind"] != "token":  # the stage detector is not built from specs
            with pytest.raises(ValueError, match="not a token rule"):
                make_rule(name)
            continue
        spec = name + ":" + ",".join(f"{k}={v}" for k, v in params.items())
        assert make_rule(spec) == RULES[name](), spec


def test_rules_command_stays_torch_free():
    code = (
        "import sys, io, contextlib; from entdyn.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()): assert main(['rules']) == 0\n"
        "assert 'torch' not in sys.modules, 'entdyn rules imported torch'"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_rules_help_mentions_json():
    help_text = build_parser()._subparsers._group_actions[0].choices["rules"].format_help()
    assert "--json" in help_text


# -------------------------------------------------------------------------------- docs/rules.md


def describe_rules_by_name() -> dict[str, dict]:
    return {r["name"]: r for r in describe_rules()}


def doc_sections() -> dict[str, str]:
    """``## `name` ...`` sections of docs/rules.md, keyed by the rule name in the header."""
    sections: dict[str, str] = {}
    for chunk in re.split(r"^## ", RULES_DOC.read_text(encoding="utf-8"), flags=re.M)[1:]:
        header = chunk.splitlines()[0]
        m = re.match(r"`(\w+)`", header)
        if m:
            assert m.group(1) not in sections, f"two sections for {m.group(1)}"
            sections[m.group(1)] = chunk
    return sections


def doc_parameter_rows(section: str) -> list[tuple[str, str]]:
    """(parameter, default cell) rows of the section's ``| parameter | default | meaning |`` table."""
    lines = section.splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"^\|\s*parameter\s*\|\s*default\s*\|", line)]
    assert len(starts) == 1, "expected exactly one parameter table"
    rows = []
    for line in lines[starts[0] + 2 :]:
        if not line.startswith("|"):
            break
        m = PARAM_ROW.match(line)
        assert m, f"malformed parameter row: {line}"
        rows.append((m.group("name"), m.group("default")))
    return rows


def test_rules_doc_has_one_section_per_registered_rule():
    sections = doc_sections()
    assert sorted(sections) == NAMES  # no missing and no stale sections
    for name, section in sections.items():
        for heading in SECTION_HEADINGS:
            assert heading in section, f"{name}: no {heading}"


@pytest.mark.parametrize("name", NAMES)
def test_rules_doc_defaults_match_the_code(name):
    defaults = describe_rules_by_name()[name]["defaults"]
    rows = doc_parameter_rows(doc_sections()[name])
    assert [p for p, _ in rows] == list(defaults), f"{name}: documented parameters differ from the code"
    for param, cell in rows:
        value = ast.literal_eval(cell)
        # repr equality: same value *and* type (1 vs 1.0, 0 vs False, tuple vs list)
        assert repr(value) == repr(defaults[param]), f"{name}.{param}: doc {cell!r}, code {defaults[param]!r}"


def test_rules_doc_overview_lists_every_rule_with_its_class_and_kind():
    text = RULES_DOC.read_text(encoding="utf-8")
    for rec in describe_rules():
        row = f"| `{rec['name']}` | `{rec['class']}` | {rec['kind']} |"
        assert row in text, row
