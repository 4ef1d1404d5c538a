/* flowplay play page: live updates, output trees, copy.
 *
 * Live: subscribes to /api/ws?since=<cursor>&playId=<id> (the cursor the page was rendered
 * at, then the last one seen; reconnects with backoff). Each event of the play marks the
 * page stale; at most every REFRESH_MS the page is fetched again and the parts whose
 * signature changed are swapped in (the play's facts, buttons, error, relations, each step
 * card, the approvals and the event history), keeping open <details> open and a note
 * being typed. Loop items therefore arrive in item order, as the server sorts them.
 *
 * Outputs: "Show as tree" fetches the whole value (/plays/<id>/layers/<layer>/out) and
 * builds a collapsible tree of <details>; base64 strings show as binary (size, type,
 * download). "Copy JSON" copies the whole value. No dependencies, no build step.
 */
(function () {
  "use strict";

  var configNode = document.getElementById("live-config");
  if (!configNode) return;
  var cfg = JSON.parse(configNode.textContent);
  var statusNode = document.getElementById("live-status");
  var announceNode = document.getElementById("live-announce");
  var TERMINAL = { DONE: 1, FAIL: 1, SKIP: 1, FILTERED: 1 };
  var REFRESH_MS = 400;
  var lastCursor = cfg.since || null;
  var skew = cfg.serverNow ? Date.parse(cfg.serverNow) - Date.now() : 0;
  var attempts = 0;
  var state = cfg.state;

  // -- formatting ------------------------------------------------------------------------

  function pad(n) { return (n < 10 ? "0" : "") + n; }

  function fmtMs(ms) {
    if (ms === null || ms === undefined || isNaN(ms)) return "—";
    ms = Math.max(0, Math.round(ms));
    if (ms < 1000) return ms + " ms";
    if (ms < 60000) return (ms / 1000).toFixed(1) + " s";
    var s = Math.floor(ms / 1000);
    if (s < 3600) return Math.floor(s / 60) + " min " + pad(s % 60) + " s";
    return Math.floor(s / 3600) + " h " + pad(Math.floor((s % 3600) / 60)) + " min";
  }

  function fmtBytes(n) {
    if (n < 1024) return n + " B";
    if (n < 1048576) return (n / 1024).toFixed(1) + " KB";
    return (n / 1048576).toFixed(1) + " MB";
  }

  function announce(text) { if (announceNode) announceNode.textContent = text; }

  function setStatus(s, text) {
    if (!statusNode) return;
    statusNode.setAttribute("data-state", s);
    statusNode.textContent = "Live updates: " + text;
  }

  // -- the connection ----------------------------------------------------------------------

  function socketUrl() {
    var params = ["playId=" + encodeURIComponent(cfg.playId)];
    if (lastCursor) params.push("since=" + encodeURIComponent(lastCursor));
    var scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    return scheme + "//" + window.location.host + "/api/ws?" + params.join("&");
  }

  function connect() {
    if (!("WebSocket" in window)) { setStatus("off", "not supported by this browser"); return; }
    setStatus("connecting", attempts ? "reconnecting…" : "connecting…");
    var socket;
    try { socket = new WebSocket(socketUrl()); } catch (err) { retry(); return; }
    socket.onopen = function () {
      attempts = 0;
      setStatus("on", "on");
      stale();  // whatever happened while the connection was down
    };
    socket.onmessage = function (message) {
      var event;
      try { event = JSON.parse(message.data); } catch (err) { return; }
      if (!event || typeof event.cursor !== "string" || event.type === "pong") return;
      if (lastCursor && event.cursor <= lastCursor) return;
      lastCursor = event.cursor;
      if (event.playId !== cfg.playId) return;
      onEvent(event);
    };
    socket.onclose = function (close) {
      if (close.code === 4401) { setStatus("off", "off (logged out; reload to log in)"); return; }
      if (close.code === 4403) { setStatus("off", "off (not allowed; reload the page)"); return; }
      retry();
    };
  }

  function retry() {
    attempts += 1;
    var delay = Math.min(30000, 500 * Math.pow(2, Math.min(attempts, 6))) * (0.8 + Math.random() * 0.4);
    setStatus("off", "reconnecting in " + Math.round(delay / 1000) + " s…");
    window.setTimeout(connect, delay);
  }

  function onEvent(event) {
    var next = null;
    if (event.type === "play:started") next = "RUN";
    else if (event.type === "play:completed" || event.type === "play:failed") next = event.state || (event.type === "play:failed" ? "FAIL" : "DONE");
    else if (event.type === "play:waiting") next = "WAIT";
    else if (event.type === "play:state") next = event.state;
    if (next && next !== state) {
      state = next;
      var badge = document.querySelector("#play-state .badge");
      if (badge) {
        badge.className = "badge badge--" + next.toLowerCase();
        badge.setAttribute("data-state", next);
        badge.textContent = next;
      }
      announce("Play is now " + next + ".");
    } else if (event.ref && (event.type === "play:layer:completed" || event.type === "play:layer:failed")) {
      announce("Step " + event.ref + (event.iteration !== undefined ? " [" + event.iteration + "]" : "") + ": " + event.state + ".");
    }
    stale();
  }

  // -- refreshing parts of the page -----------------------------------------------------------

  var timer = null;
  var inFlight = false;
  var again = false;

  function stale() {
    if (inFlight) { again = true; return; }
    if (!timer) timer = window.setTimeout(refresh, REFRESH_MS);
  }

  function openDetails(root) {
    var open = {};
    var list = root.querySelectorAll("details");
    for (var i = 0; i < list.length; i++) {
      var key = detailsKey(list[i], i);
      open[key] = list[i].open;
    }
    return open;
  }

  function detailsKey(el, i) {
    return el.id || (el.querySelector("summary") ? el.querySelector("summary").textContent.trim().slice(0, 40) : "") + "#" + i;
  }

  function keepOpen(root, open) {
    var list = root.querySelectorAll("details");
    for (var i = 0; i < list.length; i++) {
      var key = detailsKey(list[i], i);
      if (Object.prototype.hasOwnProperty.call(open, key)) list[i].open = open[key];
    }
  }

  function swap(current, fresh) {
    if (!current || !fresh) return false;
    var active = document.activeElement;
    if (active && current.contains(active) && (active.tagName === "TEXTAREA" || active.tagName === "INPUT" || active.tagName === "SELECT")) return false;
    if (current.querySelector(".js-tree-root:not([hidden])")) {
      // Keep a tree someone opened: swap everything of the card but its output.
      var treeOut = current.querySelector(".step__out");
      var freshOut = fresh.querySelector(".step__out");
      if (treeOut && freshOut) freshOut.parentNode.replaceChild(treeOut, freshOut);
    }
    var open = openDetails(current);
    current.parentNode.replaceChild(fresh, current);
    keepOpen(fresh, open);
    return true;
  }

  function refresh() {
    timer = null;
    inFlight = true;
    fetch(window.location.href, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (!html) return;
        var doc = new DOMParser().parseFromString(html, "text/html");
        ["play-facts", "play-actions", "play-error", "play-relations", "play-approvals"].forEach(function (id) {
          var current = document.getElementById(id);
          var fresh = doc.getElementById(id);
          if (current && fresh && current.innerHTML !== fresh.innerHTML) swap(current, fresh);
        });
        var historyNow = document.getElementById("play-history");
        var historyFresh = doc.getElementById("play-history");
        if (historyNow && historyFresh) swap(historyNow, historyFresh);
        var steps = document.getElementById("steps");
        var freshSteps = doc.querySelectorAll("#steps > li.step");
        for (var i = 0; i < freshSteps.length; i++) {
          var fresh = freshSteps[i];
          var current = document.getElementById(fresh.id);
          if (!current) { steps.appendChild(fresh); continue; }
          if (current.getAttribute("data-sig") !== fresh.getAttribute("data-sig")) {
            if (swap(current, fresh)) flash(fresh);
          }
        }
        bind();
        tick();
      })
      .catch(function () { /* the next event tries again */ })
      .then(function () {
        inFlight = false;
        if (again) { again = false; stale(); }
      });
  }

  function flash(node) {
    node.classList.add("is-updated");
    window.setTimeout(function () { node.classList.remove("is-updated"); }, 1500);
  }

  // -- running durations ------------------------------------------------------------------------

  function tick() {
    var now = Date.now() + skew;
    var running = document.querySelectorAll("[data-running-since]");
    for (var i = 0; i < running.length; i++) {
      var since = Date.parse(running[i].getAttribute("data-running-since"));
      if (!isNaN(since) && !TERMINAL[state]) running[i].textContent = fmtMs(now - since) + " so far";
    }
  }

  // -- output trees and copy ---------------------------------------------------------------------

  var BASE64 = /^[A-Za-z0-9+/]+={0,2}$/;
  var SNIFF = [["JVBERi", "application/pdf"], ["iVBORw0KGgo", "image/png"], ["/9j/", "image/jpeg"],
               ["R0lGOD", "image/gif"], ["UEsDB", "application/zip"], ["H4sI", "application/gzip"]];

  function binaryInfo(value) {
    if (typeof value !== "string" || value.length < 256 || value.length % 4) return null;
    if (!BASE64.test(value.slice(0, 4096)) || !BASE64.test(value.slice(-4096))) return null;
    var padding = value.length - value.replace(/=+$/, "").length;
    var type = "application/octet-stream";
    for (var i = 0; i < SNIFF.length; i++) if (value.indexOf(SNIFF[i][0]) === 0) { type = SNIFF[i][1]; break; }
    return { bytes: value.length / 4 * 3 - padding, type: type };
  }

  function leaf(value, path, url) {
    var span = document.createElement("span");
    if (value === null) { span.className = "tree__null"; span.textContent = "null"; return span; }
    if (typeof value === "string") {
      var info = binaryInfo(value);
      if (info) {
        span.className = "tree__binary";
        span.appendChild(document.createTextNode("binary, " + fmtBytes(info.bytes) + ", " + info.type + " "));
        var a = document.createElement("a");
        a.href = url + "?path=" + encodeURIComponent(path) + "&raw=1";
        a.setAttribute("download", "");
        a.textContent = "download";
        span.appendChild(a);
        return span;
      }
      span.className = "tree__string";
      if (value.length > 500) {
        span.textContent = JSON.stringify(value.slice(0, 500)) + "… ";
        var more = document.createElement("button");
        more.type = "button";
        more.className = "btn btn--link";
        more.textContent = "show all " + value.length + " characters";
        more.addEventListener("click", function () { span.textContent = JSON.stringify(value); });
        span.appendChild(more);
      } else {
        span.textContent = JSON.stringify(value);
      }
      return span;
    }
    span.className = "tree__" + typeof value;
    span.textContent = String(value);
    return span;
  }

  function tree(value, path, url, depth) {
    if (value === null || typeof value !== "object") return leaf(value, path, url);
    var isArray = Array.isArray(value);
    var keys = isArray ? value.map(function (_, i) { return i; }) : Object.keys(value);
    var details = document.createElement("details");
    details.open = depth < 2;
    var summary = document.createElement("summary");
    summary.className = "tree__summary";
    summary.textContent = isArray ? "[" + keys.length + " item" + (keys.length === 1 ? "" : "s") + "]"
                                  : "{" + keys.length + " key" + (keys.length === 1 ? "" : "s") + "}";
    details.appendChild(summary);
    var list = document.createElement("ul");
    list.className = "tree__list";
    var shown = Math.min(keys.length, 200);
    function add(from, to) {
      for (var i = from; i < to; i++) {
        var k = keys[i];
        var li = document.createElement("li");
        var key = document.createElement("span");
        key.className = "tree__key";
        key.textContent = (isArray ? k : JSON.stringify(k)) + ": ";
        li.appendChild(key);
        li.appendChild(tree(value[k], path ? path + "." + k : String(k), url, depth + 1));
        list.appendChild(li);
      }
    }
    add(0, shown);
    if (keys.length > shown) {
      var li = document.createElement("li");
      var more = document.createElement("button");
      more.type = "button";
      more.className = "btn btn--link";
      more.textContent = "show the other " + (keys.length - shown);
      more.addEventListener("click", function () { li.remove(); add(shown, keys.length); });
      li.appendChild(more);
      list.appendChild(li);
    }
    details.appendChild(list);
    return details;
  }

  function fetchOut(box) {
    if (box._value) return Promise.resolve(box._value);
    return fetch(box.getAttribute("data-out-url"), { credentials: "same-origin" })
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.text(); })
      .then(function (text) { box._value = text; return text; });
  }

  function onTree(e) {
    var box = e.target.closest(".output");
    var root = box.querySelector(".js-tree-root");
    var button = e.target;
    if (!root.hidden) {
      root.hidden = true;
      box.querySelector(".js-preview").hidden = false;
      button.textContent = "Show as tree";
      return;
    }
    button.disabled = true;
    fetchOut(box).then(function (text) {
      root.textContent = "";
      root.appendChild(tree(JSON.parse(text), "", box.getAttribute("data-out-url"), 0));
      root.hidden = false;
      box.querySelector(".js-preview").hidden = true;
      button.textContent = "Show the preview";
    }).catch(function (err) {
      box.querySelector(".js-copy-status").textContent = "Could not load the output: " + err.message;
    }).then(function () { button.disabled = false; });
  }

  function onCopy(e) {
    var box = e.target.closest(".output");
    var status = box.querySelector(".js-copy-status");
    fetchOut(box).then(function (text) {
      if (navigator.clipboard && navigator.clipboard.writeText) return navigator.clipboard.writeText(text);
      var area = document.createElement("textarea");
      area.value = text;
      document.body.appendChild(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }).then(function () {
      status.textContent = "Copied.";
    }).catch(function (err) {
      status.textContent = "Could not copy: " + err.message;
    });
  }

  function bind() {
    var list = document.querySelectorAll(".output:not([data-bound])");
    for (var i = 0; i < list.length; i++) {
      list[i].setAttribute("data-bound", "1");
      list[i].querySelector(".js-tree").addEventListener("click", onTree);
      list[i].querySelector(".js-copy").addEventListener("click", onCopy);
    }
    var forms = document.querySelectorAll("form[data-confirm]:not([data-bound])");
    for (var j = 0; j < forms.length; j++) {
      forms[j].setAttribute("data-bound", "1");
      forms[j].addEventListener("submit", function (e) {
        if (!window.confirm(this.getAttribute("data-confirm"))) e.preventDefault();
      });
    }
  }

  bind();
  tick();
  window.setInterval(tick, 1000);
  connect();  // a retry or a resume of a finished play shows up here too
})();
