/* flowplay lists: times in the browser's zone (or UTC), relative with the absolute time on
 * hover, quick date ranges in that zone, the elapsed time of running rows, row selection for
 * the bulk actions, and a bulk job's progress bar. No dependencies, no build step.
 * Everything works without it: the server renders absolute UTC times and plain links.
 */
(function () {
  "use strict";

  var KEY = "flowplay.timeZone";
  var zone = "local";
  try { zone = window.localStorage.getItem(KEY) || "local"; } catch (err) { /* private mode */ }
  var localName = (window.Intl && Intl.DateTimeFormat().resolvedOptions().timeZone) || "local time";

  function pad(n) { return (n < 10 ? "0" : "") + n; }

  function absolute(date) {
    if (zone === "utc") return date.toISOString().slice(0, 19).replace("T", " ") + " UTC";
    return date.getFullYear() + "-" + pad(date.getMonth() + 1) + "-" + pad(date.getDate()) + " " +
      pad(date.getHours()) + ":" + pad(date.getMinutes()) + ":" + pad(date.getSeconds()) + " " + localName;
  }

  function relative(date, now) {
    var s = Math.round((now - date.getTime()) / 1000);
    var future = s < 0;
    s = Math.abs(s);
    var text;
    if (s < 45) text = s + " s";
    else if (s < 3600) text = Math.round(s / 60) + " min";
    else if (s < 86400) text = Math.round(s / 3600) + " h";
    else if (s < 86400 * 45) text = Math.round(s / 86400) + " d";
    else return absolute(date);
    return future ? "in " + text : text + " ago";
  }

  function fmtMs(ms) {
    ms = Math.max(0, Math.round(ms));
    if (ms < 1000) return ms + " ms";
    if (ms < 60000) return (ms / 1000).toFixed(1) + " s";
    var s = Math.floor(ms / 1000);
    if (s < 3600) return Math.floor(s / 60) + " min " + pad(s % 60) + " s";
    return Math.floor(s / 3600) + " h " + pad(Math.floor((s % 3600) / 60)) + " min";
  }

  var config = {};
  var configNode = document.getElementById("live-config");
  if (configNode) { try { config = JSON.parse(configNode.textContent); } catch (err) { config = {}; } }
  var skew = config.serverNow ? Date.parse(config.serverNow) - Date.now() : 0;

  function drawTimes() {
    var now = Date.now() + skew;
    var nodes = document.querySelectorAll("time.js-time");
    for (var i = 0; i < nodes.length; i++) {
      var date = new Date(nodes[i].getAttribute("datetime"));
      if (isNaN(date)) continue;
      nodes[i].textContent = relative(date, now);
      nodes[i].setAttribute("title", absolute(date));
    }
    var toggle = document.getElementById("tz-toggle");
    if (toggle) {
      toggle.hidden = false;
      var utcOnly = /^(Etc\/)?(UTC|GMT)$/.test(localName);
      toggle.textContent = utcOnly ? "Times: UTC" : zone === "utc" ? "Times: UTC · show " + localName : "Times: " + localName + " · show UTC";
      toggle.setAttribute("aria-pressed", zone === "utc" ? "true" : "false");
    }
  }

  function tickRunning() {
    var now = Date.now() + skew;
    var cells = document.querySelectorAll("[data-running-since]");
    for (var i = 0; i < cells.length; i++) {
      var since = Date.parse(cells[i].getAttribute("data-running-since"));
      if (isNaN(since)) continue;
      cells[i].textContent = fmtMs(now - since) + "…";
      cells[i].setAttribute("title", "running for " + fmtMs(now - since));
    }
  }

  // Quick ranges in the browser's zone: "Yesterday" is the browser's yesterday.
  function drawRanges() {
    var links = document.querySelectorAll("a[data-range]");
    if (!links.length) return;
    var now = new Date(Date.now() + skew);
    for (var i = 0; i < links.length; i++) {
      var link = links[i];
      if (!link.getAttribute("data-utc-href")) link.setAttribute("data-utc-href", link.getAttribute("href"));
      if (zone === "utc") { link.setAttribute("href", link.getAttribute("data-utc-href")); continue; }
      var midnight = new Date(now.getFullYear(), now.getMonth(), now.getDate());
      var from = null, to = null;
      switch (link.getAttribute("data-range")) {
        case "1h": from = new Date(now.getTime() - 3600e3); break;
        case "24h": from = new Date(now.getTime() - 86400e3); break;
        case "today": from = midnight; to = new Date(midnight.getFullYear(), midnight.getMonth(), midnight.getDate() + 1); break;
        case "yesterday": from = new Date(midnight.getFullYear(), midnight.getMonth(), midnight.getDate() - 1); to = midnight; break;
        case "7d": from = new Date(midnight.getFullYear(), midnight.getMonth(), midnight.getDate() - 6); break;
      }
      if (!from) continue;
      var url = new URL(link.getAttribute("data-utc-href"), window.location.href);
      url.searchParams.set("from", iso(from));
      if (to) url.searchParams.set("to", iso(new Date(to.getTime() - 1000))); else url.searchParams.delete("to");
      link.setAttribute("href", url.pathname + "?" + url.searchParams.toString().replace(/%2C/gi, ",").replace(/%3A/gi, ":"));
    }
  }

  function iso(date) { return date.toISOString().slice(0, 19) + "Z"; }

  var toggle = document.getElementById("tz-toggle");
  if (toggle) {
    toggle.addEventListener("click", function () {
      zone = zone === "utc" ? "local" : "utc";
      try { window.localStorage.setItem(KEY, zone); } catch (err) { /* private mode */ }
      drawTimes();
      drawRanges();
    });
  }

  // -- selection for the bulk actions ---------------------------------------------------

  function boxes() { return document.querySelectorAll("input[type=checkbox][name=play][form=bulk-form]"); }

  function countSelected() {
    var all = boxes(), n = 0;
    for (var i = 0; i < all.length; i++) if (all[i].checked) n++;
    var counter = document.getElementById("bulk-count");
    if (counter) counter.textContent = n;
    var page = document.getElementById("select-page");
    if (page) { page.checked = n > 0 && n === all.length; page.indeterminate = n > 0 && n < all.length; }
    ["bulk-selected", "bulk-approve", "bulk-decline"].forEach(function (id) {
      var button = document.getElementById(id);
      if (button) button.disabled = n === 0;
    });
  }

  var selectPage = document.getElementById("select-page");
  if (selectPage) {
    selectPage.addEventListener("change", function () {
      var all = boxes();
      for (var i = 0; i < all.length; i++) all[i].checked = selectPage.checked;
      countSelected();
    });
  }
  document.addEventListener("change", function (event) {
    if (event.target && event.target.name === "play") countSelected();
  });
  window.flowplayCountSelected = countSelected;
  if (boxes().length) countSelected();

  // -- a bulk job's progress --------------------------------------------------------------

  var jobNode = document.getElementById("job-config");
  if (jobNode) {
    var job = JSON.parse(jobNode.textContent);
    var poll = function () {
      fetch(window.location.pathname + "?format=json", { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (state) {
          if (!state) { window.setTimeout(poll, 2000); return; }
          var bar = document.getElementById("job-progress");
          bar.value = state.processed;
          bar.max = state.total || 1;
          var status = document.getElementById("job-status");
          status.textContent = state.processed + " of " + state.total + " done (" + state.state + ")…";
          if (state.state === "DONE") window.location.reload();
          else window.setTimeout(poll, 1000);
        })
        .catch(function () { window.setTimeout(poll, 2000); });
    };
    if (job.state !== "DONE") window.setTimeout(poll, 500);
  }

  drawTimes();
  drawRanges();
  tickRunning();
  window.setInterval(drawTimes, 30000);
  window.setInterval(tickRunning, 1000);
})();
