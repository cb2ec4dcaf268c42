"""scripts/install.sh on hosts as new users have them: which Debian mirror it takes from apt's sources
(scripts/lib/apt-mirror.sh, on fixture apt directories), and that a failed step is named, never silent.

Nothing here touches this host's /etc/apt, its package database or the repository's .venv: the mirror
detection reads fixture directories, and install.sh runs with CORRAL_APT_DIR and CORRAL_VENV in a temporary
directory and stub apt-get/apt-cache/dpkg first on PATH. The whole script on a fresh Debian 12 is
tests/clean_install/run.sh (slow, outside this file)."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "scripts" / "install.sh"

# /etc/apt/sources.list.d/debian.sources as Debian 12 container images ship it (the clean install uses it too).
DEBIAN_12_IMAGE_SOURCES = (REPO / "tests" / "clean_install" / "debian-12-image.sources").read_text()

ONE_LINE_SOURCES_LIST = """\
deb http://ftp.de.debian.org/debian bookworm main contrib
deb http://security.debian.org/debian-security bookworm-security main
deb http://ftp.de.debian.org/debian bookworm-updates main
"""


def apt_dir(root: Path, files: dict[str, str]) -> Path:
    """An apt configuration directory holding `files` (paths relative to it, e.g. sources.list.d/x.sources)."""
    (root / "sources.list.d").mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def debian_mirror(directory: Path) -> str:
    result = subprocess.run(["bash", "-c", 'set -Eeuo pipefail; source scripts/lib/apt-mirror.sh; debian_mirror "$1"',
                             "bash", str(directory)], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_deb822_only_debian_12_image_gives_the_uris_field_not_the_snapshot_comment(tmp_path):
    d = apt_dir(tmp_path, {"sources.list.d/debian.sources": DEBIAN_12_IMAGE_SOURCES})
    assert debian_mirror(d) == "http://deb.debian.org/debian"


def test_one_line_sources_list_only_gives_its_first_non_security_mirror(tmp_path):
    d = apt_dir(tmp_path, {"sources.list": ONE_LINE_SOURCES_LIST})
    assert debian_mirror(d) == "http://ftp.de.debian.org/debian"


def test_one_line_sources_list_security_line_first_is_skipped(tmp_path):
    d = apt_dir(tmp_path, {"sources.list": "deb http://security.debian.org/debian-security bookworm-security main\n"
                                           "deb https://mirror.example.org/debian/ bookworm main\n"})
    assert debian_mirror(d) == "https://mirror.example.org/debian"


def test_both_formats_read_sources_list_first(tmp_path):
    d = apt_dir(tmp_path, {"sources.list": ONE_LINE_SOURCES_LIST,
                           "sources.list.d/debian.sources": DEBIAN_12_IMAGE_SOURCES})
    assert debian_mirror(d) == "http://ftp.de.debian.org/debian"


def test_both_formats_with_an_all_comment_sources_list_take_the_deb822_mirror(tmp_path):
    # What Debian 12 installs leave behind after moving to deb822: a sources.list of comments.
    d = apt_dir(tmp_path, {"sources.list": "# deb http://ftp.fr.debian.org/debian bookworm main\n"
                                           "# See sources.list.d/debian.sources\n",
                           "sources.list.d/debian.sources": DEBIAN_12_IMAGE_SOURCES})
    assert debian_mirror(d) == "http://deb.debian.org/debian"


def test_comments_naming_other_urls_are_ignored_in_both_formats(tmp_path):
    d = apt_dir(tmp_path, {
        "sources.list": "#deb http://old.example.org/debian bookworm main\n"
                        "   # deb http://indented.example.org/debian bookworm main\n",
        "sources.list.d/debian.sources": "# Mirror chosen by cloud-init; was http://cloud.example.org/debian\n"
                                         "Types: deb\n"
                                         "# URIs: http://commented.example.org/debian\n"
                                         "URIs: http://mirror.example.net/debian\n"
                                         "Suites: bookworm\nComponents: main\n"})
    assert debian_mirror(d) == "http://mirror.example.net/debian"


def test_signed_by_and_other_options_are_skipped_in_one_line_entries(tmp_path):
    d = apt_dir(tmp_path, {"sources.list": "deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
                                           "http://mirror.example.org/debian bookworm main\n"})
    assert debian_mirror(d) == "http://mirror.example.org/debian"


def test_options_with_spaces_inside_brackets_are_skipped(tmp_path):
    d = apt_dir(tmp_path, {"sources.list": "deb [ arch=amd64 trusted=no ] http://mirror.example.org/debian "
                                           "bookworm main\n"})
    assert debian_mirror(d) == "http://mirror.example.org/debian"


def test_disabled_deb822_stanza_is_skipped(tmp_path):
    d = apt_dir(tmp_path, {"sources.list.d/debian.sources":
                           "Types: deb\nURIs: http://disabled.example.org/debian\nSuites: bookworm\nComponents: main\n"
                           "Enabled: no\n\n" + DEBIAN_12_IMAGE_SOURCES})
    assert debian_mirror(d) == "http://deb.debian.org/debian"


def test_deb_src_only_stanza_is_skipped(tmp_path):
    d = apt_dir(tmp_path, {"sources.list.d/debian.sources":
                           "Types: deb-src\nURIs: http://sources.example.org/debian\nSuites: bookworm\n"
                           "Components: main\n\n" + DEBIAN_12_IMAGE_SOURCES})
    assert debian_mirror(d) == "http://deb.debian.org/debian"


def test_uris_continued_on_the_next_line_are_read(tmp_path):
    d = apt_dir(tmp_path, {"sources.list.d/debian.sources":
                           "Types: deb\nURIs:\n http://continued.example.org/debian\nSuites: bookworm\n"
                           "Components: main\n"})
    assert debian_mirror(d) == "http://continued.example.org/debian"


def test_third_party_sources_file_sorting_before_debian_sources_is_not_taken(tmp_path):
    d = apt_dir(tmp_path, {"sources.list.d/debian.sources": DEBIAN_12_IMAGE_SOURCES,
                           "sources.list.d/archive_uri-https_download_example_com_linux_debian-bookworm.sources":
                           "Types: deb\nURIs: https://download.example.com/linux/debian\nSuites: bookworm\n"
                           "Components: stable\n"})
    assert debian_mirror(d) == "http://deb.debian.org/debian"


def test_no_sources_at_all_gives_nothing(tmp_path):
    assert debian_mirror(apt_dir(tmp_path, {})) == ""


def test_missing_apt_directory_gives_nothing(tmp_path):
    assert debian_mirror(tmp_path / "no-such-dir") == ""


# ------------------------------------------------------------------ install.sh itself, with stub tools

def stub_tools(bin_dir: Path, apt_get_exit: int) -> None:
    """apt-get fails with `apt_get_exit` (after saying so); no package is installed (dpkg -s fails); apt has no
    package lists yet (apt-cache policy prints nothing); runsc and npm are found, as on a host that has them."""
    bin_dir.mkdir()
    stubs = {
        "apt-get": f'echo "stub apt-get $*"; exit {apt_get_exit}',
        "apt-cache": "exit 0",
        "dpkg": "exit 1",
        "runsc": "exit 0",
        "npm": "exit 0",
        "id": "echo 0",  # the script's root check; nothing here needs root
    }
    for name, body in stubs.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)


def run_install(tmp_path: Path, apt: Path) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    stub_tools(bin_dir, apt_get_exit=100)
    env = {"PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8",
           "CORRAL_APT_DIR": str(apt), "CORRAL_VENV": str(tmp_path / "venv"),
           "CORRAL_NSSWITCH": str(tmp_path / "nsswitch.conf")}
    return subprocess.run([str(INSTALL)], env=env, capture_output=True, text=True, timeout=60)


def test_install_names_the_failed_step_and_exits_with_its_status(tmp_path):
    apt = apt_dir(tmp_path / "apt", {"sources.list.d/debian.sources": DEBIAN_12_IMAGE_SOURCES})
    result = run_install(tmp_path, apt)
    assert result.returncode == 100, result.stdout + result.stderr
    assert "install.sh: failed while updating apt's package lists (exit 100)" in result.stderr
    assert result.stderr.count("install.sh: failed while") == 1
    assert not (tmp_path / "venv").exists()


def test_install_adds_backports_from_the_deb822_mirror(tmp_path):
    apt = apt_dir(tmp_path / "apt", {"sources.list.d/debian.sources": DEBIAN_12_IMAGE_SOURCES.replace(
        "URIs: http://deb.debian.org/debian\n", "URIs: http://mirror.example.net/debian/\n")})
    run_install(tmp_path, apt)
    backports = (apt / "sources.list.d" / "corral-backports.sources").read_text()
    assert "URIs: http://mirror.example.net/debian\n" in backports
    assert "Suites: bookworm-backports\n" in backports


def test_install_without_any_apt_sources_falls_back_to_deb_debian_org(tmp_path):
    apt = apt_dir(tmp_path / "apt", {})
    result = run_install(tmp_path, apt)
    assert "mirror: http://deb.debian.org/debian" in result.stdout
    assert "URIs: http://deb.debian.org/debian\n" in (apt / "sources.list.d" / "corral-backports.sources").read_text()


# --- *.localhost resolving to this machine (scripts/lib/nss-localhost.sh) ---------------------------------

DEBIAN_12_NSSWITCH = """\
passwd:         files
group:          files
shadow:         files
gshadow:        files

hosts:          files dns
networks:       files
"""


def ensure_myhostname(conf: Path) -> str:
    result = subprocess.run(["bash", "-c", 'set -Eeuo pipefail; source scripts/lib/nss-localhost.sh; '
                                           'ensure_myhostname "$1"', "bash", str(conf)],
                            cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return conf.read_text()


def hosts_line(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("hosts:"))


def test_myhostname_goes_right_after_files_in_debian_12s_nsswitch(tmp_path):
    conf = tmp_path / "nsswitch.conf"
    conf.write_text(DEBIAN_12_NSSWITCH)
    text = ensure_myhostname(conf)
    assert hosts_line(text).split() == ["hosts:", "files", "myhostname", "dns"]
    assert "passwd:         files\n" in text and "networks:       files\n" in text  # the rest untouched


def test_myhostname_already_there_leaves_the_file_unchanged(tmp_path):
    conf = tmp_path / "nsswitch.conf"
    original = DEBIAN_12_NSSWITCH.replace("files dns", "files mymachines resolve [!UNAVAIL=return] myhostname dns")
    conf.write_text(original)
    assert ensure_myhostname(conf) == original


def test_a_commented_hosts_line_naming_myhostname_does_not_count(tmp_path):
    conf = tmp_path / "nsswitch.conf"
    conf.write_text("# hosts: files myhostname dns\n" + DEBIAN_12_NSSWITCH)
    text = ensure_myhostname(conf)
    assert hosts_line(text).split() == ["hosts:", "files", "myhostname", "dns"]
    assert text.startswith("# hosts: files myhostname dns\n")


def test_hosts_line_without_files_gets_myhostname_first(tmp_path):
    conf = tmp_path / "nsswitch.conf"
    conf.write_text("hosts: dns\n")
    assert hosts_line(ensure_myhostname(conf)).split() == ["hosts:", "myhostname", "dns"]


def test_missing_nsswitch_or_hosts_line_gets_one(tmp_path):
    missing = tmp_path / "missing.conf"
    assert hosts_line(ensure_myhostname(missing)).split() == ["hosts:", "files", "myhostname", "dns"]
    no_hosts = tmp_path / "nohosts.conf"
    no_hosts.write_text("passwd: files\n")
    text = ensure_myhostname(no_hosts)
    assert text.startswith("passwd: files\n") and hosts_line(text).split() == ["hosts:", "files", "myhostname", "dns"]


def test_running_it_twice_adds_myhostname_once(tmp_path):
    conf = tmp_path / "nsswitch.conf"
    conf.write_text(DEBIAN_12_NSSWITCH)
    ensure_myhostname(conf)
    assert hosts_line(ensure_myhostname(conf)).count("myhostname") == 1
