"""Glob and environment patterns: what each form matches, and every unsupported form refused by name."""

import pytest

from polykit_client.envpatterns import EnvPatternError, select
from polykit_client.globs import GlobSet, PatternError
from polykit_client.workspace import ConfigError, load

# (patterns, path, matched?)
GLOBS = [
    (["dist"], "dist/app.js", True),  # a folder name covers everything under it
    (["dist"], "dist", True),
    (["dist"], "distro/app.js", False),
    (["dist/"], "dist/a/b.js", True),
    (["./dist/**"], "dist/a.js", True),
    (["{projectRoot}/dist"], "dist/a.js", True),
    (["*.js"], "app.js", True),
    (["*.js"], "src/app.js", False),  # * stays within a name
    (["src/*.ts"], "src/a/b.ts", False),
    (["src/**"], "src/a/b/c.ts", True),
    (["src/**/*.ts"], "src/c.ts", True),  # ** also matches no folder at all
    (["src/**/*.ts"], "src/a/b/c.ts", True),
    (["**/*.ts"], "c.ts", True),
    (["data?.json"], "data1.json", True),
    (["data?.json"], "data10.json", False),
    (["data?.json"], "data/.json", False),
    (["[ab].txt"], "a.txt", True),
    (["[ab].txt"], "c.txt", False),
    (["[!ab].txt"], "c.txt", True),
    (["[!ab].txt"], "a.txt", False),
    (["a[!x]b"], "a/b", False),  # a class is one character of a name, never "/"
    (["[a-c]x"], "bx", True),
    (["*.{js,ts}"], "a.ts", True),
    (["*.{js,ts}"], "a.py", False),
    (["src/**", "!src/**/*.test.ts"], "src/a/b.test.ts", False),
    (["src/**", "!src/**/*.test.ts"], "src/a/b.ts", True),
    ([".next/**", "!.next/cache/**"], ".next/cache/x/y.bin", False),
    ([".next/**", "!.next/cache"], ".next/cache/x/y.bin", False),  # ! covers what it names, as if /** followed
    ([".next/**", "!.next/cache/**"], ".next/page.js", True),
    # An exclusion wins whatever the order: a later inclusion does not bring a path back.
    (["!src/gen/**", "src/**"], "src/gen/a.ts", False),
    (["src/**", "!src/gen/**", "src/gen/keep.ts"], "src/gen/keep.ts", False),
]


@pytest.mark.parametrize("patterns,path,expected", GLOBS)
def test_glob_forms(patterns, path, expected):
    assert GlobSet(patterns).matches(path) is expected


UNSUPPORTED = {
    "!!src/**": "double negation",
    "src\\*.ts": "backslash",
    "$TURBO_ROOT$/config.txt": "$TURBO_ROOT$",
    "{workspaceRoot}/dist": "not a glob",
    "{options.outputPath}": "not a glob",
    "^production": "named inputs",
    "src/**.ts": "whole path segment",
    "a[bc": "no closing ']'",
    "{a,{b,c}}": "cannot nest",
    "a}b": "without an opening",
    "../shared/**": "stay inside",
    "/abs/**": "stay inside",
    "!": "empty",
}


@pytest.mark.parametrize("pattern", sorted(UNSUPPORTED))
def test_an_unsupported_pattern_is_refused_by_name(pattern):
    with pytest.raises(PatternError) as err:
        GlobSet([pattern])
    assert UNSUPPORTED[pattern] in str(err.value) and repr(pattern) in str(err.value)


def test_turbo_default_is_known_in_inputs_only():
    assert GlobSet(["$TURBO_DEFAULT$", "!README.md"], default_allowed=True).default
    with pytest.raises(PatternError, match="not supported here"):
        GlobSet(["$TURBO_DEFAULT$"])


def _workspace(tmp_path, task: str, root_extra: str = "") -> None:
    (tmp_path / "packages/a").mkdir(parents=True)
    (tmp_path / "polykit.toml").write_text(f'[workspace]\npackages_dir = "packages"\n{root_extra}')
    (tmp_path / "packages/a/polykit.toml").write_text(f'name = "a"\n[tasks]\nbuild = {task}\n')


@pytest.mark.parametrize("task,message", [
    ('{ command = "b", outputs = ["dist/**", "!!dist/x"] }', "task 'build': outputs: pattern '!!dist/x'"),
    ('{ command = "b", inputs = ["^production"] }', "task 'build': inputs: pattern '^production'"),
    ('{ command = "b", outputs = ["$TURBO_DEFAULT$"] }', "not supported here"),
    ('{ command = "b", inputs = ["!src/**/*.test.ts"] }', "has only exclusions"),
    ('{ command = "b", outputs = ["!.next/cache/**"] }', "has only exclusions"),
    ('{ command = "b", env = ["API URL"] }', "environment entry 'API URL' is not supported"),
    ('{ command = "b", env = ["$HOME"] }', "environment entry '$HOME'"),
])
def test_a_task_with_an_unsupported_form_is_a_configuration_error(tmp_path, task, message):
    _workspace(tmp_path, task)
    with pytest.raises(ConfigError) as err:
        load(tmp_path, {})
    assert message in str(err.value) and "packages/a/polykit.toml:3" in str(err.value)


@pytest.mark.parametrize("setting,message", [
    ('input_files = ["src/**", "{workspaceRoot}/x"]', "input_files: pattern '{workspaceRoot}/x'"),
    ('input_files = ["!README.md"]', "input_files has only exclusions"),
    ('env_vars = ["NODE ENV"]', "env_vars: environment entry 'NODE ENV'"),
])
def test_a_workspace_setting_with_an_unsupported_form_is_a_configuration_error(tmp_path, setting, message):
    _workspace(tmp_path, '"b"', f"[remote_cache]\n{setting}\n")
    with pytest.raises(ConfigError) as err:
        load(tmp_path, {})
    assert message in str(err.value) and "polykit.toml:4" in str(err.value)


ENVIRON = {"NEXT_PUBLIC_API": "https://x", "NEXT_PUBLIC_BUILD_ID": "7", "NODE_ENV": "production",
           "DB_URL": "db", "API_URL": "api", "A_B": "1", "AXB": "2", "next_public_lower": "l"}

# (entries, recorded name -> value)
ENV = [
    (["NODE_ENV"], {"NODE_ENV": "production"}),
    (["MISSING"], {"MISSING": None}),  # a plain name is recorded even when unset
    (["NEXT_PUBLIC_*"], {"NEXT_PUBLIC_API": "https://x", "NEXT_PUBLIC_BUILD_ID": "7"}),  # case-sensitive
    (["NEXT_PUBLIC_*", "!NEXT_PUBLIC_BUILD_ID"], {"NEXT_PUBLIC_API": "https://x"}),
    (["!NEXT_PUBLIC_BUILD_ID", "NEXT_PUBLIC_*"], {"NEXT_PUBLIC_API": "https://x"}),  # in any order
    (["*_URL"], {"API_URL": "api", "DB_URL": "db"}),
    (["A*B"], {"A_B": "1", "AXB": "2"}),
    (["*_URL", "!DB_*"], {"API_URL": "api"}),
    (["NODE_ENV", "!NODE_ENV"], {}),
    (["NOTHING_*"], {}),  # a wildcard matching nothing records nothing
]


@pytest.mark.parametrize("entries,expected", ENV)
def test_env_forms(entries, expected):
    assert select(entries, ENVIRON) == expected


def test_an_env_wildcard_with_many_stars_is_matched_in_linear_time():
    # "[^\0]*" per star backtracked: "*A" eight times then "*B" took 3 s on one 40-letter name,
    # and each further star multiplied that by the name's length.
    from polykit_client.envpatterns import _regex

    stars = "*A" * 8 + "*B"
    assert "(?>" in _regex([stars]).pattern  # each star between literals is atomic
    assert select([stars], {"A" * 40: "x", "ABAB" * 5 + "B": "y"}) == {"ABAB" * 5 + "B": "y"}
    assert select(["A*.B-C*"], {"A1.B-C2": "1", "A1XB-C2": "2"}) == {"A1.B-C2": "1"}  # '.' and '-' are literal


def test_an_unsupported_env_entry_is_refused():
    with pytest.raises(EnvPatternError, match="'A=B'"):
        select(["A=B"], ENVIRON)


@pytest.mark.parametrize("repeated,single", [
    ("**/**/**/**/**/**/**/**/**/**/**/**/x.js", "**/x.js"),
    ("src/**/**/*.js", "src/**/*.js"),
    ("dist/**/**", "dist/**"),
])
def test_repeated_double_stars_mean_one(repeated, single):
    from polykit_client.globs import tokens

    assert tokens(repeated) == tokens(single)
    deep = "/".join(["a"] * 30)
    for path in (f"{deep}/x.js", f"src/{deep}/y.js", f"dist/{deep}", f"{deep}/y.ts"):
        assert GlobSet([repeated]).matches(path) == GlobSet([single]).matches(path)


@pytest.mark.parametrize("pattern,path,expected", [
    # Every way of sharing 400 folders among four "**" is a power of the path's length for a
    # backtracking matcher (years for the first row); read once through the automaton, each is
    # a few thousand steps.
    ("**/a/**/a/**/a/**/a/**/b", "a/" * 400 + "c", False),
    ("**/a/**/a/**/a/**/a/**/b", "a/" * 400 + "b", True),
    ("**/a/**/a/**/a/**/a/**/b", "a/" * 400 + "b/c", True),  # the folder b covers what is under it
    ("{a,a*}/**/a/**/{a,b?}/**/b", "a/" * 400 + "c", False),
    # The same within one name: "*a*a*a*a*b" against a long name of "a".
    ("*a*a*a*a*a*a*b", "a" * 4000, False),
    ("*a*a*a*a*a*a*b", "a" * 4000 + "b", True),
    ("src/*[!x]*[!x]*[!x]*y", "src/" + "a" * 4000, False),
])
def test_adversarial_patterns_are_matched_in_one_pass(pattern, path, expected):
    from polykit_client import globmatch

    globs = GlobSet([pattern])
    assert globs.matches(path) is expected
    # Each character costs one transition: the deterministic states met stay few (a handful per
    # pattern state), however long the path.
    assert len(globs._include._sets) <= globmatch.MAX_STATES
    assert len(globs._include._sets) < 40


def test_a_matcher_whose_states_overflow_starts_again_and_still_answers(monkeypatch):
    from polykit_client import globmatch

    monkeypatch.setattr(globmatch, "MAX_STATES", 3)
    globs = GlobSet(["**/a/**/a/**/b", "*.{js,ts}"])
    for path, expected in (("x/a/y/a/z/b", True), ("x/a/y/b", False), ("q.ts", True), ("q/a/a/b/r.js", True)):
        assert globs.matches(path) is expected, path
