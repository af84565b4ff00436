"""End-to-end load errors (SPEC section 1, "Load errors"; section 3, exit codes).

Each case runs the real `offbuild` and checks what the user sees: exit code 2, a first line
`FILE:L:C: error: MESSAGE`, the source line and a caret under column C, no traceback, and
nothing built (a load error stops before anything runs).
"""
from __future__ import annotations

import json
import textwrap



# A stage that would run first if anything ran; its output proves a load error stopped everything.
CANARY = """
stage canary:
    out: canary.txt
    run: echo ran > $out
"""


def pipefile(project, *parts: str) -> None:
    """Write the Pipefile from parts, each dedented on its own."""
    project.write("Pipefile", "".join(textwrap.dedent(part) for part in parts))


def expect_error(project, *args, file="Pipefile", line: int, column: int, message: str, exact: bool = False,
                 source: str | None = None) -> str:
    """Run offbuild; assert exit 2 and a located error with its source line and caret. Returns stderr."""
    result = project.run(*args)
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == 2, f"exit {result.returncode}\n{output}"
    lines = result.stderr.splitlines()
    head = f"{file}:{line}:{column}: error: "
    assert lines and lines[0].removeprefix("offbuild: ").startswith(head), (
        f"expected '{head}...' first in:\n{result.stderr}")
    text = lines[0].removeprefix("offbuild: ")[len(head):]
    if exact:
        assert text == message, result.stderr
    else:
        assert message in text, result.stderr
    if source is None:
        source = (project.root / file).read_text(encoding="utf-8", errors="replace").split("\n")[line - 1]
    assert lines[1] == source.replace("\t", " "), result.stderr
    assert lines[2] == " " * (column - 1) + "^", result.stderr
    assert not project.exists("canary.txt"), "a stage ran despite the load error"
    return result.stderr


# --- the SPEC's own examples -------------------------------------------------------------------------------------

def test_spec_example_unknown_field_message_exactly(project):
    pipefile(project, """\
        python = python3

        stage copy:
            in:  data/input/sample.txt
            ouput: data/work/sample.txt
            run: $python rules/copy.py $in $out
        """ , CANARY)
    project.write("data/input/sample.txt", "x\n")
    stderr = expect_error(project, line=5, column=5, message="unknown field 'ouput' (did you mean 'out'?)",
                          exact=True)
    assert stderr.splitlines()[1:3] == ["    ouput: data/work/sample.txt", "    ^"]


def test_a_valid_pipefile_loads(project):
    """The control for every case below: the same shapes without the mistake load and build."""
    pipefile(project, """\
        python = python3

        stage copy:
            in:  data/input/sample.txt
            out: data/work/sample.txt
            run: cp $in $out
        """ , CANARY)
    project.write("data/input/sample.txt", "x\n")
    result = project.run(check=0)
    assert "Traceback" not in result.stderr
    assert project.read("data/work/sample.txt") == "x\n" and project.exists("canary.txt")


# --- syntax errors -----------------------------------------------------------------------------------------------

def test_stage_header_without_colon(project):
    pipefile(project, """\
        stage copy
            run: true
        """ , CANARY)
    expect_error(project, line=1, column=11, message="syntax error: unexpected end of line; expected ':'")


def test_indented_line_outside_a_stage(project):
    pipefile(project, """\
        x = 1
           y = 2
        """ , CANARY)
    expect_error(project, line=2, column=4, message="unexpected indentation")


# --- variables ---------------------------------------------------------------------------------------------------

def test_undefined_variable_suggests_the_shell_form(project):
    pipefile(project, CANARY, """\
        stage a:
            run: echo $HOME > /dev/null
        """)
    expect_error(project, line=6, column=15, message="undefined variable 'HOME' (write $$HOME if you meant the "
                 "shell's variable)", exact=True)


def test_command_line_override_defines_a_missing_variable(project):
    pipefile(project, CANARY, """\
        stage a:
            out: a.txt
            run: echo $greeting > $out
        """)
    expect_error(project, line=7, column=15, message="undefined variable 'greeting'")
    project.run("greeting=hello", check=0)
    assert project.read("a.txt") == "hello\n"


# --- stages and outputs -------------------------------------------------------------------------------------------

def test_duplicate_stage_names(project):
    pipefile(project, CANARY, """\
        stage a:
            run: true
        stage a:
            run: false
        """)
    expect_error(project, line=7, column=7, message="stage 'a' is already defined at Pipefile:5:7", exact=True)


def test_output_declared_twice(project):
    pipefile(project, CANARY, """\
        stage a:
            out: shared.txt
            run: echo a > $out
        stage b:
            out: other.txt  ./shared.txt
            run: echo b > $out
        """)
    expect_error(project, line=9, column=21, message="output 'shared.txt' is already declared by 'a' at Pipefile:6:10")


def test_pattern_output_clashing_with_a_plain_output(project):
    project.write("src/one.txt", "1\n")
    pipefile(project, CANARY, """\
        stage plain:
            out: work/one.up
            run: echo > $out
        stage up:
            in:  src/%.txt
            out: work/%.up
            run: cp $in $out
        """)
    expect_error(project, line=10, column=10, message="output 'work/one.up' is already declared by 'plain'")


# --- cycles --------------------------------------------------------------------------------------------------------

def test_dependency_cycle_printed_as_the_chain(project):
    pipefile(project, CANARY, """\
        stage a:
            in:  c.txt
            out: a.txt
            run: cp $in $out

        stage b:
            in:  a.txt
            out: b.txt
            run: cp $in $out

        stage c:
            in:  b.txt
            out: c.txt
            run: cp $in $out
        """)
    stderr = expect_error(project, line=5, column=7, message="dependency cycle: a → b → c → a")
    assert "  a (Pipefile:5:7)\n  b (Pipefile:10:7)\n  c (Pipefile:15:7)\n  a (Pipefile:5:7)" in stderr


def test_cycle_through_after(project):
    pipefile(project, CANARY, """\
        stage a:
            after: b
            run: true
        stage b:
            after: a
            run: true
        """)
    stderr = expect_error(project, line=5, column=7, message="dependency cycle: a → b → a")
    assert "b (Pipefile:8:7)" in stderr


def test_after_names_an_unknown_stage(project):
    pipefile(project, CANARY, """\
        stage a:
            after: canry
            run: true
        """)
    expect_error(project, line=6, column=12, message="'after:' names unknown stage 'canry' (did you mean 'canary'?)",
                 exact=True)


# --- missing inputs and targets -------------------------------------------------------------------------------------

def test_input_that_exists_nowhere(project):
    project.write("present.txt", "x\n")
    pipefile(project, CANARY, """\
        stage a:
            in:  present.txt data/missing.txt
            out: a.txt
            run: cat $in > $out
        """)
    expect_error(project, line=6, column=22,
                 message="input 'data/missing.txt' of 'a' does not exist and no stage makes it", exact=True)


def test_missing_input_reported_only_when_the_targets_need_it(project):
    pipefile(project, """\
        stage broken:
            in:  missing.txt
            out: broken.txt
            run: cp $in $out

        stage fine:
            out: fine.txt
            run: echo ok > $out

        stage after-fine:
            in:  fine.txt
            out: final.txt
            run: cp $in $out
        """)
    project.run("after-fine", check=0)  # targets are resolved first: 'broken' is not needed
    assert project.read("final.txt") == "ok\n"
    expect_error(project, "broken", line=2, column=10, message="input 'missing.txt' of 'broken' does not exist")
    expect_error(project, line=2, column=10, message="input 'missing.txt'")  # no target: every stage


def test_missing_input_not_needed_by_default_targets(project):
    pipefile(project, """\
        stage broken:
            in:  missing.txt
            run: cat $in
        stage fine:
            out: fine.txt
            run: echo ok > $out
        default: fine
        """)
    project.run(check=0)
    assert project.exists("fine.txt")


def test_unknown_target_on_the_command_line_suggests(project):
    pipefile(project, """\
        stage upper:
            out: up.txt
            run: echo > $out
        """ , CANARY)
    result = project.run("uper")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown target 'uper' (did you mean 'upper'?)" in result.stderr
    assert not project.exists("canary.txt") and not project.exists("up.txt")


def test_unknown_target_is_checked_before_missing_inputs(project):
    pipefile(project, """\
        stage broken:
            in:  missing.txt
            out: broken.txt
            run: cp $in $out
        """)
    result = project.run("brokn")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown target 'brokn' (did you mean 'broken'?)" in result.stderr
    assert "missing.txt" not in result.stderr


def test_unknown_default_target_is_located(project):
    pipefile(project, CANARY, """\
        stage upper:
            run: true
        default: canary uper
        """)
    expect_error(project, line=7, column=17, message="unknown target 'uper' (did you mean 'upper'?)", exact=True)


# --- field values ---------------------------------------------------------------------------------------------------

def test_unknown_pool_suggests(project):
    pipefile(project, """\
        pool heavy = 1
        stage a:
            pool: heavvy
            run: true
        """ , CANARY)
    expect_error(project, line=3, column=11, message="unknown pool 'heavvy' (did you mean 'heavy'?)")


def test_bad_duration(project):
    pipefile(project, CANARY, """\
        stage a:
            timeout: 5 minutes
            run: true
        """)
    expect_error(project, line=6, column=14, message="bad duration '5 minutes' (use e.g. 30s, 5m, 2h)", exact=True)


def test_bad_boolean(project):
    pipefile(project, CANARY, """\
        stage a:
            checkpoint: maybe
            run: true
        """)
    expect_error(project, line=6, column=17, message="'checkpoint:' must be true or false, not 'maybe'", exact=True)


# --- includes -------------------------------------------------------------------------------------------------------

def test_include_of_a_missing_file(project):
    pipefile(project, CANARY, "include rules/nope.pipe   # not there\n")
    expect_error(project, line=5, column=9, message="included file 'rules/nope.pipe' not found", exact=True)


def test_include_cycle_names_the_chain(project):
    project.write("rules/a.pipe", "include b.pipe\n")
    project.write("rules/b.pipe", "\ninclude a.pipe\n")
    pipefile(project, CANARY, "include rules/a.pipe\n")
    expect_error(project, file="rules/b.pipe", line=2, column=9,
                 message="include cycle: rules/a.pipe → rules/b.pipe → rules/a.pipe", exact=True)


def test_error_inside_an_included_file_points_into_it(project):
    project.write("rules/more.pipe", "stage b:\n    ouput: x\n    run: true\n")
    pipefile(project, CANARY, "include rules/more.pipe\n")
    expect_error(project, file="rules/more.pipe", line=2, column=5, message="unknown field 'ouput'")


# --- encodings and other files ---------------------------------------------------------------------------------------

def test_non_utf8_pipefile(project):
    (project.root / "Pipefile").write_bytes(CANARY.encode() + b"stage a:\n    run: echo caf\xe9\n")
    expect_error(project, line=6, column=18, message="'Pipefile' is not valid UTF-8 text",
                 source="    run: echo caf\ufffd")


def test_non_utf8_included_file(project):
    project.write("more.pipe", "x = 1\n")
    (project.root / "more.pipe").write_bytes(b"x = \xff\n")
    pipefile(project, CANARY, "include more.pipe\n")
    stderr = expect_error(project, file="more.pipe", line=1, column=5, message="'more.pipe' is not valid UTF-8 text",
                          source="x = \ufffd")
    assert "included at Pipefile:5:9" in stderr


def test_invalid_json_pipeline(project):
    project.write("pipeline.json", '{"stages": [\n  {"name": "a", "run": "true",}\n]}\n')
    expect_error(project, "-f", "pipeline.json", file="pipeline.json", line=2, column=31,
                 message="invalid JSON: Expecting property name enclosed in double quotes", exact=True)


def test_json_unknown_field_points_at_the_key(project):
    project.write("pipeline.json", json.dumps({"stages": [{"name": "a", "ouput": ["x"], "run": "true"}]}, indent=2))
    expect_error(project, "-f", "pipeline.json", file="pipeline.json", line=5, column=7,
                 message="unknown field 'ouput' (did you mean 'out'?)", exact=True)


def test_error_shows_the_right_file_with_dash_C(project):
    project.write("Pipefile", "# a different Pipefile, up here\nx = 1\n")
    project.write("sub/Pipefile", "stage a:\n    ouput: x\n    run: true\n")
    result = project.run("-C", "sub")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert "Pipefile:2:5: error: unknown field 'ouput'" in lines[0]
    assert lines[1:3] == ["    ouput: x", "    ^"]


def test_dash_C_error_names_the_file_relative_to_where_the_user_stands(project):
    project.write("Pipefile", "# a different Pipefile, up here\nx = 1\n")
    project.write("sub/Pipefile", "stage a:\n    ouput: x\n    run: true\n")
    result = project.run("-C", "sub")
    assert result.returncode == 2
    assert "sub/Pipefile:2:5: error: unknown field 'ouput'" in result.stderr.splitlines()[0]


def test_error_in_a_pipefile_named_with_dash_f(project):
    project.write("sub/Pipefile", "stage a:\n    in: nope.txt\n    run: true\n")
    expect_error(project, "-f", "sub/Pipefile", file="sub/Pipefile", line=2, column=9,
                 message="input 'nope.txt' of 'a' does not exist")


def test_glob_or_pattern_matching_nothing_is_not_a_missing_input(project):
    pipefile(project, """\
        stage gather:
            in:  data/*.txt
            out: all.txt
            run: cat $in /dev/null > $out
        stage each:
            in:  data/%.csv
            out: work/%.out
            run: cp $in $out
        """)
    project.run(check=0)
    assert project.read("all.txt") == ""


def test_unknown_output_path_target_suggests_the_declared_one(project):
    pipefile(project, """\
        stage a:
            out: data/work/result.txt
            run: echo > $out
        """)
    result = project.run("data/work/resutl.txt")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown target 'data/work/resutl.txt' (did you mean 'data/work/result.txt'?)" in result.stderr


def test_missing_pipefile(project):
    result = project.run("-f", "nope/Pipefile")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no pipeline file 'nope/Pipefile'" in result.stderr
