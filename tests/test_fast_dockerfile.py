"""A Dockerfile becomes the template build the E2B SDK's `Template().from_dockerfile()` makes of it (the
same steps and the same COPY file hashes, so both share cached layers), or a clear error before anything is
uploaded. Pure conversion: no server, no root."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from e2b import Template
from e2b.template.utils import calculate_files_hash, read_dockerignore

from corral.templates.dockerfile import DockerfileError, IgnoreRules, convert, files_hash, unquote, write_archive


@pytest.fixture()
def context(tmp_path: Path) -> Path:
    """Files, a folder with a subfolder, a dotfile, a symlink, and a .dockerignore with a re-inclusion."""
    (tmp_path / "a.txt").write_text("hi\n")
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("b\n")
    (folder / "sub" / "c.txt").write_text("c\n")
    (folder / ".hidden").write_text("h\n")
    (folder / "z.log").write_text("log\n")
    (folder / "run.sh").write_text("#!/bin/sh\n")
    (folder / "run.sh").chmod(0o755)
    os.symlink("b.txt", folder / "link")
    secret = tmp_path / "private"
    secret.mkdir()
    (secret / "key").write_text("k\n")
    (secret / "public").write_text("p\n")
    (tmp_path / ".dockerignore").write_text("# comment\nprivate\n!private/public\n*.log\n**/*.log\n")
    return tmp_path


def sdk_body(text: str, context: Path) -> dict:
    return json.loads(Template.to_json(Template(file_context_path=str(context)).from_dockerfile(text)))


def body(text: str, context: Path) -> dict:
    return convert(text, context).body(from_template=False)


EVERYTHING = """\
FROM python:3.11
ENV a=b c="d e" PATH=/opt/bin:$PATH
ENV single spaced value
ARG WITHOUT_DEFAULT
ARG N=1 M="two words"
RUN apt-get update \\
    && echo "continued $HOME"
RUN ["echo", "exec form", "it's"]
COPY --chown=user:user a.txt folder/ /app/
COPY --chmod=755 folder/* /scripts
ADD private/public /p
COPY . /everything
COPY ["a.txt", "/json form/"]
WORKDIR /app
USER nobody
EXPOSE 8080
LABEL x=y
RUN <<EOF
echo from a heredoc
EOF
RUN cat <<EOF > /etc/motd
hello
EOF
CMD ["python3", "-m", "http.server", "8080"]
"""


def test_conversion_equals_the_sdks_steps_and_file_hashes(context):
    assert body(EVERYTHING, context) == sdk_body(EVERYTHING, context)


def test_files_hash_equals_the_sdks_for_files_folders_globs_and_dockerignore(context):
    patterns = read_dockerignore(str(context))
    for src in ("a.txt", "folder", "folder/", "folder/*", "**/*.txt", ".", "private/public", "folder/link"):
        expected = calculate_files_hash(src, "/dest", str(context), patterns, False, None)
        assert files_hash(src, "/dest", context, IgnoreRules(patterns)) == expected, src


def test_steps_start_as_docker_and_end_as_e2b(tmp_path):
    steps = body("FROM base\nRUN true\n", tmp_path)["steps"]
    assert [(s["type"], s["args"]) for s in steps] == [
        ("USER", ["root"]), ("WORKDIR", ["/"]), ("RUN", ["true"]), ("USER", ["user"]), ("WORKDIR", ["/home/user"])]


def test_user_and_workdir_set_by_the_dockerfile_are_kept(tmp_path):
    steps = body("FROM base\nUSER app\nWORKDIR /srv\n", tmp_path)["steps"]
    assert [(s["type"], s["args"]) for s in steps][-2:] == [("USER", ["app"]), ("WORKDIR", ["/srv"])]


@pytest.mark.parametrize(("lines", "start"), [
    ('CMD ["node", "server.js"]', "node server.js"),
    ("CMD node server.js --port 3000", "node server.js --port 3000"),
    ('ENTRYPOINT ["tini", "--"]\nCMD ["node", "a b.js"]', "tini -- node 'a b.js'"),
    ('ENTRYPOINT ["sh"]\nCMD echo hi', "sh /bin/sh -c 'echo hi'"),
    ("ENTRYPOINT exec server\nCMD ignored", "exec server"),
])
def test_cmd_and_entrypoint_combine_as_docker_does_with_a_20s_ready_wait(tmp_path, lines, start):
    converted = body(f"FROM base\n{lines}\n", tmp_path)
    assert (converted["startCmd"], converted["readyCmd"]) == (start, "sleep 20")
    assert converted == sdk_body(f"FROM base\n{lines}\n", tmp_path)


def test_no_cmd_means_no_start_command(tmp_path):
    converted = body("FROM base\n", tmp_path)
    assert "startCmd" not in converted and "readyCmd" not in converted


def test_from_uses_the_args_declared_before_it(tmp_path):
    assert convert("ARG VERSION=3.12\nFROM python:${VERSION}-slim\n", tmp_path).base == "python:3.12-slim"
    assert convert("ARG TAG\nFROM debian:${TAG:-bookworm}\n", tmp_path).base == "debian:bookworm"


def test_base_goes_as_from_template_or_from_image(tmp_path):
    spec = convert("FROM base\n", tmp_path)
    assert spec.body(from_template=True)["fromTemplate"] == "base"
    assert "fromTemplate" not in spec.body(from_template=False)
    assert spec.body(from_template=False, force=True)["force"] is True


def test_unsupported_instructions_and_flags_are_ignored_with_a_warning(tmp_path):
    spec = convert("FROM base\nEXPOSE 80\nHEALTHCHECK CMD true\nRUN --mount=type=cache,target=/c true\n", tmp_path)
    assert spec.warnings == [
        "Dockerfile line 2: EXPOSE is not supported in a template and is ignored",
        "Dockerfile line 3: HEALTHCHECK is not supported in a template and is ignored",
        "Dockerfile line 4: RUN --mount is not supported in a template and is ignored"]
    assert [s["args"] for s in spec.steps if s["type"] == "RUN"] == [["true"]]


def test_multi_stage_dockerfile_is_refused(tmp_path):
    message = r"line 3: multi-stage Dockerfiles are not supported \(FROM on lines 1, 3\)"
    with pytest.raises(DockerfileError, match=message):
        convert("FROM golang AS build\nRUN go build\nFROM base\n", tmp_path)


def test_copy_from_another_stage_is_refused(tmp_path):
    with pytest.raises(DockerfileError, match="line 2: COPY --from is not supported"):
        convert("FROM base\nCOPY --from=build /out /app\n", tmp_path)


def test_add_from_a_url_is_refused(tmp_path):
    with pytest.raises(DockerfileError, match=r"line 2: ADD from a URL is not supported \(https://x.test/f\)"):
        convert("FROM base\nADD https://x.test/f /f\n", tmp_path)


@pytest.mark.parametrize("src", ["/etc/passwd", "../outside", "a/../../outside"])
def test_copy_from_outside_the_context_is_refused(tmp_path, src):
    with pytest.raises(DockerfileError, match="is outside the build context"):
        convert(f"FROM base\nCOPY {src} /x\n", tmp_path)


def test_copy_of_missing_files_is_refused(tmp_path):
    with pytest.raises(DockerfileError, match=r"line 2: COPY nothing\.txt: no files match it in the build context"):
        convert("FROM base\nCOPY nothing.txt /x\n", tmp_path)


def test_missing_from_and_bad_chmod_and_unknown_flags_are_refused(tmp_path):
    with pytest.raises(DockerfileError, match="has no FROM instruction"):
        convert("RUN true\n", tmp_path)
    (tmp_path / "f").write_text("")
    with pytest.raises(DockerfileError, match=r"line 2: --chmod=u\+rwx is not an octal mode"):
        convert("FROM base\nCOPY --chmod=u+rwx f /f\n", tmp_path)
    with pytest.raises(DockerfileError, match="line 2: unknown flag --bogus=1 for RUN"):
        convert("FROM base\nRUN --bogus=1 true\n", tmp_path)
    with pytest.raises(DockerfileError, match="RUN must come after FROM"):
        convert("RUN true\nFROM base\n", tmp_path)


def test_words_lose_quotes_and_escapes_but_keep_variable_references():
    assert unquote('"a b"') == "a b"
    assert unquote("'$HOME'") == "$HOME"
    assert unquote('"${X:-y z}"/$Y') == "${X:-y z}/$Y"
    assert unquote(r"a\ b") == "a b"
    assert unquote(r'"q\"uote"') == 'q"uote'
    assert unquote("a`b", escape="`") == "ab"
    with pytest.raises(ValueError, match="matching"):
        unquote('"open')


def test_escape_directive_changes_the_escape_character(tmp_path):
    text = "# escape=`\nFROM base\nENV DIR=C:\\x\nRUN echo one `\n  two\n"
    assert body(text, tmp_path) == sdk_body(text, tmp_path)


def test_archive_holds_the_copied_files_relative_to_the_context(context):
    out = io.BytesIO()
    write_archive("folder", context, IgnoreRules.of_context(context), out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue()), mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert sorted(members) == ["folder", "folder/.hidden", "folder/b.txt", "folder/link", "folder/run.sh",
                               "folder/sub", "folder/sub/c.txt"]
    assert members["folder/link"].issym() and members["folder/link"].linkname == "b.txt"
    assert members["folder/run.sh"].mode & 0o777 == 0o755


def test_dockerignore_reinclusion_and_directory_patterns():
    rules = IgnoreRules(["private", "!private/public", "**/*.log", "/build/"])
    assert rules.ignored("private") and rules.ignored("private/key")
    assert not rules.ignored("private/public")
    assert rules.ignored("deep/dir/x.log") and rules.ignored("x.log")
    assert rules.ignored("build/out.bin") and not rules.ignored("src/build")
