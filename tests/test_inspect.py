"""`--list`, `--graph[=dot|mermaid|json]` and `--clean` (SPEC section 3)."""
from __future__ import annotations

import json
import os
import re

import pydot
import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydot's use of old pyparsing names

DEMO = """
python = python3

stage copy:
    doc: copy the raw input
    in:  src.txt
    out: work/copy.txt
    run: cp $in $out

stage count:
    doc: count each chapter
    in:  chapters/%.txt
    out: work/%.count
    run: wc -l < $in > $out

stage report:
    in:  work/*.count work/copy.txt
    out: out/report.txt
    run: cat $in > $out

stage lint:
    in:  src.txt
    after: copy
    run: test -s $in

default: report
"""


def demo(project):
    project.pipefile(DEMO)
    project.write("src.txt", "text\n")
    project.write("chapters/one.txt", "1\n")
    project.write("chapters/two.txt", "2\n2\n")


def stage_line(output: str, name: str) -> str:
    return next(line for line in output.splitlines() if line.startswith(name + " ") or line.startswith(f"    {name} "))


# -- --list


def test_list_shows_docs_inputs_outputs_jobs_and_state(project):
    demo(project)
    output = project.run("--list", check=0).stdout
    assert re.match(r"copy +\[will run\]  copy the raw input$", stage_line(output, "copy"))
    assert "    in:  src.txt\n    out: work/copy.txt\n" in output
    assert re.match(r"count +\[2 job\(s\), 2 will run\]  count each chapter$", stage_line(output, "count"))
    assert "    in:  chapters/%.txt\n    out: work/%.count\n" in output
    assert re.match(r"    count\[one\] +\[will run\]$", stage_line(output, "count[one]"))
    assert "(default)" in stage_line(output, "report") and "(default)" not in stage_line(output, "copy")
    assert output.rstrip().endswith("default: report")
    project.build("report", "lint")
    project.write("chapters/two.txt", "changed\n")
    output = project.run("--list", check=0).stdout
    assert "[up to date]" in stage_line(output, "copy")
    assert "[2 job(s), 1 will run]" in stage_line(output, "count")
    assert "[up to date]" in stage_line(output, "count[one]") and "[will run]" in stage_line(output, "count[two]")
    assert "[will run]" in stage_line(output, "report")
    assert "[up to date]" in stage_line(output, "lint")


# -- --graph


def built_demo_with_one_change(project):
    demo(project)
    project.build()
    project.write("chapters/two.txt", "changed\n")


def test_graph_dot_parses_and_marks_states(project):
    built_demo_with_one_change(project)
    output = project.run("--graph", check=0).stdout
    assert output == project.run("--graph=dot", check=0).stdout
    (graph,) = pydot.graph_from_dot_data(output)
    nodes = {node.get_name().strip('"'): node.get("label").strip('"') for node in graph.get_nodes()
             if node.get_name() not in ("node", "edge", "graph")}
    assert nodes == {"copy": "copy\\nup to date", "count[one]": "count[one]\\nup to date",
                     "count[two]": "count[two]\\nwill run", "report": "report\\nwill run"}
    edges = {(edge.get_source().strip('"'), edge.get_destination().strip('"')): edge.get("label")
             for edge in graph.get_edges()}
    assert edges == {("copy", "report"): '"work/copy.txt"', ("count[one]", "report"): '"work/one.count"',
                     ("count[two]", "report"): '"work/two.count"'}


def test_graph_marks_failed_last_time_and_after_edges_dashed(project):
    project.pipefile("""
        stage make:
            out: made.txt
            run: exit 1

        stage check:
            after: make
            run: true
    """)
    project.build(check=1)
    (graph,) = pydot.graph_from_dot_data(project.run("check", "--graph", check=0).stdout)
    labels = {node.get_name().strip('"'): node.get("label") for node in graph.get_nodes()}
    assert labels["make"] == '"make\\nfailed last time"'
    assert labels["check"] == '"check\\nwill run"'
    (edge,) = graph.get_edges()
    assert edge.get("style") == "dashed"
    data = json.loads(project.run("check", "--graph=json", check=0).stdout)
    assert data["edges"] == [{"from": "make", "to": "check", "files": [], "kind": "after"}]
    assert {node["id"]: node["state"] for node in data["nodes"]} == {"make": "failed last time", "check": "will run"}


def test_graph_mermaid_has_the_flowchart_shape(project):
    built_demo_with_one_change(project)
    lines = project.run("--graph=mermaid", check=0).stdout.splitlines()
    assert lines[0] == "flowchart LR"
    nodes = [re.fullmatch(r'    (n\d+)\["(.+)<br/>(up to date|will run|failed last time)"\]:::(\w+)', line)
             for line in lines if "[" in line and "-->" not in line]
    assert all(nodes) and len(nodes) == 4
    ids = {match.group(2): match.group(1) for match in nodes}
    assert set(ids) == {"copy", "count[one]", "count[two]", "report"}
    edges = [line for line in lines if "-->" in line]
    assert f'    {ids["copy"]} -->|"work/copy.txt"| {ids["report"]}' in edges and len(edges) == 3
    classes = {line.split()[1] for line in lines if line.strip().startswith("classDef")}
    assert {match.group(4) for match in nodes} <= classes


def test_graph_json_covers_only_what_the_targets_need(project):
    built_demo_with_one_change(project)
    data = json.loads(project.run("--graph=json", "count[two]", check=0).stdout)
    assert [node["id"] for node in data["nodes"]] == ["count[two]"]
    assert data["nodes"][0]["state"] == "will run"
    assert data["nodes"][0]["reasons"][0]["reason"] == "input_changed"
    assert data["edges"] == []
    data = json.loads(project.run("--graph=json", check=0).stdout)
    assert {node["id"] for node in data["nodes"]} == {"copy", "count[one]", "count[two]", "report"}
    assert {"from": "copy", "to": "report", "files": ["work/copy.txt"], "kind": "files"} in data["edges"]


# -- --clean


def all_files(project) -> set[str]:
    found = set()
    for folder, dirs, files in os.walk(project.root):
        dirs[:] = [d for d in dirs if d != ".offbuild"]
        found.update(os.path.relpath(os.path.join(folder, name), project.root) for name in files)
    return found


def test_clean_dry_run_lists_and_deletes_nothing(project):
    demo(project)
    project.build()
    before = all_files(project)
    output = project.run("--clean", "-n", check=0).stdout
    assert "would remove out/report.txt\n" in output and "would remove work/one.count\n" in output
    assert "offbuild: would remove 4 file(s), would forget 4 job record(s)" in output
    assert all_files(project) == before
    assert "up to date" in project.run("--explain", "report", check=0).stdout


def test_clean_removes_outputs_and_records_of_the_target_and_its_needs_only(project):
    demo(project)
    project.build("report", "lint")
    output = project.run("--clean", "count[one]", check=0).stdout
    assert output == "removed work/one.count\noffbuild: removed 1 file(s), forgot 1 job record(s)\n"
    assert project.exists("work/two.count") and project.exists("out/report.txt")
    assert "never built" in project.run("--explain", "count[one]", check=0).stdout
    project.run("--clean", check=0)
    assert all_files(project) == {"Pipefile", "src.txt", "chapters/one.txt", "chapters/two.txt"}
    assert project.ran(project.build()) == {"copy", "count[one]", "count[two]", "report"}


def test_clean_removes_checkpoints(project):
    project.pipefile("""
        stage long:
            out: long.txt
            checkpoint: true
            run: echo 1 > "$$OFFBUILD_CHECKPOINT"; echo part > $out; exit 1
    """)
    project.build(check=1)
    assert project.exists(".offbuild/checkpoints/long.ckpt") and project.exists("long.txt")
    output = project.run("--clean", check=0).stdout
    assert "removed .offbuild/checkpoints/long.ckpt (checkpoint)" in output
    assert not project.exists(".offbuild/checkpoints/long.ckpt")
    assert not project.exists(".offbuild/checkpoints/long.ckpt.key")
    assert not project.exists("long.txt")


def test_clean_never_deletes_a_source(project):
    project.pipefile("""
        stage unpack:
            out: data
            run: mkdir -p data/gen && echo made > data/gen/x.txt

        stage use:
            in:  data/raw.txt
            out: used.txt
            run: cp $in $out

        stage link:
            out: link.txt
            run: ln -s Pipefile $out
    """)
    project.build("unpack", "link")
    project.write("data/raw.txt", "precious\n")  # a source inside a declared output folder
    project.build("use")
    result = project.run("--clean", "unpack", "use", "link", check=0)
    assert "offbuild: kept data: it holds the source file data/raw.txt" in result.stderr
    assert project.read("data/raw.txt") == "precious\n"
    assert not project.exists("used.txt")
    assert not os.path.lexists(project.root / "link.txt") and project.exists("Pipefile")
