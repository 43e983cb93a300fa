// tocsin UI: small progressive enhancements over server-rendered pages.
// Copy buttons, images shown on a click, the groups list's selection and auto-refresh,
// and the template editor's live preview. Everything works without this file except the
// live preview and the refresh (without it an image link opens the image).
(function () {
  "use strict";

  var meta = document.querySelector('meta[name="csrf-token"]');
  var csrf = meta ? meta.getAttribute("content") : "";

  // -- copy buttons -----------------------------------------------------------------

  function copyWithSelection(text) {
    // For browsers without the async clipboard (plain http on a non-local host).
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.top = "-1000px";
    document.body.appendChild(area);
    area.select();
    var ok = false;
    try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
    document.body.removeChild(area);
    return ok ? Promise.resolve() : Promise.reject(new Error("copy refused"));
  }

  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text).catch(function () { return copyWithSelection(text); });
    }
    return copyWithSelection(text);
  }

  function say(button, text) {
    var before = button.dataset.label || button.textContent;
    button.dataset.label = before;
    button.textContent = text;
    setTimeout(function () { button.textContent = before; }, 1500);
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy]");
    if (!button) return;
    copyText(button.getAttribute("data-copy")).then(
      function () { say(button, "Copied"); },
      function () {
        // Last resort: select the text beside the button, for Ctrl+C.
        var code = button.parentNode.querySelector("code, pre");
        if (code) {
          var range = document.createRange();
          range.selectNodeContents(code);
          var sel = window.getSelection();
          sel.removeAllRanges();
          sel.addRange(range);
        }
        say(button, "Press Ctrl+C");
      }
    );
  });

  // -- images only on a click (no tracking pixels from payload URLs) ------------------

  document.addEventListener("click", function (event) {
    var link = event.target.closest("a[data-image]");
    if (!link || event.ctrlKey || event.metaKey) return;
    var url = link.getAttribute("data-image");
    if (!/^https?:\/\//i.test(url)) return;
    event.preventDefault();
    var next = link.nextElementSibling;
    if (next && next.classList.contains("shown-image")) { next.remove(); return; }
    var image = document.createElement("img");
    image.className = "shown-image";
    image.alt = link.textContent;
    image.referrerPolicy = "no-referrer";
    image.src = url;
    link.after(image);
  });

  // -- alert groups: selection for the bulk actions ---------------------------------

  var groups = document.getElementById("groups");
  var picked = document.getElementById("picked-count");

  function boxes() { return groups ? groups.querySelectorAll('input[name="group"]') : []; }

  function countPicked() {
    if (!picked) return;
    var n = 0;
    boxes().forEach(function (box) { if (box.checked) n += 1; });
    picked.textContent = String(n);
  }

  if (groups) {
    groups.addEventListener("change", function (event) {
      if (event.target.id === "pick-all") {
        boxes().forEach(function (box) { box.checked = event.target.checked; });
      }
      countPicked();
    });
  }

  // -- alert groups: auto-refresh that keeps the filters and the selection ---------

  if (groups && groups.dataset.refresh) {
    var toggle = document.getElementById("autorefresh");
    var stamp = document.getElementById("refresh-status");
    var busy = false;
    var lastGood = Date.now();
    var PERIOD = 5000;

    var clock = function (ms) { return new Date(ms).toLocaleTimeString(); };
    var mark = function (ok, why) {
      if (!stamp) return;
      if (ok) {
        lastGood = Date.now();
        stamp.dataset.stale = "false";
        stamp.textContent = "updated " + clock(lastGood);
      } else {
        stamp.dataset.stale = "true";
        stamp.textContent = "Not updated since " + clock(lastGood) + " (" + why + "); retrying";
      }
    };
    var refresh = function () {
      if (busy || document.hidden || (toggle && !toggle.checked)) return;
      // Never swap the list under someone choosing a silence duration.
      if (groups.contains(document.activeElement) && document.activeElement.tagName === "SELECT") return;
      busy = true;
      fetch(groups.dataset.refresh, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (r) {
          if (r.status === 401) { window.location.reload(); return null; }
          if (!r.ok) throw new Error("HTTP " + r.status);
          return r.text();
        })
        .then(function (text) {
          if (text === null) return;
          var data;
          try { data = JSON.parse(text); } catch (e) { throw new Error("unreadable answer"); }
          if (!data || typeof data.html !== "string") throw new Error("unexpected answer");
          var keep = {};
          boxes().forEach(function (box) { if (box.checked) keep[box.value] = true; });
          groups.innerHTML = data.html;
          boxes().forEach(function (box) { if (keep[box.value]) box.checked = true; });
          countPicked();
          mark(true);
        })
        .catch(function (e) { mark(false, e && e.message ? e.message : "network error"); })
        .then(function () { busy = false; });
    };
    setInterval(refresh, PERIOD);
    document.addEventListener("visibilitychange", refresh);
    mark(true);
  }

  // -- template editor: live preview -------------------------------------------------

  var editor = document.getElementById("editor");
  if (!editor) return;
  var templates = editor.querySelectorAll("textarea[data-template]");
  var payload = document.getElementById("payload");
  var source = document.getElementById("payload-source");
  var status = document.getElementById("preview-status");
  var timer = null;
  var sequence = 0;

  function out(name) { return editor.querySelector('[data-out="' + name + '"]'); }

  function safeUrl(url) {
    return typeof url === "string" && /^https?:\/\//i.test(url) ? url : null;
  }

  function show(data) {
    var errors = data.errors || {};
    var compile = data.compile_errors || {};
    templates.forEach(function (area) {
      var name = area.dataset.template;
      var slot = editor.querySelector('[data-error-for="' + name + '"]');
      var text = compile[name] ? "Does not compile: " + compile[name] : errors[name] ? "Render error: " + errors[name] : "";
      slot.textContent = text;
      area.classList.toggle("invalid", Boolean(compile[name]));
    });
    out("payload_error").textContent = data.payload_error || data.error || "";
    ["grouping_id", "grouping_key", "title", "message", "route"].forEach(function (name) {
      var value = data[name];
      out(name).textContent = value === null || value === undefined ? (data.payload_error ? "" : "—") : String(value);
    });
    ["resolve", "acknowledge"].forEach(function (name) {
      out(name).textContent = name in data ? (data[name] ? "true" : "false") : "";
    });
    var link = out("source_link");
    var href = safeUrl(data.source_link);
    link.textContent = data.source_link || "—";
    if (href) link.setAttribute("href", href); else link.removeAttribute("href");
    var image = editor.querySelector("[data-out-img]");
    var src = safeUrl(data.image_url);
    out("image_url").textContent = data.image_url || "—";
    if (src) { image.src = src; image.hidden = false; } else { image.removeAttribute("src"); image.hidden = true; }
    var g = data.groups;
    if (g) {
      out("groups").textContent = g.alerts
        ? "The last " + g.evaluated + " alerts" + (g.evaluated < g.alerts ? " (of " + g.alerts + ", out of time)" : "") +
          " form " + g.current + " group" + (g.current === 1 ? "" : "s") + " with the current grouping id, " +
          g.edited + " with the edited one."
        : "No alerts yet to compare groupings on.";
    }
  }

  function preview() {
    var mine = ++sequence;
    var body = { templates: {}, payload: payload.value };
    templates.forEach(function (area) { body.templates[area.dataset.template] = area.value; });
    status.textContent = "rendering…";
    fetch(editor.dataset.previewUrl, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body)
    })
      .then(function (r) { return r.json(); })
      .then(function (data) {
        if (mine !== sequence) return; // a newer edit already asked
        show(data);
        status.textContent = "";
      })
      .catch(function (e) { if (mine === sequence) status.textContent = "preview failed: " + e.message; });
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(preview, 300);
  }

  templates.forEach(function (area) { area.addEventListener("input", schedule); });
  payload.addEventListener("input", schedule);
  editor.addEventListener("click", function (event) {
    var button = event.target.closest("[data-reset]");
    if (!button) return;
    var area = document.getElementById(button.getAttribute("data-reset"));
    area.value = area.dataset.default || "";
    schedule();
  });
  source.addEventListener("change", function () {
    var url = editor.dataset.payloadUrl + (source.value ? "?alert_id=" + encodeURIComponent(source.value) : "");
    fetch(url, { credentials: "same-origin" })
      .then(function (r) { return r.json(); })
      .then(function (data) {
        if ("payload" in data) {
          payload.value = JSON.stringify(data.payload, null, 2);
          preview();
        }
      });
  });
  preview();
})();
