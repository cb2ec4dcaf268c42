"""IPython startup file installed in the code-interpreter template (runs inside every Python kernel, in
the user's environment): adds the structured results the SDKs understand next to the usual MIME types.

- `e2b/data` for pandas DataFrames: {column: [values]} (the SDK's `Result.data`).
- `e2b/chart` for matplotlib figures: the `e2b-charts` format (the SDK's `Result.chart`).

Registered by type name, so pandas and matplotlib are imported only when the user imports them.
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

    class DataFormatter(BaseFormatter):
        format_type = Unicode("e2b/data")
        print_method = ObjectName("_repr_e2b_data_")

    class ChartFormatter(BaseFormatter):
        format_type = Unicode("e2b/chart")
        print_method = ObjectName("_repr_e2b_chart_")

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
            return chart_figure_to_dict(fig)
        except Exception:  # a chart the library cannot read is still shown as an image
            return None

    with contextlib.suppress(Exception):  # tracebacks go to programs and models, not terminals: no colours
        shell.run_line_magic("colors", "nocolor")
    formatters = shell.display_formatter.formatters
    data = formatters["e2b/data"] = DataFormatter(parent=shell.display_formatter)
    chart = formatters["e2b/chart"] = ChartFormatter(parent=shell.display_formatter)
    data.for_type_by_name("pandas.core.frame", "DataFrame", dataframe)
    chart.for_type_by_name("matplotlib.figure", "Figure", figure)


_corral_register_formatters()
del _corral_register_formatters
