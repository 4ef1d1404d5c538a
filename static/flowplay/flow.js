/* flowplay flow page: the Run form reads its run-at time in the browser's zone and checks
 * the args are a JSON object before sending them (the server checks again). */
(function () {
  "use strict";
  var form = document.querySelector(".run-form");
  if (!form) return;
  var zone = "";
  try { zone = Intl.DateTimeFormat().resolvedOptions().timeZone || ""; } catch (err) { zone = ""; }
  var tz = form.querySelector(".js-tz");
  if (tz && !tz.value) tz.value = zone;
  var label = form.querySelector(".js-tz-name");
  if (label && (tz.value || zone)) label.textContent = "your time zone, " + (tz.value || zone);
  var args = form.querySelector("#run-args");
  var error = form.querySelector(".js-json-error");
  function check() {
    var message = "";
    try {
      var value = JSON.parse(args.value || "{}");
      if (value === null || typeof value !== "object" || Array.isArray(value)) message = "The args must be a JSON object.";
    } catch (err) {
      message = "This is not valid JSON: " + err.message;
    }
    error.textContent = message;
    error.hidden = !message;
    if (message) args.setAttribute("aria-invalid", "true"); else args.removeAttribute("aria-invalid");
    return !message;
  }
  args.addEventListener("blur", check);
  form.addEventListener("submit", function (e) {
    if (!check()) { e.preventDefault(); args.focus(); }
  });
})();
