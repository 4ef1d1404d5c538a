/* flowplay live updates for the play history page (the play page has its own, play.js).
 *
 * Reads the page's config from <script id="live-config" type="application/json">:
 *   { since, flowId?, filtered, match, query }
 * and subscribes to /api/ws?since=<cursor>[&flowId=] with the session cookie.
 * `since` is the company's event cursor read before the page was rendered, so the server
 * replays exactly what happened after it. On a dropped connection the script reconnects
 * (backing off up to 30 s) with the last cursor it saw: no event is lost or applied twice.
 * Cursors are opaque fixed-width strings: a later event's cursor sorts after an earlier's.
 * No dependencies, no build step.
 */
(function () {
  "use strict";

  var configNode = document.getElementById("live-config");
  if (!configNode) return;
  var cfg = JSON.parse(configNode.textContent);
  var statusNode = document.getElementById("live-status");
  var announceNode = document.getElementById("live-announce");
  var TERMINAL = { DONE: 1, FAIL: 1, SKIP: 1, FILTERED: 1 };

  var lastCursor = typeof cfg.since === "string" && cfg.since ? cfg.since : null;
  var attempts = 0;
  var socket = null;

  // -- formatting (the same as plays/pages.py fmt_ms) -------------------------------------

  function fmtMs(ms) {
    if (ms === null || ms === undefined || isNaN(ms)) return "—";
    ms = Math.max(0, Math.round(ms));
    if (ms < 1000) return ms + " ms";
    if (ms < 60000) return (ms / 1000).toFixed(1) + " s";
    var s = Math.floor(ms / 1000);
    if (s < 3600) return Math.floor(s / 60) + " min " + pad(s % 60) + " s";
    return Math.floor(s / 3600) + " h " + pad(Math.floor((s % 3600) / 60)) + " min";
  }

  function pad(n) { return (n < 10 ? "0" : "") + n; }

  function setBadge(badge, state) {
    if (!badge || !state) return;
    badge.className = "badge badge--" + state.toLowerCase();
    badge.setAttribute("data-state", state);
    badge.textContent = state;
  }

  function announce(text) {
    if (!announceNode) return;
    // Replace, not append: screen readers read the new text once.
    announceNode.textContent = text;
  }

  function setStatus(state, text) {
    if (!statusNode) return;
    statusNode.setAttribute("data-state", state);
    statusNode.textContent = "Live updates: " + text;
  }

  // -- the connection ------------------------------------------------------------------

  function socketUrl() {
    var params = [];
    if (lastCursor !== null) params.push("since=" + encodeURIComponent(lastCursor));
    if (cfg.flowId) params.push("flowId=" + encodeURIComponent(cfg.flowId));
    var scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    return scheme + "//" + window.location.host + "/api/ws" + (params.length ? "?" + params.join("&") : "");
  }

  function connect() {
    if (!("WebSocket" in window)) { setStatus("off", "not supported by this browser"); return; }
    setStatus("connecting", attempts ? "reconnecting…" : "connecting…");
    try {
      socket = new WebSocket(socketUrl());
    } catch (err) {
      retry();
      return;
    }
    socket.onopen = function () { attempts = 0; setStatus("on", "on"); };
    socket.onmessage = function (message) {
      var event;
      try { event = JSON.parse(message.data); } catch (err) { return; }
      if (!event || typeof event.cursor !== "string" || event.type === "pong") return;
      if (lastCursor !== null && event.cursor <= lastCursor) return;
      lastCursor = event.cursor;
      try { handle(event); } catch (err) { if (window.console) console.error("flowplay live:", err); }
    };
    socket.onclose = function (close) {
      socket = null;
      if (close.code === 4401) { setStatus("off", "off (logged out; reload to log in)"); return; }
      if (close.code === 4403) { setStatus("off", "off (not allowed; reload the page)"); return; }
      retry();
    };
  }

  function retry() {
    attempts += 1;
    var delay = Math.min(30000, 500 * Math.pow(2, Math.min(attempts, 6)));
    delay = delay * (0.8 + Math.random() * 0.4);
    setStatus("off", "reconnecting in " + Math.round(delay / 1000) + " s…");
    window.setTimeout(connect, delay);
  }

  // -- events -> play state ------------------------------------------------------------

  function playStateOf(event) {
    switch (event.type) {
      case "play:started": return "RUN";
      case "play:completed": return event.state || "DONE";
      case "play:failed": return "FAIL";
      case "play:waiting": return "WAIT";
      case "play:state": return event.state;
      default: return null;
    }
  }

  // -- the history's rows --------------------------------------------------------------

  var newPlays = {};
  // Plays whose latest event may change whether they belong in this list: the server says
  // (GET <match>?<the list's query>&ids=…), since only it knows every filter (keys, args,
  // triggers, retries). Keyed by id, with the state the event reported.
  var toCheck = {};
  var checkTimer = null;
  var checked = {};

  function handle(event) {
    var state = playStateOf(event);
    if (!state || !event.playId) return;
    var row = document.querySelector('tr[data-play-id="' + cssEscape(event.playId) + '"]');
    if (!row) {
      var fresh = event.type === "play:started" || (event.type === "play:state" && event.previousState === "NEW");
      if (!cfg.filtered) {
        if (fresh) { newPlays[event.playId] = true; showNewPlays(); }
        return;
      }
      // A filtered list: a play entering it (started, or now FAIL on a FAIL list) counts once it matches.
      if (!newPlays[event.playId] && checked[event.playId] !== state) queueCheck(event.playId, state);
      return;
    }
    setBadge(row.querySelector(".js-state .badge"), state);
    if (TERMINAL[state]) {
      var cell = row.querySelector(".js-duration");
      if (cell) {
        cell.removeAttribute("data-running-since");
        if (typeof event.duration === "number") cell.textContent = fmtMs(event.duration);
      }
    } else if (event.type === "play:started") {
      var running = row.querySelector(".js-duration");
      if (running) running.setAttribute("data-running-since", event.timestamp);
    }
    row.classList.add("is-updated");
    window.setTimeout(function () { row.classList.remove("is-updated"); }, 1500);
    announce("Play " + event.playId + " is now " + state + ".");
    if (cfg.filtered) queueCheck(event.playId, state);
  }

  function queueCheck(playId, state) {
    toCheck[playId] = state;
    if (!checkTimer) checkTimer = window.setTimeout(runChecks, 400);
  }

  function runChecks() {
    checkTimer = null;
    var ids = Object.keys(toCheck).slice(0, 200);
    if (!ids.length || !cfg.match) return;
    var states = {};
    ids.forEach(function (id) { states[id] = toCheck[id]; delete toCheck[id]; });
    var url = cfg.match + "?" + (cfg.query ? cfg.query + "&" : "") + "ids=" + ids.map(encodeURIComponent).join(",");
    fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (body) {
        if (!body) return;
        var matching = {};
        (body.match || []).forEach(function (id) { matching[id] = true; });
        ids.forEach(function (id) {
          checked[id] = states[id];
          var row = document.querySelector('tr[data-play-id="' + cssEscape(id) + '"]');
          if (row && !matching[id]) leave(row, id, states[id]);
          else if (!row && matching[id] && !newPlays[id]) { newPlays[id] = true; showNewPlays(); }
        });
        if (Object.keys(toCheck).length) runChecks();
      })
      .catch(function () { /* the next event tries again */ });
  }

  // A row that no longer matches the list's filters (WAIT → SKIP on a WAIT list) leaves it.
  function leave(row, id, state) {
    row.classList.add("is-leaving");
    announce("Play " + id + " is now " + state + " and no longer matches these filters.");
    window.setTimeout(function () {
      if (row.parentNode) row.parentNode.removeChild(row);
      var rest = document.querySelectorAll("#plays tbody tr").length;
      var summary = document.getElementById("results-summary");
      if (summary && !rest) summary.textContent = "No plays on this page match these filters any more.";
      if (window.flowplayCountSelected) window.flowplayCountSelected();
    }, 1200);
  }

  function showNewPlays() {
    var notice = document.getElementById("live-notice");
    if (!notice) return;
    var n = Object.keys(newPlays).length;
    var url = new URL(window.location.href);
    url.searchParams.set("page", "0");
    notice.textContent = "";
    var text = cfg.filtered
      ? n + " new play" + (n === 1 ? "" : "s") + " matching these filters since this page was loaded. "
      : n + " new play" + (n === 1 ? "" : "s") + " since this page was loaded. ";
    notice.appendChild(document.createTextNode(text));
    var link = document.createElement("a");
    link.href = url.pathname + "?" + url.searchParams.toString().replace(/%2C/gi, ",").replace(/%3A/gi, ":");
    link.textContent = "Show the newest plays";
    notice.appendChild(link);
    notice.hidden = false;
  }

  function cssEscape(value) {
    return window.CSS && CSS.escape ? CSS.escape(value) : String(value).replace(/["\\]/g, "\\$&");
  }

  connect();
})();
