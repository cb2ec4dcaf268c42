// The sandbox page: its resource charts (uPlot, refreshed from metrics.json), its logs kept scrolled to the
// newest line while the reader is there, and the terminal (xterm.js over the dashboard's WebSocket, which
// bridges to a PTY in the sandbox through envd). No inline scripts: the CSP forbids them.
(function () {
  "use strict";

  const REFRESH_MS = 5000;

  function cssVar(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  const [cpu, mem, disk] = cssVar("--series").split(/\s+/);  // the theme's chart colours (dashboard.css)
  const COLORS = { cpu, mem, disk };

  // --- charts ---------------------------------------------------------------------------------------

  function seriesOf(kind, data) {
    if (kind === "cpu") {
      return { values: [data.cpu], labels: ["CPU %"], unit: "%", max: () => 100 };
    }
    const used = kind === "mem" ? data.mem : data.disk;
    const total = kind === "mem" ? data.memTotal : data.diskTotal;
    return { values: [used, total], labels: ["used MiB", "total MiB"], unit: " MiB",
      max: () => Math.max(1, ...total, ...used) * 1.05 };
  }

  function nowText(kind, data) {
    const last = data.x.length - 1;
    if (last < 0) return "";
    if (kind === "cpu") return data.cpu[last].toFixed(0) + "% of " + data.cpus + " vCPU";
    const used = kind === "mem" ? data.mem[last] : data.disk[last];
    const total = kind === "mem" ? data.memTotal[last] : data.diskTotal[last];
    return used.toFixed(0) + " of " + total.toFixed(0) + " MiB";
  }

  function drawMetric(element, kind, data) {
    const s = seriesOf(kind, data);
    const axis = { stroke: cssVar("--muted"), grid: { stroke: cssVar("--grid"), width: 1 }, ticks: { show: false } };
    const color = COLORS[kind];
    const options = {
      width: Math.max(200, element.clientWidth),
      height: 160,
      legend: { show: false },
      cursor: { points: { size: 6 } },
      scales: { x: { time: true }, y: { range: () => [0, s.max()] } },
      axes: [axis, { ...axis, size: 56, values: (u, vals) => vals.map((v) => (v >= 1000 ? (v / 1024).toFixed(1) + "G" : v.toFixed(0))) }],
      series: [{}].concat(s.labels.map((label, i) => ({
        label,
        stroke: i === 0 ? color : cssVar("--muted"),
        dash: i === 0 ? undefined : [4, 4],
        fill: i === 0 ? color + "22" : undefined,
        width: i === 0 ? 2 : 1,
        points: { show: data.x.length < 3, size: 6 },
      }))),
    };
    const plot = new uPlot(options, [data.x].concat(s.values), element);
    widen(plot, data);
    new ResizeObserver(() => plot.setSize({ width: Math.max(200, element.clientWidth), height: 160 })).observe(element);
    return plot;
  }

  // At least a minute wide: one sample alone would otherwise stretch the time axis over years.
  function widen(plot, data) {
    const n = data.x.length;
    if (n && data.x[n - 1] - data.x[0] < 60) plot.setScale("x", { min: data.x[n - 1] - 60, max: data.x[n - 1] + 1 });
  }

  function setupCharts() {
    const card = document.querySelector("[data-sandbox-charts]");
    const source = document.getElementById("sandbox-metrics");
    if (!card || !source) return;
    if (typeof uPlot === "undefined") {
      card.querySelectorAll("[data-metric]").forEach((el) => {
        el.classList.add("chart-missing");
        el.textContent = "Charts need the uPlot files (see the banner).";
      });
      return;
    }
    let data = JSON.parse(source.textContent);
    const plots = {};
    card.querySelectorAll("[data-metric]").forEach((element) => {
      const kind = element.dataset.metric;
      plots[kind] = drawMetric(element, kind, data);
      element.dataset.drawn = "1";
    });
    function update() {
      card.querySelectorAll("[data-metric-now]").forEach((el) => { el.textContent = nowText(el.dataset.metricNow, data); });
      const empty = card.querySelector("[data-metrics-empty]");
      if (empty && data.x.length) empty.remove();
    }
    update();
    setInterval(() => {
      if (document.hidden) return;
      fetch(card.dataset.source, { credentials: "same-origin" })
        .then((answer) => (answer.ok ? answer.json() : null))
        .then((fresh) => {
          if (!fresh) return;
          data = fresh;
          Object.entries(plots).forEach(([kind, plot]) => {
            plot.setData([data.x].concat(seriesOf(kind, data).values));
            widen(plot, data);
          });
          update();
        })
        .catch(() => {});
    }, REFRESH_MS);
  }

  // --- logs -----------------------------------------------------------------------------------------

  function setupLogs() {
    const box = document.getElementById("log-box");
    const lines = document.getElementById("log-lines");
    if (!box || !lines) return;
    let pinned = true;  // follows the newest line until the reader scrolls up
    box.addEventListener("scroll", () => {
      pinned = box.scrollTop + box.clientHeight >= box.scrollHeight - 8;
    });
    new MutationObserver(() => {
      const empty = document.getElementById("log-empty");
      if (empty) empty.hidden = lines.children.length > 0;
      if (pinned) box.scrollTop = box.scrollHeight;
    }).observe(lines, { childList: true });
  }

  // --- terminal -------------------------------------------------------------------------------------

  function setupTerminal() {
    const box = document.querySelector("[data-terminal]");
    const openButton = document.querySelector("[data-terminal-open]");
    const closeButton = document.querySelector("[data-terminal-close]");
    const status = document.getElementById("terminal-status");
    if (!box || !openButton) return;
    let socket = null;
    let term = null;
    let fit = null;

    function say(text) { status.textContent = text; }

    function open() {
      if (typeof Terminal === "undefined") {
        say("The terminal needs the xterm.js files (see the banner).");
        return;
      }
      if (!term) {
        term = new Terminal({
          cursorBlink: true, fontFamily: cssVar("--mono") || "monospace", fontSize: 13, scrollback: 5000,
          screenReaderMode: window.matchMedia("(prefers-reduced-motion: reduce)").matches,
          theme: { background: "#0f1117", foreground: "#e6e8ee", cursor: "#a5a6ff", selectionBackground: "#3a3f5c" },
        });
        fit = typeof FitAddon !== "undefined" ? new FitAddon.FitAddon() : null;
        if (fit) term.loadAddon(fit);
        term.open(box);
        term.onData((data) => { if (socket && socket.readyState === 1) socket.send(JSON.stringify({ input: data })); });
        term.onResize(({ cols, rows }) => {
          if (socket && socket.readyState === 1) socket.send(JSON.stringify({ resize: [cols, rows] }));
        });
        new ResizeObserver(() => { if (fit) fit.fit(); }).observe(box);
      }
      if (fit) fit.fit();
      const scheme = location.protocol === "https:" ? "wss:" : "ws:";
      const url = scheme + "//" + location.host + box.dataset.terminal + "?cols=" + term.cols + "&rows=" + term.rows;
      say("Connecting…");
      socket = new WebSocket(url);
      socket.binaryType = "arraybuffer";
      socket.onopen = () => {
        say("Connected");
        box.classList.add("live");
        openButton.hidden = true;
        closeButton.hidden = false;
        term.focus();
      };
      socket.onmessage = (event) => {
        if (typeof event.data !== "string") term.write(new Uint8Array(event.data));
      };
      socket.onclose = (event) => {
        say(event.reason ? "Closed: " + event.reason : (event.code === 1006 ? "The connection was lost" : "Disconnected"));
        box.classList.remove("live");
        openButton.hidden = false;
        openButton.textContent = "Reconnect";
        closeButton.hidden = true;
        socket = null;
      };
    }

    openButton.addEventListener("click", open);
    closeButton.addEventListener("click", () => { if (socket) socket.close(1000, "closed by the user"); });
  }

  document.addEventListener("DOMContentLoaded", () => {
    setupCharts();
    setupLogs();
    setupTerminal();
  });
})();
