"""Turns a Dockerfile into an E2B template build, as the SDK's `Template().from_dockerfile()` does, for
`corral template build --dockerfile`.

The Dockerfile is parsed by BuildKit's own parser (the `dockerfile` package); this module maps its
instructions to build steps (RUN, COPY, ENV, WORKDIR, USER, start and ready commands) and hashes each
COPY's files exactly as the SDK does, so a build from the CLI and one from the SDK share cached layers. It
also writes the tar archive a COPY's files are uploaded in. It never talks to a server: the caller decides
whether the base is a template (`fromTemplate`) or an image (`fromImage`).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shlex
import stat
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import dockerfile as buildkit
from wcmatch import glob

READY_AFTER_START = "sleep 20"  # E2B's ready command for a Dockerfile's CMD/ENTRYPOINT (wait_for_timeout(20_000))

# flag -> takes a value; a flag in _IGNORED_FLAGS is accepted and ignored with a warning.
_FLAGS: dict[str, dict[str, bool]] = {
    "FROM": {"platform": True},
    "RUN": {"mount": True, "network": True, "security": True, "device": True},
    "COPY": {"chown": True, "chmod": True, "from": True, "link": False, "exclude": True, "parents": False},
}
_FLAGS["ADD"] = {**_FLAGS["COPY"], "keep-git-dir": False, "checksum": True, "unpack": False}
_IGNORED_FLAGS = {"platform", "mount", "network", "security", "device", "link", "exclude", "parents", "keep-git-dir",
                  "checksum", "unpack"}
_CHMOD = re.compile(r"^[0-7]{3,4}$")
_REMOTE = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
_ESCAPE_DIRECTIVE = re.compile(r"^#\s*escape\s*=\s*(\S)\s*$", re.IGNORECASE)
_DIRECTIVE = re.compile(r"^#\s*[a-z]+\s*=", re.IGNORECASE)
_VARIABLE = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-+])?(?P<word>[^}]*)\}"
                       r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")
_HEREDOC = re.compile(r"^<<(-?)([\"']?)([A-Za-z0-9_.-]+)\2$")


class DockerfileError(ValueError):
    """The Dockerfile cannot be turned into a template build; the message says what and where."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(f"Dockerfile line {line}: {message}" if line else message)
        self.line = line


@dataclass
class TemplateSpec:
    """A Dockerfile as a template build: `base` is what its FROM names."""

    base: str
    steps: list[dict] = field(default_factory=list)
    start_cmd: str | None = None
    ready_cmd: str | None = None
    warnings: list[str] = field(default_factory=list)

    def body(self, *, from_template: bool, force: bool = False) -> dict:
        """The body of `POST /v2/templates/{id}/builds/{build}`."""
        body: dict = {"steps": self.steps, "force": force,
                      ("fromTemplate" if from_template else "fromImage"): self.base}
        if self.start_cmd is not None:
            body["startCmd"] = self.start_cmd
        if self.ready_cmd is not None:
            body["readyCmd"] = self.ready_cmd
        return body

    def copies(self) -> list[dict]:
        return [step for step in self.steps if step["type"] == "COPY"]


def convert(text: str, context: Path) -> TemplateSpec:
    """The template build `text` (a Dockerfile's content) describes; COPY sources are files under
    `context`, filtered by its `.dockerignore`. Raises DockerfileError for what a template cannot do."""
    escape = _escape_token(text)
    try:
        instructions = buildkit.parse_string(text)
    except buildkit.GoParseError as e:
        raise DockerfileError(str(e)) from None
    return _Converter(escape, context.resolve(), IgnoreRules.of_context(context)).convert(instructions)


class _Converter:
    def __init__(self, escape: str, context: Path, ignore: IgnoreRules) -> None:
        self.escape = escape
        self.context = context
        self.ignore = ignore
        self.spec: TemplateSpec | None = None
        self.args_before_from: dict[str, str] = {}
        self.cmd: buildkit.Command | None = None
        self.entrypoint: buildkit.Command | None = None
        self.user_set = self.workdir_set = False

    def convert(self, instructions: Sequence[buildkit.Command]) -> TemplateSpec:
        froms = [i for i in instructions if i.cmd == "FROM"]
        if len(froms) > 1:
            raise DockerfileError(f"multi-stage Dockerfiles are not supported (FROM on lines "
                                  f"{', '.join(str(i.start_line) for i in froms)}); a template has one base: "
                                  "keep one FROM and copy what the other stages built into the context",
                                  froms[1].start_line)
        if not froms:
            raise DockerfileError("the Dockerfile has no FROM instruction")
        for instruction in instructions:
            if instruction.start_line < froms[0].start_line and instruction.cmd == "ARG":
                for name, value in self._arg_pairs(instruction):
                    self.args_before_from[name] = _substitute(value, self.args_before_from)
        self.spec = TemplateSpec(base=self._base(froms[0]))
        # Docker's defaults for the steps; E2B's (`user` in /home/user) come back at the end.
        self._step("USER", "root")
        self._step("WORKDIR", "/")
        for instruction in instructions:
            if instruction.cmd == "FROM":
                continue
            if instruction.start_line < froms[0].start_line and instruction.cmd != "ARG":
                raise DockerfileError(f"{instruction.cmd} must come after FROM", instruction.start_line)
            self._instruction(instruction)
        self._start_command()
        if not self.user_set:
            self._step("USER", "user")
        if not self.workdir_set:
            self._step("WORKDIR", "/home/user")
        return self.spec

    # --- instructions -------------------------------------------------------------------------------

    def _instruction(self, i: buildkit.Command) -> None:
        if i.cmd == "RUN":
            self._flags(i)
            if not i.value or not "".join(i.value).strip():
                raise DockerfileError("RUN needs a command", i.start_line)
            self._step("RUN", shlex.join(i.value) if i.json else self._run_text(i))
        elif i.cmd in ("COPY", "ADD"):
            self._copy(i)
        elif i.cmd in ("ENV", "ARG"):
            pairs = self._env_pairs(i) if i.cmd == "ENV" else self._arg_pairs(i)
            if pairs:
                self._step("ENV", *[item for pair in pairs for item in pair])
        elif i.cmd == "WORKDIR":
            self._step("WORKDIR", self._single(i))
            self.workdir_set = True
        elif i.cmd == "USER":
            self._step("USER", self._single(i))
            self.user_set = True
        elif i.cmd in ("CMD", "ENTRYPOINT"):
            self._flags(i)
            if i.cmd == "CMD":
                self.cmd = i
            else:
                self.entrypoint = i
        else:
            self._warn(f"{i.cmd} is not supported in a template and is ignored", i.start_line)

    def _base(self, i: buildkit.Command) -> str:
        self._flags(i)
        if not (len(i.value) == 1 or (len(i.value) == 3 and i.value[1].lower() == "as")):
            raise DockerfileError("FROM takes an image and optionally `AS name`", i.start_line)
        # Docker substitutes the ARGs declared before FROM into it.
        base = _substitute(self._word(i.value[0], i), self.args_before_from)
        if not base:
            raise DockerfileError(f"FROM {i.value[0]} names no image", i.start_line)
        return base

    def _run_text(self, i: buildkit.Command) -> str:
        line = i.value[0]
        if not i.heredocs:
            return line
        if len(i.heredocs) == 1 and (m := _HEREDOC.match(line.strip())):
            content = i.heredocs[0].content
            if m.group(1):
                content = "".join(part.lstrip("\t") for part in content.splitlines(keepends=True))
            if content.startswith("#!"):
                raise DockerfileError("a RUN heredoc with a #! line is not supported; run its interpreter "
                                      "instead, e.g. RUN python3 <<EOF", i.start_line)
            return content
        # A heredoc inside a longer command (`cat <<EOF > file`): the shell reads it as written.
        return line + "".join(f"\n{h.content}{h.name}" for h in i.heredocs)

    def _copy(self, i: buildkit.Command) -> None:
        flags = self._flags(i)
        if "from" in flags:
            raise DockerfileError(f"{i.cmd} --from is not supported (a template has one stage): copy the files "
                                  "into the build context instead", i.start_line)
        if i.heredocs:
            raise DockerfileError(f"{i.cmd} with a heredoc is not supported: write the file with RUN instead",
                                  i.start_line)
        if len(i.value) < 2:
            raise DockerfileError(f"{i.cmd} needs a source and a destination", i.start_line)
        user = self._word(flags["chown"], i) if "chown" in flags else ""
        mode = ""
        if "chmod" in flags:
            mode = self._word(flags["chmod"], i)
            if not _CHMOD.match(mode):
                raise DockerfileError(f"--chmod={mode} is not an octal mode such as 0755", i.start_line)
            mode = f"{int(mode, 8):04o}"
        words = list(i.value) if i.json else [self._word(w, i) for w in i.value]
        dest = words[-1]
        for src in words[:-1]:
            if _REMOTE.match(src):
                raise DockerfileError(f"{i.cmd} from a URL is not supported ({src}): download it with RUN "
                                      "curl instead", i.start_line)
            normalized = posixpath.normpath(src)
            if src.startswith("/") or normalized == ".." or normalized.startswith("../"):
                raise DockerfileError(f"{i.cmd} source {src!r} is outside the build context {self.context}",
                                      i.start_line)
            try:
                digest = files_hash(src, dest, self.context, self.ignore)
            except FileNotFoundError as e:
                raise DockerfileError(str(e), i.start_line) from None
            self.spec.steps.append({"type": "COPY", "args": [src, dest, user, mode], "force": False,
                                    "filesHash": digest})

    def _env_pairs(self, i: buildkit.Command) -> list[tuple[str, str]]:
        self._flags(i)
        values = list(i.value)
        if not values or len(values) % 2:
            raise DockerfileError("ENV needs NAME=value (or NAME value)", i.start_line)
        pairs = [(self._word(k, i), self._word(v, i)) for k, v in zip(values[::2], values[1::2], strict=True)]
        if any(not name for name, _ in pairs):
            raise DockerfileError("ENV names cannot be blank", i.start_line)
        return pairs

    def _arg_pairs(self, i: buildkit.Command) -> list[tuple[str, str]]:
        self._flags(i)
        if not i.value:
            raise DockerfileError("ARG needs a name", i.start_line)
        pairs = []
        for raw in i.value:
            name, _, value = raw.partition("=")
            name = self._word(name, i)
            if not name:
                raise DockerfileError("ARG names cannot be blank", i.start_line)
            pairs.append((name, self._word(value, i)))
        return pairs

    def _single(self, i: buildkit.Command) -> str:
        self._flags(i)
        if len(i.value) != 1:
            raise DockerfileError(f"{i.cmd} takes exactly one argument", i.start_line)
        return self._word(i.value[0], i)

    def _start_command(self) -> None:
        """CMD and ENTRYPOINT combined as Docker does: an exec-form ENTRYPOINT gets CMD as arguments (a
        shell-form CMD as `/bin/sh -c cmd`), a shell-form ENTRYPOINT ignores CMD, else CMD alone."""
        cmd, entrypoint, command = self.cmd, self.entrypoint, None
        if entrypoint is not None:
            if entrypoint.json:
                words = list(entrypoint.value)
                if cmd is not None:
                    words += list(cmd.value) if cmd.json else (["/bin/sh", "-c", cmd.value[0]] if cmd.value else [])
                command = " ".join(shlex.quote(w) for w in words) if words else None
            else:
                command = entrypoint.value[0] if entrypoint.value else None
        elif cmd is not None:
            if cmd.json:
                command = " ".join(shlex.quote(w) for w in cmd.value) if cmd.value else None
            else:
                command = cmd.value[0] if cmd.value else None
        if command and command.strip():
            self.spec.start_cmd, self.spec.ready_cmd = command, READY_AFTER_START

    # --- helpers --------------------------------------------------------------------------------------

    def _step(self, kind: str, *args: str) -> None:
        self.spec.steps.append({"type": kind, "args": list(args), "force": False})

    def _flags(self, i: buildkit.Command) -> dict[str, str]:
        known = _FLAGS.get(i.cmd, {})
        values: dict[str, str] = {}
        for flag in i.flags:
            name, has_value, value = flag.removeprefix("--").partition("=")
            if not flag.startswith("--") or name not in known:
                raise DockerfileError(f"unknown flag {flag} for {i.cmd}", i.start_line)
            if name in values:
                raise DockerfileError(f"flag --{name} given twice", i.start_line)
            if known[name] and not (has_value and value):
                raise DockerfileError(f"flag --{name} needs a value", i.start_line)
            if name in _IGNORED_FLAGS:
                self._warn(f"{i.cmd} --{name} is not supported in a template and is ignored", i.start_line)
                continue
            values[name] = value
        return values

    def _word(self, word: str, i: buildkit.Command) -> str:
        try:
            return unquote(word, self.escape)
        except ValueError as e:
            raise DockerfileError(str(e), i.start_line) from None

    def _warn(self, message: str, line: int) -> None:
        self.spec.warnings.append(f"Dockerfile line {line}: {message}")


def _escape_token(text: str) -> str:
    """The `# escape=` parser directive's character (default backslash)."""
    for line in text.splitlines():
        if m := _ESCAPE_DIRECTIVE.match(line.strip()):
            return m.group(1)
        if not _DIRECTIVE.match(line.strip()):
            break
    return "\\"


def unquote(word: str, escape: str = "\\") -> str:
    """A Dockerfile word with its quotes and escapes resolved as BuildKit's lexer does, and `$VAR` /
    `${VAR...}` references kept as written (the SDK leaves them for the shell)."""
    out: list[str] = []
    i, n = 0, len(word)
    while i < n:
        ch = word[i]
        if ch == "'":
            end = word.find("'", i + 1)
            if end < 0:
                raise ValueError(f"unexpected end of text looking for the matching ' in {word!r}")
            out.append(word[i + 1:end])
            i = end + 1
        elif ch == '"':
            i += 1
            while True:
                if i >= n:
                    raise ValueError(f'unexpected end of text looking for the matching " in {word!r}')
                c = word[i]
                if c == '"':
                    i += 1
                    break
                if c == "$":
                    reference, i = _reference(word, i)
                    out.append(reference)
                    continue
                if c == escape and i + 1 < n and word[i + 1] in ('"', "$", escape):
                    c = word[i + 1]
                    i += 1
                out.append(c)
                i += 1
        elif ch == "$":
            reference, i = _reference(word, i)
            out.append(reference)
        elif ch == escape:
            if i + 1 < n:
                out.append(word[i + 1])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _reference(word: str, i: int) -> tuple[str, int]:
    """The `$...` reference starting at `word[i]`, verbatim, and the index after it."""
    if word.startswith("${", i):
        depth, j = 0, i + 1
        while j < len(word):
            depth += {"{": 1, "}": -1}.get(word[j], 0)
            if depth == 0:
                return word[i:j + 1], j + 1
            j += 1
        raise ValueError(f"missing '}}' in {word!r}")
    return word[i], i + 1


def _substitute(text: str, variables: dict[str, str]) -> str:
    """`$NAME`, `${NAME}`, `${NAME:-default}` and `${NAME:+alternative}` from `variables` (unset: empty),
    as Docker substitutes ARGs into FROM."""

    def value(m: re.Match) -> str:
        name = m.group("braced") or m.group("plain")
        current = variables.get(name, "")
        op = m.group("op")
        if op is None:
            return current
        is_set = name in variables and (current != "" or not op.startswith(":"))
        if op.endswith("-"):
            return current if is_set else m.group("word")
        return m.group("word") if is_set else ""

    return _VARIABLE.sub(value, text)


# --- the files a COPY takes, their hash and their archive ---------------------------------------------


class IgnoreRules:
    """`.dockerignore` patterns as Docker applies them to a build context: relative to its root, a
    pattern matching a directory matches everything under it, `!` re-includes, the last match wins."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.rules: list[tuple[re.Pattern, bool]] = []
        for original in patterns:
            pattern = original.strip()
            exclusion = pattern.startswith("!")
            if exclusion:
                pattern = pattern[1:].strip()
            if not pattern or original.startswith("#"):
                continue
            pattern = posixpath.normpath(re.sub("/+", "/", pattern))
            if len(pattern) > 1 and pattern.startswith("/"):
                pattern = pattern[1:]
            try:
                self.rules.append((re.compile(_pattern_regex(pattern)), exclusion))
            except re.error as e:
                raise DockerfileError(f".dockerignore pattern {original!r} is invalid: {e}") from None

    @classmethod
    def of_context(cls, context: Path) -> IgnoreRules:
        try:
            text = (context / ".dockerignore").read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            return cls([])
        return cls([line.strip() for line in text.split("\n") if line.strip() and not line.startswith("#")])

    def ignored(self, relative: str) -> bool:
        parts = relative.split("/")
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        matched = False
        for regex, exclusion in self.rules:
            # An exclusion only matters once the path is matched, and an inclusion only before.
            if exclusion != matched:
                continue
            if any(regex.fullmatch(p) for p in prefixes):
                matched = not exclusion
        return matched


def _pattern_regex(pattern: str) -> str:
    regex, i, n = "", 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
                regex += "(.*/)?" if i < n else ".*"
            else:
                regex += ".*"
            continue
        if ch == "*":
            regex += "[^/]*"
        elif ch == "?":
            regex += "[^/]"
        elif ch == "[":
            end = pattern.find("]", i + 2 if pattern.startswith("[^", i) else i + 1)
            if end < 0:
                raise re.error("unterminated [")
            body = pattern[i + 1:end]
            regex += "[" + ("^" + body[1:] if body.startswith("^") else body) + "]"
            i = end
        elif ch == "\\" and i + 1 < n:
            i += 1
            regex += re.escape(pattern[i])
        else:
            regex += re.escape(ch)
        i += 1
    return regex


def copy_sources(src: str, context: Path, ignore: IgnoreRules) -> list[str]:
    """The absolute paths a COPY of `src` (a glob relative to `context`; `**` and dotfiles match) takes,
    sorted: each match, and for a directory everything in it, minus what `.dockerignore` excludes.
    Symbolic links are taken as links."""
    root = os.path.abspath(context)
    found: set[str] = set()

    def walk(directory: str, relative: str) -> None:
        with os.scandir(directory) as entries:
            for entry in entries:
                path = entry.name if relative == "." else f"{relative}/{entry.name}"
                if not ignore.ignored(path):
                    found.add(entry.path)
                if entry.is_dir(follow_symlinks=False):
                    walk(entry.path, path)  # an ignored directory may hold re-included paths

    matches = []
    for match in glob.glob(src, flags=glob.GLOBSTAR | glob.DOTMATCH, root_dir=root):
        path = os.path.normpath(os.path.join(root, match))
        matches.append((path, os.path.relpath(path, root).replace(os.sep, "/")))
    matches.sort(key=lambda m: 0 if m[1] == "." else m[1].count("/") + 1)  # parents first
    walked: set[str] = set()
    for path, relative in matches:
        if "." in walked or any(relative.startswith(d + "/") for d in walked):
            continue
        if relative != "." and ignore.ignored(relative):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            found.add(path)
            walk(path, relative)
            walked.add(relative)
        else:
            found.add(path)
    return sorted(found)


def files_hash(src: str, dest: str, context: Path, ignore: IgnoreRules) -> str:
    """The SDK's `filesHash` of a COPY: SHA-256 over `COPY src dest`, then per path its relative name, mode,
    size (not for directories) and content (a link's target for links)."""
    paths = copy_sources(src, context, ignore)
    if not paths:
        raise FileNotFoundError(f"COPY {src}: no files match it in the build context {context}")
    digest = hashlib.sha256(f"COPY {src} {dest}".encode())
    for path in paths:
        digest.update(os.path.relpath(path, context).encode())
        info = os.lstat(path)
        digest.update(str(info.st_mode).encode())
        if not stat.S_ISDIR(info.st_mode):
            digest.update(str(info.st_size).encode())
        if stat.S_ISLNK(info.st_mode):
            digest.update(os.readlink(path).encode())
        elif stat.S_ISREG(info.st_mode):
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()


def write_archive(src: str, context: Path, ignore: IgnoreRules, out: IO[bytes]) -> None:
    """The gzipped tar a COPY's files are uploaded in: entries named relative to `context`, links kept."""
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for path in copy_sources(src, context, ignore):
            tar.add(path, arcname=os.path.relpath(path, context), recursive=False)
