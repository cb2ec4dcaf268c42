// The dashboard's own behaviour, on top of htmx: no inline scripts (the CSP forbids them), only these
// delegated handlers. `window.corral.chart(element, data)` draws a uPlot chart from
// {x: [unix seconds], series: [{label, values}], unit}; pages put that JSON in a <script type="application/json">
// and mark the chart's element with data-chart and data-chart-source="<that script's id>".
(function () {
  "use strict";

  function cssVar(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  // The chart colours of the light or dark theme (dashboard.css --series).
  const PALETTE = cssVar("--series").split(/\s+/);

  function money(unit) {
    return (u, v) => (v == null ? "" : v.toFixed(v !== 0 && Math.abs(v) < 1 ? 4 : 2) + (unit ? " " + unit : ""));
  }

  function chart(element, data) {
    if (typeof uPlot === "undefined") {
      element.classList.add("chart-missing");
      element.textContent = "Charts need the uPlot files, which are missing from this installation (see the banner).";
      return null;
    }
    const axis = { stroke: cssVar("--muted"), grid: { stroke: cssVar("--grid"), width: 1 }, ticks: { show: false } };
    const options = {
      width: Math.max(240, element.clientWidth),
      height: Number(element.dataset.height || 220),
      cursor: { points: { size: 7 } },
      legend: { show: false },  // the table under each chart names the series, in the same colours
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } },
      axes: [axis, { ...axis, size: 64 }],
      series: [{ label: "Day", value: "{YYYY}-{MM}-{DD}" }].concat(data.series.map((s, i) => ({
        label: s.label,
        stroke: PALETTE[i % PALETTE.length],
        fill: PALETTE[i % PALETTE.length] + "1f",
        width: 2,
        points: { show: true, size: 5 },
        value: money(data.unit),
      }))),
    };
    const plot = new uPlot(options, [data.x].concat(data.series.map((s) => s.values)), element);
    new ResizeObserver(() => plot.setSize({ width: Math.max(240, element.clientWidth), height: options.height }))
      .observe(element);
    return plot;
  }

  function drawCharts(root) {
    root.querySelectorAll("[data-chart]:not([data-drawn])").forEach((element) => {
      const source = document.getElementById(element.dataset.chartSource);
      if (!source) return;
      element.dataset.drawn = "1";
      chart(element, JSON.parse(source.textContent));
    });
    root.querySelectorAll(".swatch[data-series]").forEach((swatch) => {
      swatch.style.background = PALETTE[Number(swatch.dataset.series) % PALETTE.length];
    });
  }

  // A poll does not replace what a keyboard user has focused (they would lose their place); a change
  // they make (htmx's triggering event) still refreshes.
  document.addEventListener("htmx:beforeRequest", (event) => {
    const element = event.detail.elt;
    if (!element.hasAttribute("data-hold-while-keyboard-focus")) return;
    const focused = document.activeElement;
    const polling = !event.detail.requestConfig || !event.detail.requestConfig.triggeringEvent;
    if (polling && focused && element.contains(focused) && focused.matches(":focus-visible")) {
      event.preventDefault();
    }
  });

  // The live summary (an aria-live region) changes only when its text does, so screen readers are not
  // told the same counts every second.
  document.addEventListener("htmx:afterSwap", (event) => {
    const element = event.detail.elt;
    const target = element.dataset && element.dataset.summaryTarget;
    if (target) {
      const table = element.querySelector("[data-summary]");
      const summary = document.querySelector(target);
      if (table && summary && summary.textContent !== table.dataset.summary) {
        summary.textContent = table.dataset.summary;
      }
    }
    if (element.id === "flash") {
      const flash = element.querySelector(".flash.ok");
      if (flash) setTimeout(() => flash.remove(), 8000);
    }
    drawCharts(element);
  });

  // The table's pager: the page is a hidden field of the filters form, so the every-second poll keeps it;
  // changing any other filter starts again at page 1.
  document.addEventListener("change", (event) => {
    const form = event.target.form;
    const page = form && form.querySelector("input[name=page]");
    if (page && event.target !== page && !event.detail) page.value = "1";
  }, true);

  document.addEventListener("click", (event) => {
    const pager = event.target.closest("[data-page]");
    if (pager) {
      const field = document.getElementById("filter-page");
      field.value = pager.dataset.page;
      field.form.dispatchEvent(new CustomEvent("change", { bubbles: true, detail: "page" }));
    }
    const dismiss = event.target.closest("[data-dismiss]");
    if (dismiss) dismiss.closest(".flash").remove();
    const copy = event.target.closest("[data-copy]");
    if (copy) {
      const field = document.querySelector(copy.dataset.copy);
      field.select();
      (navigator.clipboard ? navigator.clipboard.writeText(field.value) : Promise.reject())
        .then(() => { copy.textContent = "Copied"; }, () => { document.execCommand("copy"); copy.textContent = "Copied"; });
    }
  });

  document.addEventListener("focusin", (event) => {
    if (event.target.matches("[data-select-on-focus]")) event.target.select();
  });

  document.addEventListener("submit", (event) => {
    const form = event.target.closest("form[data-confirm]");
    if (form && !window.confirm(form.dataset.confirm)) event.preventDefault();
  });

  window.corral = { chart, drawCharts, palette: PALETTE };
  document.addEventListener("DOMContentLoaded", () => drawCharts(document));
})();
