/* refine-audit portal: progressive enhancement only. Every page works without this file;
   with it, the new-audit form validates before sending and shows upload progress, and an
   audit page follows its audit live. State-changing requests carry the session's CSRF
   token in the X-CSRF-Token header (forms carry it as a hidden field). */
(function () {
  "use strict";

  var POLL_MS = 1500;

  function csrfToken() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  }

  function $(selector, root) { return (root || document).querySelector(selector); }
  function $all(selector, root) { return Array.prototype.slice.call((root || document).querySelectorAll(selector)); }

  /* ---- field errors (shared by client- and server-side validation) ---- */

  function setFieldError(form, name, message) {
    var slot = $("#err-" + name, form);
    var control = form.elements[name];
    var target = control && control.length && !control.tagName ? control[0] : control;
    if (!slot || slot.parentElement.closest("[hidden]")) return false; // inside a panel not in use
    slot.textContent = message;
    slot.hidden = false;
    if (target && target.setAttribute) target.setAttribute("aria-invalid", "true");
    return true;
  }

  function clearErrors(form) {
    $all(".field-error", form).forEach(function (slot) { slot.hidden = true; slot.textContent = ""; });
    $all('[aria-invalid="true"]', form).forEach(function (el) { el.removeAttribute("aria-invalid"); });
    var summary = $("#form-summary");
    if (summary) summary.hidden = true;
  }

  function showErrors(form, errors, fallback) {
    var summary = $("#form-summary");
    var unplaced = [];
    Object.keys(errors).forEach(function (name) {
      if (!setFieldError(form, name, errors[name])) unplaced.push(errors[name]);
    });
    if (summary) {
      var placed = Object.keys(errors).length > unplaced.length;
      summary.textContent = unplaced.length ? unplaced.join(" ")
        : placed ? "Please fix the fields marked below." : (fallback || "The audit could not be submitted.");
      summary.hidden = false;
    }
    var first = $('[aria-invalid="true"]', form) || summary;
    if (first && first.focus) { if (first === summary) summary.setAttribute("tabindex", "-1"); first.focus(); }
  }

  /* ---- new-audit form ---- */

  function syncConditional(form) {
    $all("[data-show-when]", form).forEach(function (panel) {
      var parts = panel.getAttribute("data-show-when").split("=");
      var checked = $('input[name="' + parts[0] + '"]:checked', form);
      panel.hidden = !checked || checked.value !== parts[1];
    });
    $all("[data-required-when]", form).forEach(function (input) {
      var parts = input.getAttribute("data-required-when").split("=");
      var checked = $('input[name="' + parts[0] + '"]:checked', form);
      input.required = !!checked && checked.value === parts[1];
    });
  }

  function validateForm(form) {
    var errors = {};
    var maxBytes = parseInt(form.getAttribute("data-max-bytes") || "0", 10);
    $all("input, select, textarea", form).forEach(function (el) {
      if (!el.name || el.type === "hidden" || el.closest("[hidden]") || errors[el.name]) return;
      if (!el.checkValidity()) {
        errors[el.name] = el.type === "file" && el.validity.valueMissing ? "Choose a file to upload." : el.validationMessage;
      } else if (el.type === "file" && el.files.length && maxBytes && el.files[0].size > maxBytes) {
        errors[el.name] = "This file is larger than the upload limit of " + Math.round(maxBytes / 1048576) + " MiB.";
      } else if (el.hasAttribute("data-json") && el.value.trim()) {
        try {
          var parsed = JSON.parse(el.value);
          if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) errors[el.name] = "Must be a JSON object.";
        } catch (e) { errors[el.name] = "Not valid JSON: " + e.message; }
      }
    });
    if (!$('input[name="attacks"]:checked', form)) errors.attacks = "Choose at least one positive-control attack.";
    return errors;
  }

  function megabytes(n) { return (n / 1048576).toFixed(1) + " MB"; }

  function sendForm(form) {
    var button = $("#submit-audit", form);
    var box = $("#upload-progress", form), bar = $("#upload-bar", form), text = $("#upload-text", form);
    var xhr = new XMLHttpRequest();
    xhr.open("POST", form.action);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.setRequestHeader("X-CSRF-Token", csrfToken());
    xhr.upload.addEventListener("progress", function (event) {
      if (!event.lengthComputable) return;
      var percent = Math.round((100 * event.loaded) / event.total);
      bar.value = percent;
      text.textContent = "Uploading " + percent + "% (" + megabytes(event.loaded) + " of " + megabytes(event.total) + ")";
    });
    xhr.upload.addEventListener("load", function () { bar.value = 100; text.textContent = "Uploaded; checking the model…"; });
    xhr.addEventListener("load", function () {
      var body = null;
      try { body = JSON.parse(xhr.responseText); } catch (e) { body = null; }
      if (xhr.status === 201 && body && body.redirect) { window.location.assign(body.redirect); return; }
      done();
      var error = (body && body.error) || {};
      var fields = error.fields || {};
      if (xhr.status === 413) fields = { model: error.message };
      showErrors(form, fields, error.message || "The audit could not be submitted (HTTP " + xhr.status + ").");
    });
    xhr.addEventListener("error", function () {
      done();
      showErrors(form, {}, "The upload was interrupted. Check the connection and try again.");
    });
    function done() { button.disabled = false; box.hidden = true; }
    button.disabled = true;
    box.hidden = false;
    bar.value = 0;
    text.textContent = "Uploading…";
    xhr.send(new FormData(form));
  }

  /* ---- the plan of the form as filled in (a dry run; the checkpoint itself is not sent) ---- */

  function renderPlan(box, body, status) {
    var table = $("table", box), note = $(".plan-note", box);
    var rows = (body && body.description) || [];
    table.hidden = !rows.length;
    $("tbody", table).innerHTML = "";
    rows.forEach(function (row) {
      var tr = document.createElement("tr");
      row.forEach(function (cell, i) {
        var el = document.createElement(i === 0 ? "th" : "td");
        if (i === 0) el.setAttribute("scope", "row");
        el.textContent = cell;
        tr.appendChild(el);
      });
      $("tbody", table).appendChild(tr);
    });
    var error = body && body.error;
    note.textContent = error ? "No plan yet: " + error.message
      : rows.length ? "" : "The plan could not be computed (HTTP " + status + ").";
    note.classList.toggle("field-error", !!error);
  }

  var PLAN_DATASET_MAX = 16 * 1048576; // larger data sets are planned when submitted, not re-sent on every change

  function requestPlan(form, box) {
    var data = new FormData(form);
    data.delete("model");
    var dataset = form.elements.dataset;
    if (dataset && dataset.files.length && dataset.files[0].size > PLAN_DATASET_MAX) data.delete("dataset");
    fetch(box.getAttribute("data-plan-url"), {
      method: "POST", body: data, credentials: "same-origin",
      headers: { Accept: "application/json", "X-CSRF-Token": csrfToken() },
    }).then(function (res) {
      return res.json().then(function (body) { renderPlan(box, body, res.status); });
    }).catch(function () { renderPlan(box, null, 0); });
  }

  function followPlan(form) {
    var box = $("#plan-preview", form);
    if (!box) return;
    var timer = null;
    var later = function () { clearTimeout(timer); timer = setTimeout(function () { requestPlan(form, box); }, 400); };
    form.addEventListener("change", later);
    form.addEventListener("input", later);
    requestPlan(form, box);
  }

  function initAuditForm(form) {
    syncConditional(form);
    followPlan(form);
    form.addEventListener("change", function () { syncConditional(form); });
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      clearErrors(form);
      var errors = validateForm(form);
      if (Object.keys(errors).length) { showErrors(form, errors); return; }
      sendForm(form);
    });
  }

  /* ---- live audit page ---- */

  function renderLive(root, data) {
    var badge = $("#audit-status .badge", root);
    if (badge) {
      badge.className = "badge badge-" + data.status;
      badge.setAttribute("data-status", data.status);
      badge.textContent = data.status_label;
    }
    var set = function (id, value) { var el = $(id, root); if (el) el.textContent = value; };
    set("#audit-stage", data.stage_label);
    set("#audit-percent", data.percent + "%");
    set("#audit-detail", data.detail_text || "");
    if (data.started_text) set("#audit-started", data.started_text);
    var bar = $("#audit-progress", root);
    if (bar) { bar.value = data.percent; bar.textContent = data.percent + "%"; }
    var cancel = $("#cancel-button", root);
    if (cancel && data.cancel_requested) { cancel.disabled = true; cancel.textContent = "Cancelling…"; }
  }

  function follow(root) {
    var statusUrl = root.getAttribute("data-status-url");
    var panelUrl = root.getAttribute("data-panel-url");
    var timer = null;

    function schedule(delay) { clearTimeout(timer); timer = setTimeout(tick, delay); }

    function swapPanel() {
      return fetch(panelUrl, { credentials: "same-origin", cache: "no-store", headers: { Accept: "text/html" } })
        .then(function (res) { if (!res.ok) throw new Error("HTTP " + res.status); return res.text(); })
        .then(function (html) { root.innerHTML = html; });
    }

    function tick() {
      fetch(statusUrl, { credentials: "same-origin", cache: "no-store", headers: { Accept: "application/json" } })
        .then(function (res) {
          if (res.status === 401) { window.location.assign("/signin?next=" + encodeURIComponent(location.pathname)); return null; }
          if (!res.ok) throw new Error("HTTP " + res.status);
          return res.json();
        })
        .then(function (data) {
          if (!data) return;
          renderLive(root, data);
          if (data.terminal) return swapPanel();
          schedule(POLL_MS);
        })
        .catch(function () { schedule(POLL_MS * 2); }); // transient (server restarting): keep following
    }

    root.addEventListener("submit", function (event) {
      var form = event.target;
      if (form.id !== "cancel-form") return;
      event.preventDefault();
      var button = $("#cancel-button", form);
      button.disabled = true;
      button.textContent = "Cancelling…";
      fetch(form.action, {
        method: "POST", credentials: "same-origin",
        headers: { Accept: "application/json", "X-CSRF-Token": csrfToken() },
      }).then(function () { schedule(0); }, function () { button.disabled = false; button.textContent = "Cancel audit"; });
    });

    if ($('[data-live="true"]', root)) schedule(POLL_MS);
  }

  /* ---- small helpers ---- */

  function initCopyButtons() {
    $all("[data-copy]").forEach(function (button) {
      button.addEventListener("click", function () {
        var input = document.getElementById(button.getAttribute("data-copy"));
        input.select();
        var copied = navigator.clipboard ? navigator.clipboard.writeText(input.value) : Promise.reject();
        copied.then(function () { button.textContent = "Copied"; }, function () {
          button.textContent = document.execCommand("copy") ? "Copied" : "Press Ctrl+C";
        });
      });
    });
  }

  function initConfirmForms() {
    $all("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (event) {
        if (!window.confirm(form.getAttribute("data-confirm"))) event.preventDefault();
      });
    });
  }

  function initAutosubmit() {
    $all("select[data-autosubmit]").forEach(function (select) {
      select.addEventListener("change", function () { select.form.submit(); });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var form = $("#audit-form");
    if (form) initAuditForm(form);
    var panel = $("#audit-panel");
    if (panel) follow(panel);
    initCopyButtons();
    initConfirmForms();
    initAutosubmit();
  });
})();
