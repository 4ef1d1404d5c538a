/* flowplay dashboard: draws /dashboard/data/ with uPlot (static/flowplay/vendor/uplot) and
 * asks again every POLL_MS. Queue depth and waiting approvals have no stored history: they
 * are sampled into a chart of their own while the page is open. No build step. */
(function () {
  "use strict";

  var node = document.getElementById("dashboard-config");
  if (!node || !window.uPlot) return;
  var cfg = JSON.parse(node.textContent);
  var POLL_MS = 5000;
  var status = document.getElementById("live-status");
  // Colours of the state badges (app.css), dark enough on white.
  var COLOURS = { DONE: "#067647", FAIL: "#d92d20", SKIP: "#667085", FILTERED: "#98a2b3" };
  var charts = {};
  var samples = [[], [], []];

  function width(el) { return Math.max(280, el.clientWidth - 4); }

  function fmtMs(ms) {
    if (ms === null || ms === undefined) return "—";
    if (ms < 1000) return Math.round(ms) + " ms";
    if (ms < 60000) return (ms / 1000).toFixed(1) + " s";
    return (ms / 60000).toFixed(1) + " min";
  }

  function make(id, series, data, opts) {
    var el = document.getElementById(id);
    if (!el) return null;
    var options = {
      width: width(el),
      height: 220,
      series: [{}].concat(series),
      axes: [{}, { size: 60, values: opts && opts.values }],
      scales: { x: { time: true }, y: { range: function (u, min, max) { return [0, Math.max(1, max) * 1.1]; } } },
      legend: { live: true },
      cursor: { drag: { x: false, y: false } }
    };
    return new window.uPlot(options, data, el);
  }

  function endedData(d) {
    return [d.times].concat(["DONE", "FAIL", "SKIP", "FILTERED"].map(function (s) { return d.ended[s]; }));
  }

  function durationData(d) { return [d.times, d.p50, d.p95]; }

  function draw(d) {
    charts.ended = make("chart-ended", ["DONE", "FAIL", "SKIP", "FILTERED"].map(function (s) {
      return { label: s, stroke: COLOURS[s], width: s === "FAIL" ? 2.5 : 1.5, fill: s === "FAIL" ? "rgba(217,45,32,0.08)" : undefined,
               points: { show: false } };
    }), endedData(d));
    var ms = function (u, ticks) { return ticks.map(fmtMs); };
    charts.duration = make("chart-duration", [
      { label: "p50", stroke: "#1f4fd1", width: 2, value: function (u, v) { return fmtMs(v); } },
      { label: "p95", stroke: "#b54708", width: 2, dash: [6, 4], value: function (u, v) { return fmtMs(v); } }
    ], durationData(d), { values: ms });
    charts.queue = make("chart-queue", [
      { label: "queue depth", stroke: "#4a1fb8", width: 2 },
      { label: "waiting approvals", stroke: "#93370d", width: 2, dash: [4, 3] }
    ], samples);
  }

  function sample(d) {
    samples[0].push(Math.floor(Date.parse(d.now) / 1000));
    samples[1].push(d.totals.queueDepth);
    samples[2].push(d.totals.waitingApprovals);
    if (samples[0].length > 720) samples.forEach(function (s) { s.shift(); });
  }

  function setText(key, text) {
    var els = document.querySelectorAll('[data-key="' + key + '"]');
    for (var i = 0; i < els.length; i++) els[i].textContent = text;
  }

  function update(d) {
    var t = d.totals;
    setText("failureRate", (100 * t.failureRate).toFixed(1) + " %");
    setText("failedOf", t.failed + " failed of " + t.ended + " ended");
    ["p50Text", "p95Text", "queueDepth", "running", "waitingApprovals", "onHold", "deferred", "created"].forEach(function (k) {
      setText(k, String(t[k]));
    });
    if (charts.ended) charts.ended.setData(endedData(d));
    if (charts.duration) charts.duration.setData(durationData(d));
    sample(d);
    if (charts.queue) charts.queue.setData(samples);
    if (t.ended || t.created || t.running) {
      var empty = document.getElementById("dash-empty");
      if (empty) empty.hidden = true;
    }
    updateFlows(d.flows);
    document.body.setAttribute("data-dashboard-updated", d.now);
  }

  function updateFlows(flows) {
    var table = document.getElementById("dash-flows");
    if (!table || !flows) return;
    var body = table.tBodies[0];
    body.textContent = "";
    if (!flows.length) {
      var row = body.insertRow();
      row.className = "js-empty";
      var cell = row.insertCell();
      cell.colSpan = 6;
      cell.className = "muted";
      cell.textContent = "No play ended in this range.";
      return;
    }
    flows.forEach(function (f) {
      var tr = body.insertRow();
      tr.setAttribute("data-flow-id", f.id);
      var th = document.createElement("th");
      th.scope = "row";
      th.setAttribute("data-label", "Flow");
      var a = document.createElement("a");
      a.href = "/flows/" + encodeURIComponent(f.permanentId) + "/dashboard/";
      a.textContent = f.name;
      th.appendChild(a);
      tr.appendChild(th);
      [["Ended", f.ended], ["Failed", f.failed], ["Failure rate", Math.round(100 * f.failureRate) + " %"],
       ["p95", f.p95Text || "—"]].forEach(function (pair) {
        var td = tr.insertCell();
        td.className = "num";
        td.setAttribute("data-label", pair[0]);
        td.textContent = String(pair[1]);
      });
      var go = tr.insertCell();
      go.setAttribute("data-label", "Go to");
      var link = document.createElement("a");
      link.href = "/flows/" + encodeURIComponent(f.permanentId) + "/plays/?state=FAIL";
      link.textContent = "failed plays";
      go.appendChild(link);
    });
  }

  function setStatus(state, text) {
    if (!status) return;
    status.setAttribute("data-state", state);
    status.textContent = "Live updates: " + text;
  }

  function poll() {
    var url = cfg.url + "?minutes=" + cfg.minutes + (cfg.flowId ? "&flowId=" + encodeURIComponent(cfg.flowId) : "");
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) {
        if (r.status === 401 || r.status === 403) { setStatus("off", "off (logged out; reload to log in)"); return null; }
        return r.ok ? r.json() : Promise.reject(r.status);
      })
      .then(function (d) {
        if (!d) return;
        update(d);
        setStatus("on", "on (every " + POLL_MS / 1000 + " s)");
        window.setTimeout(poll, POLL_MS);
      })
      .catch(function () {
        setStatus("off", "retrying…");
        window.setTimeout(poll, POLL_MS * 2);
      });
  }

  sample(cfg.data);
  draw(cfg.data);
  window.addEventListener("resize", function () {
    Object.keys(charts).forEach(function (k) {
      var c = charts[k];
      if (c) c.setSize({ width: width(c.root.parentNode), height: 220 });
    });
  });
  window.setTimeout(poll, POLL_MS);
})();
