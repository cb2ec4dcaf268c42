"""IPython startup file installed in the code-interpreter template (runs inside every Python kernel, in
the user's environment): adds the structured results the SDKs understand next to the usual MIME types.

- `e2b/data` for pandas DataFrames: {column: [values]} (the SDK's `Result.data`).
- `e2b/chart` for matplotlib figures: the `e2b-charts` format (the SDK's `Result.chart`).

Matched by type name, so pandas and matplotlib are imported only when the user imports them.

It also trims two waits from every execution that cost ~3 ms under gVisor, where a thread hand-off is ten
times dearer than on a host (docs/interpreter.md, "Two waits trimmed from every execution"):
- ipykernel flushes stdout and stderr around every execution, each flush a round trip to its IOPub thread,
  even when nothing was written. A flush with nothing buffered now returns at once; one with output
  behaves as before. Messages keep their order: everything the kernel sends goes through that one thread.
- It sleeps 0.5 ms before each execute_reply ("to give IOPub time"). Clients of this kernel (Corral's
  execution server) wait for IOPub's `idle` status, which always comes after the output, not for the reply.
"""


def _corral_register_formatters() -> None:
    import contextlib
    import json

    from IPython import get_ipython
    from IPython.core.formatters import BaseFormatter
    from traitlets import ObjectName, Unicode

    shell = get_ipython()
    if shell is None:
        return

    # The types are matched in __call__, not registered on the formatter: matplotlib's inline backend pops
    # every formatter's entry for Figure when it activates, which would silently drop ours.
    class DataFormatter(BaseFormatter):
        format_type = Unicode("e2b/data")
        print_method = ObjectName("_repr_e2b_data_")
        _return_type = (dict,)  # the default (str) would drop our JSON objects

        def __call__(self, obj):
            kind = type(obj)
            if kind.__name__ == "DataFrame" and kind.__module__.split(".")[0] == "pandas":
                return dataframe(obj)
            return None

    class ChartFormatter(BaseFormatter):
        format_type = Unicode("e2b/chart")
        print_method = ObjectName("_repr_e2b_chart_")
        _return_type = (dict,)

        def __call__(self, obj):
            kind = type(obj)
            if kind.__name__ == "Figure" and kind.__module__ == "matplotlib.figure":
                return figure(obj)
            return None

    def dataframe(df):
        # Through pandas' own JSON writer: numpy scalars, NaN and timestamps become JSON values.
        return {str(column): json.loads(df[column].to_json(orient="values", date_format="iso"))
                for column in df.columns}

    def figure(fig):
        try:
            from e2b_charts import chart_figure_to_dict
        except ImportError:
            return None
        try:
            chart = chart_figure_to_dict(fig)
        except Exception:  # a chart the library cannot read is still shown as an image
            return None
        # The dict holds enums and tuples; the message must be plain JSON.
        return json.loads(json.dumps(chart, default=lambda o: getattr(o, "value", str(o))))

    with contextlib.suppress(Exception):  # tracebacks go to programs and models, not terminals: no colours
        shell.run_line_magic("colors", "nocolor")
    formatters = shell.display_formatter.formatters
    formatters["e2b/data"] = DataFormatter(parent=shell.display_formatter)
    formatters["e2b/chart"] = ChartFormatter(parent=shell.display_formatter)


_corral_register_formatters()
del _corral_register_formatters


def _corral_trim_execution_waits() -> None:
    import sys

    from IPython import get_ipython

    shell = get_ipython()
    kernel = getattr(shell, "kernel", None)
    if kernel is not None and hasattr(kernel, "_execute_sleep"):
        kernel._execute_sleep = 0.0

    def flush_when_written(stream):
        full_flush = type(stream).flush

        def flush():
            # `_flush_pending` is set by every write until the IOPub thread has taken the buffer.
            if (getattr(stream, "_flush_pending", True) or getattr(stream, "_subprocess_flush_pending", True)
                    or getattr(stream, "echo", None) is not None):
                full_flush(stream)

        return flush

    for stream in (sys.stdout, sys.stderr):
        if type(stream).__name__ == "OutStream" and type(stream).__module__ == "ipykernel.iostream":
            stream.flush = flush_when_written(stream)


_corral_trim_execution_waits()
del _corral_trim_execution_waits
