"""The code interpreter through a real `corral serve`, driven by the unmodified `e2b-code-interpreter` SDK
against the `code-interpreter-v1` template."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import DNS_HOST_ADDRESS, TEST_ROOT
from e2b_code_interpreter import AsyncSandbox, NotFoundException, Sandbox, SandboxException, TimeoutException

from tests.helpers.server import ServerProcess

INSTANCE, NETWORK = "t5", "10.213.0.0/22"
TEMPLATE = "code-interpreter-v1"



@pytest.fixture(scope="module")
def server(harness, runtime, store):
    harness.run(store.build(TEMPLATE, runtime), timeout=3600)
    proc = ServerProcess(INSTANCE, NETWORK, TEST_ROOT / INSTANCE, dns_upstream=DNS_HOST_ADDRESS, pool_size=1,
                         extra_env={"CORRAL_POOL_TEMPLATES": TEMPLATE})
    with proc.serving(keep_log=TEST_ROOT / f"{INSTANCE}-serve.log"):
        yield proc


@pytest.fixture(scope="module")
def opts(server):
    key = server.cli("keys", "create", "--name", "interpreter").strip()
    return {"api_url": server.url, "sandbox_url": server.url, "api_key": key}


@pytest.fixture(scope="module")
def sbx(opts):
    sandbox = Sandbox.create(TEMPLATE, envs={"FROM_CREATE": "yes"}, timeout=600, **opts)
    yield sandbox
    sandbox.kill()


def test_state_stdout_results_and_errors(sbx):
    # The sandbox came from the warm pool, whose warm-up ran a cell: it left no trace a user could see.
    first = sbx.run_code("_")
    assert first.execution_count == 1 and first.text == ""
    assert sbx.run_code("x = 40").error is None
    execution = sbx.run_code("x + 2")
    assert execution.text == "42" and execution.results[0].is_main_result
    seen = []
    execution = sbx.run_code("for i in range(3): print(i)\nimport sys; print('oops', file=sys.stderr)",
                             on_stdout=lambda m: seen.append(m.line))
    # The kernel may batch lines into one message; the order is what must hold.
    assert "".join(execution.logs.stdout) == "0\n1\n2\n" and "".join(seen) == "0\n1\n2\n"
    assert execution.logs.stderr == ["oops\n"]
    failed = sbx.run_code("1 / 0")
    assert failed.error.name == "ZeroDivisionError" and "division by zero" in failed.error.value
    assert "ZeroDivisionError" in failed.error.traceback
    assert sbx.run_code("x").text == "40"  # the context survived the error


def test_str_result_is_the_plain_string(sbx):
    # As E2B's interpreter shows it: the string itself, not its repr.
    assert sbx.run_code("import os; os.getenv('X')", envs={"X": "value"}).text == "value"
    assert sbx.run_code("\"it's\"").text == "it's"
    assert sbx.run_code("['a', 'b']").text == "['a', 'b']"  # inside other values, strings keep their quotes
    assert sbx.run_code("process.cwd()", language="js").text == "/home/user"
    assert sbx.run_code("['a']", language="js").text == '[ "a" ]'


def test_display_dataframe_and_chart(sbx):
    execution = sbx.run_code(
        "import pandas as pd\nfrom IPython.display import display, HTML, Markdown\n"
        "display(HTML('<b>hi</b>'), Markdown('# title'))\n"
        "pd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})")
    html, markdown, frame = execution.results
    assert html.html == "<b>hi</b>" and markdown.markdown == "# title"
    assert frame.is_main_result and frame.data == {"a": [1, 2], "b": ["x", "y"]} and "<table" in frame.html
    execution = sbx.run_code(
        "import matplotlib.pyplot as plt\nplt.figure()\nplt.plot([1, 2, 3], [1, 4, 9], label='sq')\n"
        "plt.title('squares')\nplt.show()")
    (figure,) = execution.results
    assert figure.png and figure.chart is not None
    assert figure.chart.type.value == "line" and figure.chart.title == "squares"


CHARTS = {
    "scatter": "plt.scatter([1, 2, 3], [3, 1, 2], label='pts')",
    "bar": "plt.bar(['a', 'b', 'c'], [3, 5, 4], label='n')",
    "pie": "plt.pie([1, 2, 3], labels=['x', 'y', 'z'])",
    # Boxes drawn as lines, matplotlib's default (read from their statistics; see docs/interpreter.md).
    "box_and_whisker": "plt.boxplot([[1, 2, 3, 4, 5], [0, 2, 4, 6, 7, 9, 30]], tick_labels=['p', 'q'])",
    "superchart": "fig, axes = plt.subplots(1, 2); axes[0].plot([1, 2], [1, 2]); axes[1].bar(['a'], [1])",
}


@pytest.mark.parametrize("kind", list(CHARTS))
def test_each_chart_type(sbx, kind):
    execution = sbx.run_code(f"import matplotlib.pyplot as plt\nplt.figure()\n{CHARTS[kind]}\nplt.title('t')\n"
                             "plt.xlabel('when (s)')\nplt.ylabel('how much')\nplt.show()")
    assert execution.error is None, execution.error
    chart = execution.results[-1].chart
    assert chart is not None and chart.type.value == kind
    if kind not in ("pie", "superchart"):  # charts with axes
        assert (chart.title, chart.x_label, chart.x_unit, chart.y_label) == ("t", "when (s)", "s", "how much")
    if kind == "scatter":
        assert [p for p in chart.elements[0].points] == [(1, 3), (2, 1), (3, 2)]
    elif kind == "bar":
        assert [(e.label, e.value) for e in chart.elements] == [("a", 3), ("b", 5), ("c", 4)]
    elif kind == "pie":
        assert [e.label for e in chart.elements] == ["x", "y", "z"]
        assert sum(e.angle for e in chart.elements) == pytest.approx(360)
    elif kind == "box_and_whisker":
        p, q = chart.elements
        assert (p.label, p.min, p.first_quartile, p.median, p.third_quartile, p.max) == ("p", 1, 2, 3, 4, 5)
        assert (q.label, q.min, q.median, q.max, q.outliers) == ("q", 0, 6, 9, [30])
    else:
        assert [c.type.value for c in chart.elements] == ["line", "bar"]


def test_box_plot_with_several_labelled_boxes_is_chart_data(sbx):
    # Boxes drawn as lines (matplotlib's default) and of equal height, which e2b-charts alone misreads.
    execution = sbx.run_code(
        "import matplotlib\nimport matplotlib.pyplot as plt\nplt.figure()\n"
        "plt.boxplot([[1, 2, 3, 4, 5], [2, 3, 4, 5, 6], [3, 4, 5, 6, 7, 30]], tick_labels=['a', 'b', 'c'])\n"
        "plt.title('boxes'); plt.xlabel('group'); plt.ylabel('value (cm)'); plt.show()\nmatplotlib.__version__")
    assert execution.error is None, execution.error
    figure, version = execution.results
    assert version.text == "3.10.9"  # the release the template pins
    chart = figure.chart
    assert chart.type.value == "box_and_whisker" and figure.png
    assert (chart.title, chart.x_label, chart.y_label, chart.y_unit) == ("boxes", "group", "value (cm)", "cm")
    assert [(b.label, b.min, b.first_quartile, b.median, b.third_quartile, b.max, b.outliers)
            for b in chart.elements] == [("a", 1, 2, 3, 4, 5, []), ("b", 2, 3, 4, 5, 6, []),
                                         ("c", 3, 4.25, 5.5, 6.75, 7, [30])]


def test_pil_image_shown_returned_or_saved_is_a_png_result(sbx):
    import base64

    sbx.run_code("from PIL import Image\nimg = Image.new('RGB', (4, 3), 'red')")
    shown = sbx.run_code("img.show()")
    last = sbx.run_code("img")
    saved = sbx.run_code("img.save('/tmp/red.png')")
    for execution in (shown, last, saved):
        assert execution.error is None, execution.error
        (image,) = execution.results
        assert base64.b64decode(image.png).startswith(b"\x89PNG")
    assert last.results[0].is_main_result and not shown.results[0].is_main_result
    assert sbx.files.read("/tmp/red.png", format="bytes").startswith(b"\x89PNG")  # and it was saved


def test_javascript_and_typescript(sbx):
    execution = sbx.run_code("const answer = 40 + 2; console.log('from js'); answer", language="js")
    assert execution.error is None and execution.text == "42"
    assert execution.logs.stdout == ["from js\n"]
    assert sbx.run_code("answer * 2", language="javascript").text == "84"  # state persists
    # TypeScript runs on the same kernel: annotations are fine, and the JS state is there.
    assert sbx.run_code("const half: number = answer / 2; half", language="ts").text == "21"
    failed = sbx.run_code("throw new TypeError('bad value')", language="js")
    assert failed.error.name == "TypeError" and failed.error.value == "bad value"
    assert sbx.run_code("answer", language="js").text == "42"  # the context survived the error
    assert sbx.run_code("process.env.FROM_CREATE", language="js").text == "yes"
    assert sbx.run_code("Deno.env.get('ONLY_NOW')", language="js", envs={"ONLY_NOW": "x"}).text == "x"
    assert sbx.run_code("Deno.env.get('ONLY_NOW') ?? 'gone'", language="js").text == "gone"
    ctx = sbx.create_code_context(language="js", cwd="/tmp")
    try:
        assert ctx.language == "javascript"
        assert sbx.run_code("Deno.cwd()", context=ctx).text == "/tmp"
        assert sbx.run_code("typeof answer", context=ctx).text == "undefined"  # a context of its own
    finally:
        sbx.remove_code_context(ctx)


def test_env_vars_per_run_and_from_create(sbx):
    assert sbx.run_code("import os; os.environ.get('FROM_CREATE')").text == "yes"
    assert sbx.run_code("os.environ['ONLY_NOW']", envs={"ONLY_NOW": "1"}).text == "1"
    assert sbx.run_code("os.environ.get('ONLY_NOW', 'gone')").text == "gone"


def test_r_kernel_with_env_vars_and_cwd(sbx):
    # IRkernel shows each value as display data (E2B's R does too), so the value is results[0], not `.text`.
    def r(code: str, **kwargs) -> str:
        execution = sbx.run_code(code, language="r", **kwargs)
        assert execution.error is None, execution.error
        return execution.results[0].text

    assert r("x <- 40; x + 2") == "[1] 42"
    assert r("Sys.getenv('FROM_CREATE')") == '[1] "yes"'
    assert r("Sys.getenv('ONLY_NOW')", envs={"ONLY_NOW": 'r "1"'}) == '[1] "r \\"1\\""'
    assert r("Sys.getenv('ONLY_NOW', unset = 'gone')") == '[1] "gone"'
    assert r("getwd()") == '[1] "/home/user"'
    assert r("x") == "[1] 40"  # one default R context: state persists
    failed = sbx.run_code("stop('bad value')", language="r")
    assert failed.error is not None and "bad value" in failed.error.value


def test_java_kernel_with_env_vars_and_cwd(opts):
    # A sandbox of its own: a JVM (~250 MB) does not fit in 512 MB next to the Python, Deno and R kernels the
    # other tests leave running in `sbx` (envd's OOM guard would kill it as it starts: see the next test).
    sandbox = Sandbox.create(TEMPLATE, envs={"FROM_CREATE": "yes"}, timeout=600, **opts)
    try:
        assert sandbox.run_code("int x = 40; x + 2", language="java").text == "42"
        assert sandbox.run_code('System.getenv("FROM_CREATE")', language="java").text == "yes"
        assert sandbox.run_code('System.getenv("ONLY_NOW")', language="java", envs={"ONLY_NOW": "j"}).text == "j"
        assert sandbox.run_code('System.getenv().getOrDefault("ONLY_NOW", "gone")', language="java").text == "gone"
        assert sandbox.run_code('System.getProperty("user.dir")', language="java").text == "/home/user"
        failed = sandbox.run_code('throw new IllegalStateException("bad value")', language="java")
        assert failed.error is not None and "bad value" in failed.error.value
    finally:
        sandbox.kill()


def test_kernel_killed_while_starting_is_a_clear_error(opts):
    sandbox = Sandbox.create(TEMPLATE, timeout=600, **opts)
    try:
        # What envd's OOM guard does to a kernel starting in a sandbox out of memory: SIGKILL.
        spec = json.dumps({"argv": ["/bin/sh", "-c", "kill -KILL $$", "{connection_file}"],
                           "display_name": "Java", "language": "java"})
        sandbox.commands.run(f"echo '{spec}' > /usr/local/share/jupyter/kernels/java/kernel.json", user="root")
        with pytest.raises(SandboxException) as failed:
            sandbox.run_code("1 + 1", language="java")
        message = str(failed.value)
        assert message.startswith("500 ") and "the java kernel (java) was killed (SIGKILL) while starting" in message
        assert "ran out of memory" in message
        assert "java" not in [c.language for c in sandbox.list_code_contexts()]
        assert sandbox.run_code("1 + 1").text == "2"
    finally:
        sandbox.kill()


def test_contexts_and_bash(sbx):
    ctx = sbx.create_code_context(cwd="/tmp")
    try:
        assert sbx.run_code("import os; os.getcwd()", context=ctx).text == "/tmp"
        assert ctx.id in [c.id for c in sbx.list_code_contexts()]
        sbx.run_code("y = 1", context=ctx)
        sbx.restart_code_context(ctx)
        assert sbx.run_code("y", context=ctx).error.name == "NameError"
    finally:
        sbx.remove_code_context(ctx)
    assert ctx.id not in [c.id for c in sbx.list_code_contexts()]
    with pytest.raises(NotFoundException):
        sbx.run_code("1", context=ctx)
    assert "".join(sbx.run_code("echo $((6*7))", language="bash").logs.stdout) == "42\n"


def test_timeout_interrupts_and_the_context_goes_on(sbx):
    with pytest.raises(TimeoutException):
        sbx.run_code("import time; time.sleep(10)", timeout=2)
    assert sbx.run_code("'after'").text == "after"


def test_abandoned_long_execution_is_interrupted_so_the_next_returns_promptly(sbx):
    ctx = sbx.create_code_context()
    try:
        with pytest.raises(TimeoutException):
            sbx.run_code("import time; time.sleep(300)", context=ctx, timeout=3)
        # The client gave up; the server must have noticed and interrupted the sleep: 10 s is the bound.
        assert sbx.run_code("1 + 1", context=ctx, timeout=10).text == "2"
    finally:
        sbx.remove_code_context(ctx)


def test_default_contexts_of_python_and_javascript_are_listed_after_create(opts):
    sandbox = Sandbox.create(TEMPLATE, timeout=120, **opts)
    try:
        contexts = {c.language: c for c in sandbox.list_code_contexts()}
        assert set(contexts) == {"python", "javascript"}
        assert {c.cwd for c in contexts.values()} == {"/home/user"}
        # The listed JavaScript context is the one `language="js"` runs in.
        assert sandbox.run_code("const shared = 7; shared", context=contexts["javascript"]).text == "7"
        assert sandbox.run_code("shared * 6", language="js").text == "42"
    finally:
        sandbox.kill()


def test_pip_install_then_import(sbx):
    result = sbx.commands.run("pip install --quiet --no-index /dev/null 2>&1; python3 -m pip --version")
    assert "pip" in result.stdout
    # A package made on the spot (no network needed): pip installs into the user's site, the kernel imports it.
    sbx.commands.run("mkdir -p /tmp/pkg/corral_demo && echo 'VALUE = 7' > /tmp/pkg/corral_demo/__init__.py && "
                     "printf '[project]\\nname=\"corral-demo\"\\nversion=\"1\"\\n' > /tmp/pkg/pyproject.toml && "
                     "pip install --quiet --no-build-isolation /tmp/pkg", timeout=120)
    assert sbx.run_code("import corral_demo; corral_demo.VALUE").text == "7"


def test_bad_input(sbx, server):
    import httpx

    headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49999"}
    both = {"code": "1", "context_id": "x", "language": "python"}
    r = httpx.post(f"{server.url}/execute", headers=headers, json=both)
    assert r.status_code == 400
    r = httpx.post(f"{server.url}/execute", headers=headers, json={"code": "1", "language": "cobol"})
    assert r.status_code == 400 and "not supported" in r.text


def test_dead_kernel_is_reported_and_restart_recovers(sbx):
    ctx = sbx.create_code_context()
    try:
        first = sbx.run_code("import os; os._exit(1)", context=ctx)
        second = sbx.run_code("1", context=ctx) if first.error is None else first
        assert second.error is not None or first.error is not None
        sbx.restart_code_context(ctx)
        assert sbx.run_code("2 + 2", context=ctx).text == "4"
    finally:
        sbx.remove_code_context(ctx)


def test_async_sdk_and_twenty_concurrent_sandboxes(opts):
    async def one(i: int) -> str:
        sandbox = await AsyncSandbox.create(TEMPLATE, timeout=300, **opts)
        try:
            return (await sandbox.run_code(f"{i} * 2")).text
        finally:
            await sandbox.kill()

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(20)))

    assert asyncio.run(all_of_them()) == [str(i * 2) for i in range(20)]


def test_js_sdk_run_code(server, opts, monkeypatch):
    from tests.helpers.node import run_script

    for name, value in server.sdk_env(opts["api_key"]).items():
        monkeypatch.setenv(name, value)
    result = run_script("interpreter.mjs")
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert [line for line in result.stdout.splitlines() if line.startswith("ok ")] == [
        "ok state and results", "ok errors", "ok contexts", "ok dataframe", "ok javascript", "ok str results",
        "ok abandoned execution", "ok default contexts"]
