/* flowplay live updates for the play history and play detail pages.
 *
 * Reads the page's config from <script id="live-config" type="application/json">:
 *   { since, playId?, flowId?, state?, startedAt?, completedAt?, createdAt?, steps? }
 * and subscribes to /api/ws?since=<cursor>[&playId=|&flowId=] with the session cookie.
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
  // Server clock minus this browser's: durations of running steps are measured against the
  // server's timestamps, so a browser whose clock is off must not stretch or shrink them.
  var skew = cfg.serverNow ? Date.parse(cfg.serverNow) - Date.now() : 0;
  var attempts = 0;
  var socket = null;

  // -- formatting (the same as plays/pages.py fmt_ms and the templates' dates) ------------

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

  function fmtTime(iso) {
    var d = new Date(iso);
    if (isNaN(d)) return iso;
    return d.toISOString().slice(0, 19).replace("T", " ");
  }

  // sameDay: "YYYY-MM-DD" of the play's creation; a time on that day is shown without it.
  function timeHtml(node, iso, sameDay) {
    if (!node) return;
    node.textContent = "";
    if (!iso) { node.textContent = "—"; return; }
    var t = document.createElement("time");
    var text = fmtTime(iso);
    t.setAttribute("datetime", iso);
    t.setAttribute("title", text + " UTC");
    t.textContent = sameDay && text.slice(0, 10) === sameDay ? text.slice(11) : text;
    node.appendChild(t);
  }

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
    if (cfg.playId) params.push("playId=" + encodeURIComponent(cfg.playId));
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
      var at = Date.parse(event.timestamp);
      if (!isNaN(at)) skew = Math.max(skew, at - Date.now());
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

  var handle = cfg.playId ? handleDetail : handleHistory;

  // -- history page ----------------------------------------------------------------------

  var newPlays = {};
  // Plays whose latest event may change whether they belong in this list: the server says
  // (GET <match>?<the list's query>&ids=…), since only it knows every filter (keys, args,
  // triggers, retries). Keyed by id, with the state the event reported.
  var toCheck = {};
  var checkTimer = null;
  var checked = {};

  function handleHistory(event) {
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

  // -- detail page -----------------------------------------------------------------------

  var play = {
    state: cfg.state,
    startedAt: cfg.startedAt ? Date.parse(cfg.startedAt) : null,
    completedAt: cfg.completedAt ? Date.parse(cfg.completedAt) : null,
    createdAt: cfg.createdAt ? Date.parse(cfg.createdAt) : Date.now()
  };
  var steps = cfg.steps || {};
  var refreshTimer = null;

  function handleDetail(event) {
    if (event.playId !== cfg.playId) return;
    var at = Date.parse(event.timestamp);
    switch (event.type) {
      case "play:layer:started":
        upsertLayer(event, at);
        announce("Step " + event.ref + " started" + (event.attempt > 1 ? " (attempt " + event.attempt + ")" : "") + ".");
        break;
      case "play:layer:completed":
      case "play:layer:failed":
        upsertLayer(event, at);
        announce("Step " + event.ref + ": " + event.state + ".");
        break;
      case "play:waiting":
        upsertLayer({ layerId: event.layerId, ref: event.ref, state: "WAIT", iteration: event.iteration }, at);
        break;
    }
    var state = playStateOf(event);
    if (state && state !== play.state) {
      setPlayState(state, event, at);
      announce("Play is now " + state + ".");
    }
    tick();
  }

  function setPlayState(state, event, at) {
    play.state = state;
    setBadge(document.querySelector("#play-state .badge"), state);
    if (event.type === "play:started" || (state === "RUN" && !play.startedAt)) {
      play.startedAt = play.startedAt || at;
      timeHtml(document.getElementById("play-started"), event.timestamp);
    }
    if (TERMINAL[state]) {
      play.completedAt = at;
      if (!play.startedAt) play.startedAt = at;
      timeHtml(document.getElementById("play-completed"), event.timestamp);
      var duration = typeof event.duration === "number" ? event.duration : play.completedAt - play.startedAt;
      document.getElementById("play-duration").textContent = fmtMs(duration);
    }
    // Which buttons are legal, the approval form, the error box and related plays come
    // from the server: fetch this page again and swap those parts in.
    if (refreshTimer) window.clearTimeout(refreshTimer);
    refreshTimer = window.setTimeout(refreshParts, 250);
  }

  function refreshParts() {
    refreshTimer = null;
    fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (html) {
        if (!html) return;
        var doc = new DOMParser().parseFromString(html, "text/html");
        ["play-actions", "play-error", "play-relations", "play-approvals"].forEach(function (id) {
          var fresh = doc.getElementById(id);
          var current = document.getElementById(id);
          if (!fresh || !current) return;
          // Keep a note someone is typing into the approval form.
          if (current.contains(document.activeElement) && document.activeElement.tagName === "TEXTAREA") return;
          current.innerHTML = fresh.innerHTML;
        });
        bindConfirms();
      })
      .catch(function () { /* the next event tries again */ });
  }

  function upsertLayer(event, at) {
    if (!event.layerId) return;
    var timeline = document.getElementById("timeline");
    var node = document.getElementById("layer-" + event.layerId);
    if (!node) {
      if (cfg.layersTruncated) return;  // the page lists only the first layers
      var template = document.getElementById("layer-template");
      node = template.content.firstElementChild.cloneNode(true);
      node.id = "layer-" + event.layerId;
      node.setAttribute("data-layer-id", event.layerId);
      node.querySelector(".layer__ref code").textContent = event.ref || "";
      node.querySelector(".js-iteration").textContent =
        event.iteration !== undefined && event.iteration !== null ? "[" + event.iteration + "]" : "";
      node.querySelector(".layer__app").textContent = steps[event.ref] || "";
      node.setAttribute("data-started", new Date(at).toISOString());
      node.classList.add("is-new");
      timeline.appendChild(node);
      var empty = document.getElementById("timeline-empty");
      if (empty) empty.hidden = true;
    }
    if (event.state) {
      setBadge(node.querySelector(".layer__state .badge"), event.state);
      node.querySelector(".bar__fill").className = "bar__fill bar__fill--" + event.state.toLowerCase();
    }
    if (typeof event.attempt === "number") {
      node.querySelector(".js-attempts").textContent = event.attempt;
      var label = node.querySelector(".layer__attempts");
      if (label && label.lastChild && label.lastChild.nodeType === 3) label.lastChild.textContent = event.attempt === 1 ? " attempt" : " attempts";
    }
    if (event.type === "play:layer:started") {
      node.setAttribute("data-completed", "");
    }
    if (event.type === "play:layer:completed" || event.type === "play:layer:failed") {
      node.setAttribute("data-completed", new Date(at).toISOString());
      if (event.type === "play:layer:completed" && event.out !== undefined && event.out !== null) {
        var out = node.querySelector(".js-out");
        out.querySelector("pre").textContent = JSON.stringify(event.out, null, 2);
        out.hidden = false;
      }
      if (event.error) {
        var error = node.querySelector(".js-error");
        error.querySelector("pre").textContent = JSON.stringify(event.error, null, 2);
        error.hidden = false;
      }
    }
  }

  // Durations and bars of what is still running grow once a second.
  function tick() {
    if (!cfg.playId) return;
    var now = Date.now() + skew;
    var start = play.startedAt || play.createdAt;
    var end = play.completedAt || now;
    var span = Math.max(1, end - start);
    if (!play.completedAt && play.startedAt) {
      document.getElementById("play-duration").textContent = fmtMs(now - play.startedAt) + " so far";
    }
    var layers = document.querySelectorAll("#timeline .layer");
    for (var i = 0; i < layers.length; i++) {
      var node = layers[i];
      var began = Date.parse(node.getAttribute("data-started"));
      if (isNaN(began)) continue;
      var endedAttr = node.getAttribute("data-completed");
      var ended = endedAttr ? Date.parse(endedAttr) : NaN;
      var running = isNaN(ended);
      var stop = running ? (play.completedAt || now) : ended;
      var length = Math.max(0, stop - began);
      var left = Math.min(100, Math.max(0, (100 * (began - start)) / span));
      var width = Math.max(0.5, Math.min(100 - left, (100 * length) / span));
      var fill = node.querySelector(".bar__fill");
      fill.style.marginLeft = left.toFixed(2) + "%";
      fill.style.width = width.toFixed(2) + "%";
      var state = node.querySelector(".layer__state .badge").getAttribute("data-state");
      if (!running || state === "RUN" || state === "WAIT") {
        node.querySelector(".js-duration").textContent = fmtMs(length) + (running && !play.completedAt ? "…" : "");
      }
    }
  }

  function bindConfirms() {
    var forms = document.querySelectorAll("form[data-confirm]");
    for (var i = 0; i < forms.length; i++) {
      if (forms[i].getAttribute("data-bound")) continue;
      forms[i].setAttribute("data-bound", "1");
      forms[i].addEventListener("submit", function (e) {
        if (!window.confirm(this.getAttribute("data-confirm"))) e.preventDefault();
      });
    }
  }

  bindConfirms();
  if (cfg.playId) {
    tick();
    window.setInterval(function () { if (!play.completedAt) tick(); }, 1000);
  }
  connect();
})();
