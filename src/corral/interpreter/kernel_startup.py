"""IPython startup file installed in the code-interpreter template (runs inside every Python kernel, in
the user's environment): adds the structured results the SDKs understand next to the usual MIME types.

- `e2b/data` for pandas DataFrames: {column: [values]} (the SDK's `Result.data`).
- `e2b/chart` for matplotlib figures: the `e2b-charts` format (the SDK's `Result.chart`). Box plots are read
  from the statistics matplotlib drew them from, which e2b-charts cannot see (docs/interpreter.md).

Matched by type name, so pandas and matplotlib are imported only when the user imports them.

As E2B's interpreter does, a `str` shows as itself (`os.getenv('X')` is `value`, not `'value'`), and a PIL
image that is shown (`.show()`) or saved to a file is displayed as a PNG. Modules are patched as they are
imported, so nothing is imported ahead of the user.

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

    plain = formatters["text/plain"]

    class StrAsItself(type(plain)):
        # Only the displayed object itself: a str inside a list or dict keeps its quotes.
        def __call__(self, obj):
            if isinstance(obj, str) and type(obj).__repr__ is str.__repr__:
                return str(obj)
            return super().__call__(obj)

    plain.__class__ = StrAsItself  # the same formatter (its registered printers and settings), one rule more


_corral_register_formatters()
del _corral_register_formatters


def _corral_patch_on_import() -> None:
    import functools
    import importlib.abc
    import inspect
    import os
    import sys

    def warn(what: str, error: Exception) -> None:
        print(f"corral: {what} is not available: {error!r}", file=sys.__stderr__)

    class PatchOnImport(importlib.abc.MetaPathFinder):
        """Runs a patch on a module right after it is first imported (a hook per module name, used once)."""

        def __init__(self, patches: dict) -> None:
            self.patches = patches

        def find_spec(self, name, path, target=None):
            if name not in self.patches:
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
            else:
                return None
            if spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            patch, exec_module = self.patches.pop(name), spec.loader.exec_module

            def exec_and_patch(module):
                exec_module(module)
                try:
                    patch(module)
                except Exception as e:  # the user's import must still work
                    warn(f"the patch of {name}", e)

            spec.loader.exec_module = exec_and_patch  # this spec's own loader: other modules are untouched
            return spec

    def display_image(image) -> None:
        from IPython.display import display

        display(image)

    def patch_pil_image(module) -> None:
        save = module.Image.save

        @functools.wraps(save)
        def save_and_display(self, fp, *args, **kwargs):
            save(self, fp, *args, **kwargs)
            if isinstance(fp, (str, os.PathLike)):  # a file, not the buffer the PNG display itself writes to
                display_image(self)

        module.Image.save = save_and_display

    def patch_pil_imageshow(module) -> None:
        class NotebookViewer(module.Viewer):
            # There is no screen in a sandbox: `.show()` displays the image in the execution's results.
            def show(self, image, **options) -> int:
                display_image(image)
                return 1

        module.register(NotebookViewer, order=-1)

    def patch_axes(module) -> None:
        bxp = module.Axes.bxp
        signature = inspect.signature(bxp)

        @functools.wraps(bxp)
        def bxp_and_record(self, *args, **kwargs):
            artists = bxp(self, *args, **kwargs)
            bound = signature.bind(self, *args, **kwargs)
            stats = list(bound.arguments["bxpstats"])
            positions = bound.arguments.get("positions")
            positions = list(range(1, len(stats) + 1)) if positions is None else list(positions)
            self.__dict__.setdefault("_corral_box_plots", []).append((stats, positions, artists))
            return artists

        module.Axes.bxp = bxp_and_record

    def patch_e2b_charts(charts) -> None:
        """e2b-charts reads a box plot back from the shapes drawn: it takes boxes drawn as lines (the
        default) for a line chart, and misreads boxes of equal height or whiskers of zero length. Axes whose
        boxes `bxp` drew (matplotlib's, pandas' and seaborn's box plots all go through it) have their
        statistics recorded: their chart is built from those, with e2b-charts' own types, title and labels."""
        from e2b_charts.charts.bars import BoxAndWhiskerChart, BoxAndWhiskerData

        get_chart_from_ax = charts.get_chart_from_ax

        def box_plot_chart(ax):
            elements, vertical = [], True
            for stats, positions, artists in getattr(ax, "_corral_box_plots", []):
                medians = artists.get("medians", [])
                if not medians or any(line not in ax.lines for line in medians):  # cleared since
                    continue
                ydata = medians[0].get_ydata()
                vertical = ydata[0] == ydata[-1]
                # What the axis shows at each box: pandas, for one, names the boxes by setting tick labels.
                axis = ax.xaxis if vertical else ax.yaxis
                ticks = {float(loc): label.get_text()
                         for loc, label in zip(axis.get_majorticklocs(), axis.get_majorticklabels(), strict=False)}
                elements += [BoxAndWhiskerData(
                    label=ticks.get(float(position)) or str(box.get("label", position)),
                    min=float(box["whislo"]), first_quartile=float(box["q1"]),
                    median=float(box["med"]), third_quartile=float(box["q3"]), max=float(box["whishi"]),
                    outliers=[float(v) for v in box.get("fliers", [])])
                    for box, position in zip(stats, positions, strict=True)]
            if not elements:
                return None
            chart = BoxAndWhiskerChart()
            super(BoxAndWhiskerChart, chart)._extract_info(ax)  # title, axis labels and units, as e2b-charts reads them
            if not vertical:
                chart._change_orientation()  # x is the axis of the boxes' labels, as e2b-charts has it
            chart.elements = elements
            return chart

        def chart_from_ax(ax):
            return box_plot_chart(ax) or get_chart_from_ax(ax)

        charts.get_chart_from_ax = chart_from_ax  # also what it calls for each axes of a figure of several

    patches = {"PIL.Image": patch_pil_image, "PIL.ImageShow": patch_pil_imageshow,
               "matplotlib.axes._axes": patch_axes, "e2b_charts.main": patch_e2b_charts}
    for name in [n for n in patches if n in sys.modules]:
        patches.pop(name)(sys.modules[name])
    sys.meta_path.insert(0, PatchOnImport(patches))


_corral_patch_on_import()
del _corral_patch_on_import


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
