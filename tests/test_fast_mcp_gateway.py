"""The mcp-gateway's reading of a config (templates/mcp_gateway/gateway.py): what each entry starts, and a
clear reason for every entry it cannot satisfy. The gateway itself runs in tests/test_mcp_gateway_sdk.py."""

from __future__ import annotations

import sys

import pytest

from corral.templates.mcp_gateway.gateway import CATALOGUE, ConfigError, plan


def test_catalogue_entries_become_their_commands_with_options_and_arguments():
    fs, clock = plan({"filesystem": {"paths": ["/home/user", "/data"]}, "time": {"localTimezone": "Europe/Paris"}})
    assert (fs.prefix, fs.command) == ("filesystem", ["mcp-server-filesystem", "/home/user", "/data"])
    assert clock.command == [sys.executable, "-m", "mcp_server_time", "--local-timezone", "Europe/Paris"]
    fetch, = plan({"fetch": {"ignoreRobotsTxt": True}})
    assert fetch.command[-1] == "--ignore-robots-txt"


def test_a_github_entry_runs_its_commands_in_its_own_directory_under_a_prefix_a_tool_name_allows():
    launch, = plan({"github/some.org/my-server": {"run_cmd": "node index.js", "install_cmd": "npm ci",
                                                  "envs": {"TOKEN": "t"}}})
    assert launch.prefix == "some-org_my-server"
    assert launch.command == ["/bin/bash", "-lc", "node index.js"] and launch.shell_install == "npm ci"
    assert launch.cwd.endswith("/github/some.org/my-server") and launch.env == {"TOKEN": "t"}


def test_every_entry_that_cannot_be_satisfied_is_named_with_its_reason():
    with pytest.raises(ConfigError) as refused:
        plan({"exa": {"apiKey": "k"}, "filesystem": {"paths": []}, "time": {"colour": "red"},
              "github/a/b": {"install_cmd": "true"}, "memory": "yes", "github/a/c": {"run_cmd": "x", "cwd": "/"}})
    lines = str(refused.value).splitlines()
    assert lines[0].startswith("exa: not a server this gateway can run: it runs " + ", ".join(sorted(CATALOGUE)))
    assert lines[1:] == ["filesystem: needs `paths`: a non-empty list of strings",
                         "time: unknown option(s) colour (known: localTimezone)",
                         "github/a/b: needs `run_cmd`: the command that starts the server on stdio",
                         "memory: its settings must be a JSON object",
                         "github/a/c: unknown setting(s) cwd (known: run_cmd, install_cmd, envs)"]


@pytest.mark.parametrize("config", [[], "filesystem", None])
def test_a_config_that_is_not_an_object_is_refused(config):
    with pytest.raises(ConfigError, match="must be a JSON object"):
        plan(config)
