"""IPython startup file installed in the code-interpreter template (runs inside every Python kernel, in
the user's environment): adds the structured results the SDKs understand next to the usual MIME types.

- `e2b/data` for pandas DataFrames: {column: [values]} (the SDK's `Result.data`).
- `e2b/chart` for matplotlib figures: the `e2b-charts` format (the SDK's `Result.chart`).

Matched by type name, so pandas and matplotlib are imported only when the user imports them.
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
