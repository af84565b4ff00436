"""Unit tests for the Pipefile and JSON loaders (SPEC section 1): text in, `Pipeline` out."""
from __future__ import annotations

import dataclasses
import json
import textwrap

import pytest

from offbuild.errors import LoadError, UsageError
from offbuild.jsonform import load_json
from offbuild.model import JobVar, Location, Pipeline, Stage
from offbuild.parser import load_pipefile

# SPEC section 1's example, verbatim: it must load exactly as written.
SPEC_EXAMPLE = """\
# Pipefile: the demo pipeline. Comments start with '#'.
python = python3                      # a variable: $python or ${python}

stage copy:
    doc: copy the raw input into the work area
    in:  data/input/sample.txt
    out: data/work/sample.txt
    run: $python rules/copy.py $in $out

stage upper:
    in:  data/work/sample.txt         # another stage's output: this makes a DAG edge
    out: data/output/result.txt
    checkpoint: true                  # the recipe may resume; see section 4
    retries: 3                        # exponential backoff with jitter
    timeout: 5m
    run: $python rules/upper.py $in $out

default: upper
"""


@pytest.fixture
def load(tmp_path, monkeypatch):
    """Write TEXT (dedented) to a file in a temp dir and load it; `Pipefile` unless told otherwise."""
    monkeypatch.chdir(tmp_path)

    def load(text: str, overrides: dict[str, str] | None = None, name: str = "Pipefile") -> Pipeline:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        if name.endswith(".json"):
            return load_json(str(path), name, overrides or {})
        return load_pipefile(str(path), name, overrides or {})

    return load


def load_error(load, text: str, **kwargs) -> LoadError:
    with pytest.raises(LoadError) as caught:
        load(text, **kwargs)
    return caught.value


def recipe(stage: Stage) -> str:
    """The recipe template as text, per-job variables shown as <name>."""
    return "".join(part if isinstance(part, str) else f"<{part.name}>" for part in stage.recipe)


def stage(pipeline: Pipeline, name: str) -> Stage:
    return next(s for s in pipeline.stages if s.name == name)


def paths(specs) -> list[str]:
    return [spec.text for spec in specs]


def only(pipeline: Pipeline) -> Stage:
    assert len(pipeline.stages) == 1, [s.name for s in pipeline.stages]
    return pipeline.stages[0]


# --- the SPEC example -------------------------------------------------------------------------------------------

def test_spec_example_loads_as_written(load):
    pipeline = load(SPEC_EXAMPLE)
    assert [s.name for s in pipeline.stages] == ["copy", "upper"]
    assert pipeline.variables == {"python": "python3"}
    assert paths(pipeline.default) == ["upper"]

    copy = stage(pipeline, "copy")
    assert copy.doc == "copy the raw input into the work area"
    assert paths(copy.inputs) == ["data/input/sample.txt"]
    assert paths(copy.outputs) == ["data/work/sample.txt"]
    assert recipe(copy) == "python3 rules/copy.py <in> <out>"
    assert copy.location == Location("Pipefile", 4, 7)

    upper = stage(pipeline, "upper")
    assert paths(upper.inputs) == ["data/work/sample.txt"]  # the trailing comment is not a path
    assert paths(upper.outputs) == ["data/output/result.txt"]
    assert upper.checkpoint is True
    assert upper.retries == 3
    assert upper.timeout == 300
    assert recipe(upper) == "python3 rules/upper.py <in> <out>"
    # Unset fields keep their documented defaults.
    assert (upper.backoff, upper.retry_on, upper.pool, upper.network, upper.always, upper.doc) == (
        1.0, (), None, False, False, "")


def test_spec_example_with_crlf_line_endings(load, tmp_path):
    (tmp_path / "Pipefile").write_bytes(SPEC_EXAMPLE.replace("\n", "\r\n").encode())
    pipeline = load_pipefile(str(tmp_path / "Pipefile"), "Pipefile", {})
    assert recipe(stage(pipeline, "copy")) == "python3 rules/copy.py <in> <out>"
    assert paths(stage(pipeline, "upper").inputs) == ["data/work/sample.txt"]


def test_utf8_byte_order_mark_is_ignored(load, tmp_path):
    (tmp_path / "Pipefile").write_bytes(b"\xef\xbb\xbf" + SPEC_EXAMPLE.encode())
    pipeline = load_pipefile(str(tmp_path / "Pipefile"), "Pipefile", {})
    assert pipeline.variables == {"python": "python3"}


# --- variables ----------------------------------------------------------------------------------------------------

def test_dollar_name_and_braces(load):
    s = only(load("""
        tool = gzip
        ext = gz
        stage z:
            out: a.${ext}
            run: $tool -c x > ${tool}_out.$ext
    """))
    assert paths(s.outputs) == ["a.gz"]
    assert recipe(s) == "gzip -c x > gzip_out.gz"


def test_name_ends_at_first_non_name_character(load):
    s = only(load("""
        dir = out
        stage z:
            out: $dir/file-$dir.txt
            run: touch $out
    """))
    assert paths(s.outputs) == ["out/file-out.txt"]


def test_double_dollar_is_a_literal_dollar(load):
    s = only(load("""
        stage z:
            run: echo $$HOME $${PATH} cost$$ $$$$
    """))
    assert recipe(s) == "echo $HOME ${PATH} cost$ $$"


def test_later_variables_use_earlier_ones(load):
    pipeline = load("""
        root = data
        input = $root/in
        both = ${input}+$root
    """)
    assert pipeline.variables == {"root": "data", "input": "data/in", "both": "data/in+data"}


def test_variable_redefinition_applies_from_then_on(load):
    pipeline = load("""
        x = 1
        stage a:
            run: echo $x
        x = $x-2
        stage b:
            run: echo $x
    """)
    assert recipe(stage(pipeline, "a")) == "echo 1"
    assert recipe(stage(pipeline, "b")) == "echo 1-2"


def test_variable_value_runs_to_end_of_line_without_trailing_comment(load):
    pipeline = load("""
        flags = --level=9  -v   # how hard to squeeze
        empty =
        spaced =    a  b\t
    """)
    assert pipeline.variables == {"flags": "--level=9  -v", "empty": "", "spaced": "a  b"}


def test_dollar_dollar_inside_a_variable_stays_literal_when_used(load):
    s = only(load("""
        home = $$HOME
        stage z:
            run: echo $home
    """))
    assert recipe(s) == "echo $HOME"


def test_command_line_override_wins_over_the_pipefile(load):
    pipeline = load("""
        python = python3
        cmd = $python -u
        stage z:
            run: $cmd x.py
    """, overrides={"python": "pypy3"})
    assert pipeline.variables["python"] == "pypy3"
    assert pipeline.variables["cmd"] == "pypy3 -u"
    assert recipe(only(pipeline)) == "pypy3 -u x.py"


def test_command_line_override_may_define_a_new_variable(load):
    s = only(load("""
        stage z:
            run: echo $mode
    """, overrides={"mode": "fast lane"}))
    assert recipe(s) == "echo fast lane"


def test_undefined_variable_is_located_and_suggests_double_dollar(load):
    error = load_error(load, """
        stage z:
            run: echo $HOME
    """)
    assert error.location == Location("Pipefile", 3, 15)
    assert "undefined variable 'HOME'" in error.message
    assert "$$HOME" in error.message


def test_undefined_variable_suggests_a_close_name(load):
    error = load_error(load, """
        python = python3
        stage z:
            run: $pyhton x.py
    """)
    assert "undefined variable 'pyhton'" in error.message and "did you mean 'python'?" in error.message
    assert error.location == Location("Pipefile", 4, 10)


def test_variable_defined_later_is_undefined_earlier(load):
    error = load_error(load, """
        b = $a
        a = 1
    """)
    assert "undefined variable 'a'" in error.message
    assert error.location == Location("Pipefile", 2, 5)


def test_per_job_names_are_reserved(load):
    error = load_error(load, "in = x\n")
    assert "reserved" in error.message and error.location.line == 1


# --- the shell's own syntax reaches the shell -----------------------------------------------------------------

def test_shell_dollar_forms_reach_the_shell_unchanged(load):
    s = only(load("""
        stage z:
            run: echo $(date +%s) $1 $? $@ $* $# $- $!
    """))
    assert recipe(s) == "echo $(date +%s) $1 $? $@ $* $# $- $!"


def test_hash_inside_a_one_line_recipe_is_kept(load):
    s = only(load("""
        stage z:
            run: echo a # the shell's comment, not offbuild's
    """))
    assert recipe(s) == "echo a # the shell's comment, not offbuild's"


def test_hash_inside_a_block_recipe_is_kept(load):
    s = only(load("""
        stage z:
            run:
                echo one
                # a shell comment between commands
                echo "#two"  # trailing
                echo three
    """))
    assert recipe(s) == ('echo one\n# a shell comment between commands\necho "#two"  # trailing\n'
                         "echo three")


# --- stage fields --------------------------------------------------------------------------------------------------

def test_every_field(load):
    pipeline = load("""
        pool heavy = 2
        stage prep:
            run: true
        stage z:
            doc:   make the thing, slowly
            in:    a.txt  b/c.txt   d/*.txt
            out:   x.out y.out
            after: prep
            env:   LANG TZ
            checkpoint: true
            retries:  4
            backoff:  2s
            retry-on: 75 137
            timeout:  30s
            pool:     heavy
            network:  true
            always:   true
            run:      make $out0
    """)
    assert pipeline.pools == {"heavy": 2}
    s = stage(pipeline, "z")
    assert s.doc == "make the thing, slowly"
    assert paths(s.inputs) == ["a.txt", "b/c.txt", "d/*.txt"]
    assert paths(s.outputs) == ["x.out", "y.out"]
    assert paths(s.after) == ["prep"]
    assert s.env == ("LANG", "TZ")
    assert (s.checkpoint, s.retries, s.backoff, s.retry_on, s.timeout) == (True, 4, 2.0, (75, 137), 30.0)
    assert (s.pool, s.network, s.always) == ("heavy", True, True)
    assert recipe(s) == "make <out0>"
    assert s.inputs[1].location == Location("Pipefile", 7, 19)  # each path knows where it was written


@pytest.mark.parametrize("text, seconds", [
    ("30s", 30), ("5m", 300), ("2h", 7200), ("90", 90), ("1.5s", 1.5), ("500ms", 0.5),
])
def test_durations(load, text, seconds):
    s = only(load(f"""
        stage z:
            timeout: {text}
            backoff: {text}
            run: true
    """))
    assert s.timeout == pytest.approx(seconds)
    assert s.backoff == pytest.approx(seconds)


@pytest.mark.parametrize("text, value", [("true", True), ("false", False), ("True", True), ("FALSE", False)])
def test_booleans(load, text, value):
    s = only(load(f"""
        stage z:
            checkpoint: {text}
            network: {text}
            always: {text}
            run: true
    """))
    assert (s.checkpoint, s.network, s.always) == (value, value, value)


def test_fields_take_variables(load):
    s = only(load("""
        src = data/input
        n = 2
        wait = 5m
        vars = HOME LANG
        stage z:
            in: $src/a.txt ${src}/b.txt
            retries: $n
            timeout: $wait
            env: $vars
            run: true
    """))
    assert paths(s.inputs) == ["data/input/a.txt", "data/input/b.txt"]
    assert (s.retries, s.timeout, s.env) == (2, 300, ("HOME", "LANG"))


def test_a_variable_holding_several_paths_gives_several_inputs(load):
    s = only(load("""
        sources = a.txt b.txt
        stage z:
            in: $sources c.txt
            run: cat $in
    """))
    assert paths(s.inputs) == ["a.txt", "b.txt", "c.txt"]


def test_per_job_variables_stay_templates(load):
    s = only(load("""
        stage z:
            in: %.txt
            out: %.up
            run: f $in $in0 $in12 $out $out0 $stage $stem ${in} ${stem}x
    """))
    assert recipe(s) == "f <in> <in0> <in12> <out> <out0> <stage> <stem> <in> <stem>x"
    job_vars = [part for part in s.recipe if isinstance(part, JobVar)]
    assert job_vars[0].location == Location("Pipefile", 5, 12)


def test_stage_without_out_is_a_check(load):
    s = only(load("""
        stage lint:
            in: src.py
            run: flake8 $in
    """))
    assert s.outputs == () and recipe(s) == "flake8 <in>"


def test_stage_names_allow_letters_digits_underscore_dash_dot(load):
    pipeline = load("""
        stage build-2.0_x:
            run: true
        stage 3d:
            run: true
    """)
    assert [s.name for s in pipeline.stages] == ["build-2.0_x", "3d"]


def test_field_spacing_and_blank_lines_and_comments_between_fields(load):
    s = only(load("""
        # leading comment

        stage z:   # comment after the header

            # comment between fields
            in:a.txt
            out :b.txt

            run:   cp $in $out
        # comment at top level
    """))
    assert paths(s.inputs) == ["a.txt"] and paths(s.outputs) == ["b.txt"]
    assert recipe(s) == "cp <in> <out>"


# --- run: blocks -------------------------------------------------------------------------------------------------

def test_block_recipe_is_one_script_with_relative_indentation(load):
    s = only(load("""
        stage z:
            in: a.txt
            out: b.txt
            run:
                for f in $in; do
                    if [ -s "$$f" ]; then
                        cat "$$f"
                    fi
                done > $out
    """))
    assert recipe(s) == ('for f in <in>; do\n'
                         '    if [ -s "$f" ]; then\n'
                         '        cat "$f"\n'
                         '    fi\n'
                         'done > <out>')


def test_block_recipe_keeps_blank_lines_and_is_followed_by_more_fields(load):
    pipeline = load("""
        stage z:
            run:
                echo one

                echo two
            out: z.txt
        stage y:
            run: true
    """)
    s = stage(pipeline, "z")
    assert recipe(s) == "echo one\n\necho two"
    assert paths(s.outputs) == ["z.txt"]
    assert [s.name for s in pipeline.stages] == ["z", "y"]


def test_block_recipe_indented_with_tabs(load, tmp_path):
    (tmp_path / "Pipefile").write_text("stage z:\n\trun:\n\t\tif true; then\n\t\t\techo hi\n\t\tfi\n")
    s = only(load_pipefile(str(tmp_path / "Pipefile"), "Pipefile", {}))
    assert recipe(s) == "if true; then\n\techo hi\nfi"


def test_block_recipe_may_contain_field_like_lines(load):
    s = only(load("""
        stage z:
            run:
                cat <<EOF
                out: not a field
                stage x: not a stage
                EOF
    """))
    assert recipe(s) == "cat <<EOF\nout: not a field\nstage x: not a stage\nEOF"


def test_undefined_variable_in_a_block_points_at_its_line_and_column(load):
    error = load_error(load, """
        stage z:
            run:
                echo one
                  echo $nope
    """)
    assert error.location == Location("Pipefile", 5, 16)


# --- patterns, pools, defaults, includes --------------------------------------------------------------------------

def test_pattern_stage(load):
    s = only(load("""
        stage shout:
            in:  data/input/%.txt extra.cfg
            out: data/work/%.shout
            run: tr a-z A-Z < $in > $out
    """))
    assert s.pattern_input is not None and s.pattern_input.text == "data/input/%.txt"
    assert paths(s.outputs) == ["data/work/%.shout"]


def test_pool_declaration(load):
    pipeline = load("""
        pool heavy = 1
        pool gpu = 4     # two cards, two slots each
        stage a:
            pool: gpu
            run: true
    """)
    assert pipeline.pools == {"heavy": 1, "gpu": 4}
    assert only(pipeline).pool == "gpu"


def test_keywords_are_whole_words(load):
    """`pool`, `stage`, `include`, `run` only count as keywords on their own."""
    pipeline = load("""
        pooling = 1
        stages = 2
        includes = 3
        runner = 4
        stage a:
            run: echo $pooling $stages $includes $runner
    """)
    assert recipe(only(pipeline)) == "echo 1 2 3 4"


def test_default_targets(load):
    pipeline = load("""
        which = b
        stage a:
            run: true
        stage b:
            run: true
        default: a $which out/file.txt
    """)
    assert paths(pipeline.default) == ["a", "b", "out/file.txt"]
    assert pipeline.default[1].location == Location("Pipefile", 7, 12)


def test_no_default_means_empty(load):
    assert load("stage a:\n    run: true\n").default == ()


def test_include_is_relative_to_the_including_file(load, tmp_path):
    (tmp_path / "rules" / "deep").mkdir(parents=True)
    (tmp_path / "rules" / "more.pipe").write_text(textwrap.dedent("""
        tool = $base-tool
        include deep/extra.pipe
        stage middle:
            run: $tool
    """))
    (tmp_path / "rules" / "deep" / "extra.pipe").write_text("stage deepest:\n    run: echo $base\n")
    pipeline = load("""
        base = x
        stage first:
            run: true
        include rules/more.pipe
        stage last:
            run: echo $tool
    """)
    assert [s.name for s in pipeline.stages] == ["first", "deepest", "middle", "last"]
    assert recipe(stage(pipeline, "middle")) == "x-tool"
    assert recipe(stage(pipeline, "last")) == "echo x-tool"  # variables of an include carry on
    assert stage(pipeline, "deepest").location == Location("rules/deep/extra.pipe", 1, 7)
    assert {str(p).replace("\\", "/").split("/")[-1] for p in pipeline.sources} == {
        "Pipefile", "more.pipe", "extra.pipe"}


def test_include_path_may_use_variables(load, tmp_path):
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "a.pipe").write_text("stage a:\n    run: true\n")
    pipeline = load("""
        dir = rules
        include $dir/a.pipe   # the comment is not part of the path
    """)
    assert [s.name for s in pipeline.stages] == ["a"]


def test_same_file_included_twice_is_not_a_cycle(load, tmp_path):
    (tmp_path / "vars.pipe").write_text("n = 1\n")
    pipeline = load("""
        include vars.pipe
        include vars.pipe
    """)
    assert pipeline.variables == {"n": "1"}


# --- the JSON form ------------------------------------------------------------------------------------------------

def without_locations(value):
    """The model with every `Location` blanked, so two loaders' results compare by meaning."""
    if isinstance(value, Location):
        return None
    if isinstance(value, (tuple, list)):
        return type(value)(without_locations(item) for item in value)
    if isinstance(value, dict):
        return {key: without_locations(item) for key, item in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return type(value)(**{f.name: without_locations(getattr(value, f.name)) for f in dataclasses.fields(value)})
    return value


def test_json_form_loads_into_an_equal_model(load):
    pipefile = load("""
        python = python3
        pool heavy = 1
        stage copy:
            doc: copy the raw input
            in:  data/input/sample.txt
            out: data/work/sample.txt
            run: $python rules/copy.py $in $out
        stage upper:
            in:  data/work/sample.txt
            out: data/output/result.txt
            after: copy
            env: LANG
            checkpoint: true
            retries: 3
            backoff: 2s
            retry-on: 75 137
            timeout: 5m
            pool: heavy
            network: false
            always: true
            run:
                $python rules/upper.py $in $out
                echo $$? done
        stage shout:
            in: data/%.txt
            out: data/%.shout
            run: tr a-z A-Z < $in > $out
        default: upper shout
    """)
    document = {
        "vars": {"python": "python3"},
        "pools": {"heavy": 1},
        "stages": [
            {"name": "copy", "doc": "copy the raw input", "in": ["data/input/sample.txt"],
             "out": ["data/work/sample.txt"], "run": "$python rules/copy.py $in $out"},
            {"name": "upper", "in": ["data/work/sample.txt"], "out": ["data/output/result.txt"], "after": ["copy"],
             "env": ["LANG"], "checkpoint": True, "retries": 3, "backoff": "2s", "retry-on": [75, 137],
             "timeout": "5m", "pool": "heavy", "network": False, "always": True,
             "run": ["$python rules/upper.py $in $out", "echo $$? done"]},
            {"name": "shout", "in": "data/%.txt", "out": "data/%.shout", "run": "tr a-z A-Z < $in > $out"},
        ],
        "default": ["upper", "shout"],
    }
    from_json = load(json.dumps(document, indent=2), name="pipeline.json")
    assert without_locations(from_json.stages) == without_locations(pipefile.stages)
    assert without_locations(from_json.default) == without_locations(pipefile.default)
    assert from_json.pools == pipefile.pools and from_json.variables == pipefile.variables


def test_json_overrides_and_string_lists(load):
    pipeline = load(json.dumps({
        "vars": {"dir": "data", "both": "$dir/x"},
        "stages": [{"name": "z", "in": "$dir/a.txt $both", "out": ["out put.txt"], "run": "cat $in > $out"}],
        "default": "z",
    }), overrides={"dir": "elsewhere"}, name="p.json")
    s = only(pipeline)
    assert paths(s.inputs) == ["elsewhere/a.txt", "elsewhere/x"]
    assert paths(s.outputs) == ["out put.txt"]  # a list item is one path, spaces and all
    assert paths(pipeline.default) == ["z"]


def test_json_unknown_field_points_at_its_key(load):
    error = load_error(load, '{"stages": [\n  {"name": "a",\n   "ouput": ["x"]}\n]}\n', name="p.json")
    assert error.message == "unknown field 'ouput' (did you mean 'out'?)"
    assert error.location == Location("p.json", 3, 4)


def test_json_stage_location_is_its_name_not_an_earlier_mention(load):
    error = load_error(load, json.dumps({
        "vars": {"a": "a"},
        "stages": [{"name": "b", "in": ["a"], "run": "x"}, {"name": "a", "run": "x"}, {"name": "a", "run": "y"}],
    }, indent=1), name="p.json")
    assert "stage 'a' is already defined" in error.message
    assert error.location.line == 18


@pytest.mark.parametrize("value", [None, {"x": 1}, [[1]]])
def test_json_field_values_must_be_scalars_or_lists(load, value):
    error = load_error(load, json.dumps({"stages": [{"name": "a", "doc": value, "run": "true"}]}), name="p.json")
    assert "'doc'" in error.message and "stage 'a'" in error.message


# --- load errors, as rendered (the end-to-end cases are in test_load_errors.py) ----------------------------------

def rendered(load, text: str, **kwargs) -> list[str]:
    """The error's lines as the CLI prints them: `FILE:L:C: error: ...`, the source line, the caret."""
    return load_error(load, text, **kwargs).render().splitlines()


def caret(column: int) -> str:
    return " " * (column - 1) + "^"


@pytest.mark.parametrize("text, line, column, message", [
    ("stage a:\n    in data/x.txt\n", 2, 8, "syntax error: unexpected 'data'; expected ':'"),
    ("stage a:\nrun: true\n", 2, 1, "syntax error: unexpected 'run'; expected the stage's fields, indented"),
    ("stage a:\n", 1, 9, "syntax error: unexpected end of file; expected the stage's fields, indented"),
    ("x = 1\n   y = 2\n", 2, 4,
     "syntax error: unexpected indentation (fields belong inside a 'stage NAME:' block)"),
    ("stage a b:\n    run: true\n", 1, 9, "syntax error: unexpected 'b'; expected ':'"),
    ("pool = 3\n", 1, 6, "syntax error: unexpected '= 3'; expected a name"),
    ("defualt: a\n", 1, 1, "unknown statement 'defualt:' (did you mean 'default'?)"),
    ("stage a:\n    runs: true\n", 2, 5, "unknown field 'runs' (did you mean 'run'?)"),
    ("stage a:\n    retry_on: 75\n", 2, 5, "unknown field 'retry_on' (did you mean 'retry-on'?)"),
    ("stage a:\n    run: echo one\n        echo two\n", 3, 9,
     "'run:' has both a one-line recipe and an indented block"),
    ("stage a:\n    out: a\n    out: b\n    run: x\n", 3, 5,
     "field 'out' given twice in stage 'a' (first at Pipefile:2:5)"),
    ("stage a:\n    out: a.txt\n", 1, 7, "stage 'a' declares outputs but has no 'run:'"),
    ("stage a:\n    in: x\n    out: %.up\n    run: x\n", 3, 10,
     "output '%.up' uses '%' but no input of stage 'a' does"),
    ("stage a:\n    in: %.txt\n    out: all.up\n    run: x\n", 3, 10,
     "output 'all.up' of pattern stage 'a' must contain '%' (otherwise every job would write the same file)"),
    ("stage a:\n    in: x\n    out: *.up\n    run: x\n", 3, 10,
     "output '*.up' cannot be a glob: outputs are exact paths"),
    ("a = $root/x\nroot = r\n", 1, 5, "undefined variable 'root' (write $$root if you meant the shell's variable)"),
    ("stage a:\n    run:\n        for f in 1; do\n            echo $f\n        done\n", 4, 18,
     "undefined variable 'f' (write $$f if you meant the shell's variable)"),
    ("stage a:\n    doc: for $stem\n", 2, 14, "undefined variable 'stem' ($stem is only available in 'run:')"),
    ("stage a:\n    run: echo ${x\n", 2, 15, "'${' without a closing '}' (write $${ for the shell)"),
    ("stage a:\n    run: echo ${1}\n", 2, 15, "bad variable reference '${1}'"),
    ("stem = x\n", 1, 1, "'stem' is reserved for recipes and cannot be a variable"),
    ("stage a:\n    run: x\nstage a:\n    run: y\n", 3, 7, "stage 'a' is already defined at Pipefile:1:7"),
    ("default: a\ndefault: b\n", 2, 1, "'default:' given twice (first at Pipefile:1:1)"),
    ("include\n", 1, 1, "'include' needs a file name"),
    ("include nope.pipe\n", 1, 9, "included file 'nope.pipe' not found"),
    ("pool heavy = none\n", 1, 14, "the size of pool 'heavy' must be a whole number of at least 1, not 'none'"),
    ("pool heavy = 0\n", 1, 14, "the size of pool 'heavy' must be a whole number of at least 1, not '0'"),
    ("pool heavy = 1\nstage a:\n    pool: heavvy\n    run: x\n", 3, 11,
     "unknown pool 'heavvy' (did you mean 'heavy'?) (declare it at top level: pool heavvy = N)"),
    ("stage a:\n    retries: three\n    run: x\n", 2, 14,
     "'retries:' must be a whole number of at least 0, not 'three'"),
    ("stage a:\n    retries: -1\n    run: x\n", 2, 14, "'retries:' must be a whole number of at least 0, not '-1'"),
    ("stage a:\n    retry-on: 75 137 1000\n    run: x\n", 2, 22,
     "an exit code in 'retry-on:' must be a whole number from 0 to 255, not '1000'"),
    ("stage a:\n    retry-on: 75 x\n    run: x\n", 2, 18,
     "an exit code in 'retry-on:' must be a whole number from 0 to 255, not 'x'"),
    ("stage a:\n    env: LANG MY-VAR\n    run: x\n", 2, 15, "'MY-VAR' is not an environment variable name"),
])
def test_load_error_is_located_with_source_line_and_caret(load, text, line, column, message):
    lines = rendered(load, text)
    assert lines[0] == f"Pipefile:{line}:{column}: error: {message}"
    assert lines[1] == text.split("\n")[line - 1]
    assert lines[2] == caret(column)


@pytest.mark.parametrize("field", ["timeout", "backoff"])
@pytest.mark.parametrize("value", ["5 minutes", "-1s", "fast", "5d", "1h30m"])
def test_bad_durations(load, field, value):
    lines = rendered(load, f"stage a:\n    {field}: {value}\n    run: x\n")
    column = len(f"    {field}: ") + 1
    assert lines[0] == f"Pipefile:2:{column}: error: bad duration '{value}' (use e.g. 30s, 5m, 2h)"
    assert lines[2] == caret(column)


@pytest.mark.parametrize("field", ["checkpoint", "network", "always"])
@pytest.mark.parametrize("value", ["maybe", "2", "truee"])
def test_bad_booleans(load, field, value):
    lines = rendered(load, f"stage a:\n    {field}: {value}\n    run: x\n")
    column = len(f"    {field}: ") + 1
    assert lines[0] == f"Pipefile:2:{column}: error: '{field}:' must be true or false, not '{value}'"


def test_empty_boolean_points_at_the_colon(load):
    lines = rendered(load, "stage a:\n    always:\n    run: x\n")
    assert lines[0] == "Pipefile:2:11: error: 'always:' must be true or false, not ''"


def test_indented_first_line(load, tmp_path):
    (tmp_path / "Pipefile").write_text("  x = 1\n")
    with pytest.raises(LoadError) as caught:
        load_pipefile(str(tmp_path / "Pipefile"), "Pipefile", {})
    assert caught.value.render().splitlines() == [
        "Pipefile:1:3: error: syntax error: unexpected indentation (fields belong inside a 'stage NAME:' block)",
        "  x = 1", caret(3)]


def test_error_in_an_included_file_is_located_there(load, tmp_path):
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "more.pipe").write_text("x = 1\nstage b:\n    ouput: x\n")
    lines = rendered(load, "stage a:\n    run: x\ninclude rules/more.pipe\n")
    assert lines == ["rules/more.pipe:3:5: error: unknown field 'ouput' (did you mean 'out'?)", "    ouput: x",
                     caret(5)]


def test_include_cycle_is_named_as_a_chain(load, tmp_path):
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "a.pipe").write_text("include b.pipe\n")
    (tmp_path / "rules" / "b.pipe").write_text("include ../Pipefile\n")
    lines = rendered(load, "include rules/a.pipe\n")
    assert lines[0] == "rules/b.pipe:1:9: error: include cycle: Pipefile → rules/a.pipe → rules/b.pipe → Pipefile"


def test_file_including_itself(load):
    lines = rendered(load, "\ninclude Pipefile\n")
    assert lines[0] == "Pipefile:2:9: error: include cycle: Pipefile → Pipefile"


def test_non_utf8_is_located_at_the_bad_byte(load, tmp_path):
    (tmp_path / "Pipefile").write_bytes("stage a:\n    run: echo é \xff".encode("utf-8", "surrogateescape")
                                        .replace(b"\xc3\xbf", b"\xff"))
    with pytest.raises(LoadError) as caught:
        load_pipefile(str(tmp_path / "Pipefile"), "Pipefile", {})
    lines = caught.value.render().splitlines()
    assert lines[0] == "Pipefile:2:17: error: 'Pipefile' is not valid UTF-8 text (invalid start byte 0xff)"
    assert lines[1:] == ["    run: echo é \ufffd", caret(17)]


def test_snippet_is_read_from_the_file_not_the_working_directory(load, tmp_path, monkeypatch):
    """After `-C DIR` or the chdir to the project root, the relative name may point elsewhere."""
    error = load_error(load, "stage a:\n    ouput: x\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "Pipefile").write_text("# another file\n# with other lines\n")
    monkeypatch.chdir(elsewhere)
    assert error.render().splitlines()[1:] == ["    ouput: x", caret(5)]


def test_caret_under_tab_indented_source(load, tmp_path):
    (tmp_path / "Pipefile").write_text("stage a:\n\touput: x\n")
    with pytest.raises(LoadError) as caught:
        load_pipefile(str(tmp_path / "Pipefile"), "Pipefile", {})
    assert caught.value.render().splitlines() == [
        "Pipefile:2:2: error: unknown field 'ouput' (did you mean 'out'?)", " ouput: x", caret(2)]


def test_snippet_line_numbers_ignore_form_feeds(load):
    lines = rendered(load, "stage a:\n    run: printf '\f'\n    ouput: x\n")
    assert lines[1:] == ["    ouput: x", caret(5)]


def test_json_invalid(load):
    lines = rendered(load, '{"stages": [\n  {"name": "a", "run": "x",}\n]}\n', name="p.json")
    assert lines == ["p.json:2:28: error: invalid JSON: Expecting property name enclosed in double quotes",
                     '  {"name": "a", "run": "x",}', caret(28)]


def test_json_not_an_object(load):
    lines = rendered(load, "[]\n", name="p.json")
    assert lines[0] == 'p.json:1:1: error: a JSON pipeline must be an object with a "stages" list'


def test_json_unknown_top_level_key(load):
    lines = rendered(load, '{\n  "stage": []\n}\n', name="p.json")
    assert lines[0] == "p.json:2:3: error: unknown key 'stage' (expected vars, pools, stages, default)"


def test_json_bad_value_points_at_the_value(load):
    lines = rendered(load, '{"stages": [\n  {"name": "a", "run": "x",\n   "timeout": "soon"}]}\n', name="p.json")
    assert lines == ["p.json:3:16: error: bad duration 'soon' (use e.g. 30s, 5m, 2h)", '   "timeout": "soon"}]}',
                     caret(16)]


def test_json_bad_list_item_points_at_the_item(load):
    text = '{"stages": [\n  {"name": "a", "run": "x",\n   "retry-on": [75, 137, 300]}]}\n'
    lines = rendered(load, text, name="p.json")
    assert lines[0] == ("p.json:3:26: error: an exit code in 'retry-on:' must be a whole number from 0 to 255,"
                        " not '300'")
    assert lines[2] == caret(26)


def test_json_undefined_variable_points_into_the_string(load):
    text = '{"stages": [{"name": "a", "run": "echo $HOME"}]}'
    lines = rendered(load, text, name="p.json")
    column = text.index("$HOME") + 1
    assert lines[0] == (f"p.json:1:{column}: error: undefined variable 'HOME'"
                        " (write $$HOME if you meant the shell's variable)")
    assert lines[2] == caret(column)


def test_comment_after_run_colon_above_a_block(load):
    s = only(load("""
        stage z:
            run:   # the recipe, in the block below
                if true; then
                    echo hi
                fi
            doc: d
    """))
    assert recipe(s) == "if true; then\n    echo hi\nfi"
    assert s.doc == "d"


def test_one_line_recipe_above_a_nested_block_is_explained(load):
    lines = rendered(load, "stage a:\n    run: echo one\n        if true; then\n            echo two\n        fi\n")
    assert lines[0] == "Pipefile:3:9: error: 'run:' has both a one-line recipe and an indented block"


def test_a_lone_dollar_reaches_the_shell(load):
    assert recipe(only(load("stage z:\n    run: echo cost: 5$\n"))) == "echo cost: 5$"


@pytest.mark.parametrize("loader", ["Pipefile", "p.json"])
def test_reserved_names_cannot_be_overridden(load, loader):
    text = '{"stages": []}' if loader.endswith(".json") else "x = 1\n"
    with pytest.raises(UsageError, match="cannot set 'in' on the command line"):
        load(text, overrides={"in": "x"}, name=loader)


def test_json_non_utf8_is_located(load, tmp_path):
    (tmp_path / "p.json").write_bytes(b'{"stages": [\n  {"name": "caf\xe9"}]}\n')
    with pytest.raises(LoadError) as caught:
        load_json(str(tmp_path / "p.json"), "p.json", {})
    assert caught.value.render().splitlines()[0] == (
        "p.json:2:16: error: 'p.json' is not valid UTF-8 (invalid continuation byte 0xe9)")
