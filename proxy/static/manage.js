// streamfold operator page: signs in with the management secret and draws each panel from /v0/management.
//
// Rules this file keeps (the page's Content-Security-Policy allows no inline script or style):
// * every value from the server reaches the DOM as text (el() below: text nodes), never parsed as HTML;
// * the secret lives in sessionStorage (this tab only) and goes out only as a Bearer header to
//   /v0/management on this origin; signing out, or any 401, forgets it.
"use strict";

(() => {
  const SECRET = "streamfold.secret";
  const API = "/v0/management";
  const $ = (selector, root = document) => root.querySelector(selector);
  const $$ = (selector, root = document) => Array.from(root.querySelectorAll(selector));

  class SignedOut extends Error {}

  // One element: el("td", {class: "x"}, "text", child). Strings become text nodes.
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "checked" || name === "disabled" || name === "value") node[name] = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === undefined || child === null) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  const time = (epoch) => (epoch ? new Date(epoch * 1000).toLocaleTimeString([], {hour12: false}) : "-");
  const dateTime = (epoch) => (epoch ? new Date(epoch * 1000).toLocaleString([], {hour12: false}) : "-");
  const duration = (seconds) => {
    const s = Math.floor(seconds);
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    return (d ? d + "d " : "") + (d || h ? h + "h " : "") + m + "m " + (s % 60) + "s";
  };
  const number = (value) => (value === null || value === undefined ? "-" : String(value));

  function notice(text, kind = "info") {
    const box = $("#notice");
    box.textContent = text;
    box.className = "notice " + kind;
    box.hidden = !text;
  }

  // ---- the management API --------------------------------------------------------------
  async function api(path, {method = "GET", body} = {}) {
    const secret = sessionStorage.getItem(SECRET);
    if (!secret) {
      showSignIn("");
      throw new SignedOut();
    }
    const headers = {Authorization: "Bearer " + secret};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(API + path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store", credentials: "omit", redirect: "error",
    });
    const text = await response.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (response.status === 401) {
      forget();
      showSignIn(message(data, "The management secret was not accepted; sign in again."));
      throw new SignedOut();
    }
    return {status: response.status, ok: response.ok, data, text, headers: response.headers};
  }

  function message(data, fallback) {
    return data && data.error && typeof data.error.message === "string" ? data.error.message : fallback;
  }

  function forget() {
    sessionStorage.removeItem(SECRET);
  }

  // ---- sign in / out ------------------------------------------------------------------------
  function showSignIn(error) {
    $("#sign-in").hidden = false;
    $("#nav").hidden = true;
    $("#sign-out").hidden = true;
    for (const panel of $$(".panel")) panel.hidden = true;
    $("#sign-in-error").textContent = error || "";
    notice("");
  }

  async function signIn(event) {
    event.preventDefault();
    const field = $("#sign-in-form").elements.namedItem("secret");
    const secret = field.value;
    $("#sign-in-error").textContent = "";
    // Checked against the API before it is kept: a wrong secret is never stored.
    const response = await fetch(API + "/overview", {
      headers: {Authorization: "Bearer " + secret}, cache: "no-store", credentials: "omit",
    });
    let data = null;
    try { data = await response.json(); } catch (_) { data = null; }
    if (!response.ok) {
      const text = response.status === 429
        ? "Locked out after too many wrong secrets: " + message(data, "try again later") +
          " (retry in " + (response.headers.get("Retry-After") || "?") + " s)."
        : "Sign-in failed: " + message(data, "HTTP " + response.status) + ".";
      $("#sign-in-error").textContent = text;
      return;
    }
    sessionStorage.setItem(SECRET, secret);
    field.value = "";
    signedIn();
  }

  function signedIn() {
    $("#sign-in").hidden = true;
    $("#nav").hidden = false;
    $("#sign-out").hidden = false;
    show(location.hash.slice(1) || "overview");
  }

  function signOut() {
    forget();
    // Forget what was shown too: another person at this screen sees nothing after sign-out.
    for (const node of $$("#overview, #workers tbody, #providers tbody, #traffic, #recent tbody, #recent-summary, " +
                          "#usage, #usage-source, #config")) node.replaceChildren();
    $("#provider-form").hidden = true;
    usageStore = null;
    history.replaceState(null, "", location.pathname);
    showSignIn("");
    notice("Signed out; the secret is forgotten.");
  }

  // ---- panels -------------------------------------------------------------------------------
  const panels = {
    overview: loadOverview, providers: loadProviders, traffic: loadTraffic,
    requests: loadRecent, usage: loadUsage, config: loadConfig,
  };
  let current = "overview";

  async function show(name) {
    if (!panels[name]) name = "overview";
    current = name;
    notice("");
    for (const panel of $$(".panel")) panel.hidden = panel.id !== "panel-" + name;
    for (const button of $$("#nav button")) button.classList.toggle("active", button.dataset.panel === name);
    history.replaceState(null, "", "#" + name);
    await refresh();
  }

  async function refresh() {
    const panel = $("#panel-" + current);
    panel.classList.add("loading");
    try {
      await panels[current]();
      panel.dataset.loaded = String(Date.now());
    } catch (error) {
      if (!(error instanceof SignedOut)) notice("Could not load this panel: " + error.message, "error");
    } finally {
      panel.classList.remove("loading");
    }
  }

  function failed(response) {
    notice(message(response.data, "HTTP " + response.status), "error");
  }

  async function loadOverview() {
    const response = await api("/overview");
    if (!response.ok) return failed(response);
    const o = response.data;
    const redis = o.redis.state === "off" ? "off (this instance alone)"
      : o.redis.state + " at " + o.redis.url + ", providers version " + o.redis["providers-version"];
    const sources = Object.entries(o["provider-sources"] || {}).map(([n, s]) => n + ": " + s).join(", ");
    const rows = [
      ["version", o.version],
      ["up since", dateTime(o.started) + " (" + duration(o.uptime) + ")"],
      ["settings", o.settings],
      ["providers", o.providers + (sources ? " (" + sources + ")" : "")],
      ["last reload", o["last-reload"] ? dateTime(o["last-reload"]) : "none since start"],
      ["reload error", o["reload-error"] ? dateTime(o["reload-error"].at) + ": " + o["reload-error"].message : "none"],
      ["Redis", redis],
      ["usage source", o["usage-store"] ? "usage store" : "metrics (the usage store is not installed)"],
    ];
    $("#overview").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k),
      el("dd", {class: k === "reload error" && o["reload-error"] ? "error" : ""}, v)]));
    $("#workers tbody").replaceChildren(...o.workers.map((w) => el("tr", {},
      el("td", {}, w.pid), el("td", {}, dateTime(w.started)), el("td", {}, w.alive ? "yes" : "no"),
      el("td", {}, w.this ? "yes" : ""))));
  }

  // Providers: the list as the API shows it (keys redacted) plus each key's live state.
  let providerList = [];

  async function loadProviders() {
    const [list, keys] = await Promise.all([api("/openai-compatibility"), api("/keys")]);
    if (!list.ok) return failed(list);
    if (!keys.ok) return failed(keys);
    providerList = list.data["openai-compatibility"];
    const state = keys.data.providers;
    $("#providers tbody").replaceChildren(...providerList.map((p) => providerRow(p, state[p.name])));
  }

  function providerRow(p, live) {
    const models = el("ul", {class: "plain"}, ...p.models.map((m) =>
      el("li", {}, m.alias ? m.alias + " → " + m.name : m.name)));
    const keys = el("ul", {class: "plain keys"});
    for (const k of (live ? live.keys : [])) {
      const label = k.state === "ok" ? "ok" : (k.state === "refused" ? "refused until " : "cooling until ") + time(k.until);
      keys.append(el("li", {class: "key-" + k.state}, el("code", {}, k.key || "(empty)"), " ", label));
    }
    if (!p["api-key-entries"].length) keys.append(el("li", {}, "(no key)"));
    if (live && live["backoff-until"]) keys.append(el("li", {class: "key-cooling"}, "connect back-off until " + time(live["backoff-until"])));
    const toggle = (name) => {
      const box = el("input", {type: "checkbox", name, checked: Boolean(p[name]), "aria-label": name + " " + p.name});
      box.addEventListener("change", () => setFlag(p.name, name, box));
      return box;
    };
    const edit = el("button", {type: "button"}, "Edit");
    edit.addEventListener("click", () => openForm(p));
    const test = el("button", {type: "button", class: "test"}, "Test connection");
    const remove = el("button", {type: "button", class: "danger"}, "Delete");
    const result = el("div", {class: "test-result"});
    test.addEventListener("click", () => testConnection(p.name, result));
    remove.addEventListener("click", () => deleteProvider(p.name));
    return el("tr", {"data-provider": p.name},
      el("td", {}, el("strong", {}, p.name), p.prefix ? el("div", {class: "hint"}, "prefix " + p.prefix) : null),
      el("td", {}, p["base-url"]), el("td", {}, models), el("td", {}, keys),
      el("td", {class: "center"}, toggle("force-upstream-stream")), el("td", {class: "center"}, toggle("disabled")),
      el("td", {}, edit, " ", test, " ", remove, result));
  }

  async function setFlag(name, flag, box) {
    box.disabled = true;
    try {
      const response = await api("/openai-compatibility", {method: "PATCH", body: {name, value: {[flag]: box.checked}}});
      if (!response.ok) {
        box.checked = !box.checked;
        return failed(response);
      }
      notice(name + ": " + flag + " is now " + (box.checked ? "on" : "off") + " (every worker within about a second).", "ok");
      await loadProviders();
    } catch (error) {
      if (!(error instanceof SignedOut)) notice("Could not save: " + error.message, "error");
    } finally {
      box.disabled = false;
    }
  }

  async function testConnection(name, box) {
    box.replaceChildren(el("span", {class: "hint"}, "testing…"));
    const response = await api("/test-connection", {method: "POST", body: {name}});
    if (!response.ok) {
      box.replaceChildren(el("span", {class: "error"}, message(response.data, "HTTP " + response.status)));
      return;
    }
    box.replaceChildren(...response.data.results.map((r) => el("div", {class: r.ok ? "ok" : "error"},
      r.key + ": " + (r.ok ? "ok, " + r.count + " models (" + r.ms + " ms)" : r.error))));
  }

  async function deleteProvider(name) {
    if (!window.confirm("Delete provider " + name + "?")) return;
    const response = await api("/openai-compatibility?name=" + encodeURIComponent(name), {method: "DELETE"});
    if (!response.ok) return failed(response);
    notice("Deleted provider " + name + ".", "ok");
    await loadProviders();
  }

  // The add/edit form. Only changed fields are sent, so a save never rewrites what it didn't touch.
  let editing = null;  // {index, original} or null when adding

  function modelLines(models) {
    return models.map((m) => (m.alias ? m.name + " = " + m.alias : m.name)).join("\n");
  }

  function openForm(p) {
    const form = $("#provider-form");
    clearProblems();
    form.reset();
    editing = p ? {index: providerList.indexOf(p), original: p} : null;
    $("#provider-form-title").textContent = p ? "Edit provider " + p.name : "Add provider";
    const f = form.elements;
    f.namedItem("name").value = p ? p.name : "";
    f.namedItem("base-url").value = p ? p["base-url"] : "";
    f.namedItem("prefix").value = p ? p.prefix : "";
    f.namedItem("request-retry").value = p ? p["request-retry"] : -1;
    f.namedItem("api-key-entries").value = p ? p["api-key-entries"].map((e) => e["api-key"]).join("\n") : "";
    f.namedItem("models").value = p ? modelLines(p.models) : "";
    f.namedItem("form-force-upstream-stream").checked = p ? p["force-upstream-stream"] : false;
    f.namedItem("form-disabled").checked = p ? p.disabled : false;
    form.hidden = false;
    f.namedItem(p ? "base-url" : "name").focus();
  }

  function readForm() {
    const f = $("#provider-form").elements;
    const lines = (name) => f.namedItem(name).value.split("\n").map((s) => s.trim()).filter(Boolean);
    const retry = f.namedItem("request-retry").value.trim();
    return {
      "name": f.namedItem("name").value.trim(),
      "base-url": f.namedItem("base-url").value.trim(),
      "prefix": f.namedItem("prefix").value.trim(),
      // a number when it is one; otherwise as typed, so the validator names the problem
      "request-retry": /^-?\d+$/.test(retry) ? Number(retry) : retry,
      "api-key-entries": lines("api-key-entries").map((key) => ({"api-key": key})),
      "models": lines("models").map((line) => {
        const at = line.indexOf("=");
        return at < 0 ? {name: line} : {name: line.slice(0, at).trim(), alias: line.slice(at + 1).trim()};
      }),
      "force-upstream-stream": f.namedItem("form-force-upstream-stream").checked,
      "disabled": f.namedItem("form-disabled").checked,
    };
  }

  function changedFields(value, original) {
    const out = {};
    const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);
    const originalKeys = original["api-key-entries"].map((e) => ({"api-key": e["api-key"]}));
    const originalModels = original.models.map((m) => (m.alias ? {name: m.name, alias: m.alias} : {name: m.name}));
    for (const [key, now] of Object.entries(value)) {
      const before = key === "api-key-entries" ? originalKeys : key === "models" ? originalModels : original[key];
      if (!same(now, before)) out[key] = now;
    }
    if (out["api-key-entries"]) {
      // keep each key's proxy-url where the key itself is kept (sent back redacted)
      out["api-key-entries"] = out["api-key-entries"].map((e) => {
        const old = original["api-key-entries"].find((o) => o["api-key"] === e["api-key"]);
        return old && old["proxy-url"] ? {...e, "proxy-url": old["proxy-url"]} : e;
      });
    }
    return out;
  }

  async function saveProvider(event) {
    event.preventDefault();
    clearProblems();
    const value = readForm();
    let response;
    let index;
    if (editing) {
      const change = changedFields(value, editing.original);
      if (!Object.keys(change).length) {
        $("#provider-form").hidden = true;
        return;
      }
      index = editing.index;
      response = await api("/openai-compatibility", {method: "PATCH", body: {name: editing.original.name, value: change}});
    } else {
      for (const key of ["prefix", "request-retry", "force-upstream-stream", "disabled"]) {
        if (value[key] === "" || value[key] === -1 || value[key] === false) delete value[key];
      }
      index = providerList.length;
      response = await api("/openai-compatibility", {method: "POST", body: {value}});
    }
    if (response.status === 400 && response.data && response.data.error && response.data.error.problems) {
      showProblems(response.data.error.problems, index);
      return;
    }
    if (!response.ok) {
      showProblem("_form", message(response.data, "HTTP " + response.status));
      return;
    }
    $("#provider-form").hidden = true;
    notice((editing ? "Saved provider " : "Added provider ") + value.name + ".", "ok");
    editing = null;
    await loadProviders();
  }

  // The validator names each problem by key path: "openai-compatibility[2].base-url: must be ...".
  function showProblems(problems, index) {
    const pattern = /^openai-compatibility\[(\d+)\]\.([a-z-]+)(\S*): (.*)$/;
    for (const problem of problems) {
      const match = pattern.exec(problem);
      if (match && Number(match[1]) === index && $(`.problem[data-for="${match[2]}"]`)) {
        showProblem(match[2], (match[3] ? match[2] + match[3] + ": " : "") + match[4]);
      } else {
        showProblem("_form", problem);
      }
    }
  }

  function showProblem(field, text) {
    const box = $(`#provider-form .problem[data-for="${field}"]`);
    box.append(el("span", {}, text));
    box.classList.add("shown");
    const input = $("#provider-form").elements.namedItem(field);
    if (input && input.setAttribute) input.setAttribute("aria-invalid", "true");
  }

  function clearProblems() {
    for (const box of $$("#provider-form .problem")) {
      box.replaceChildren();
      box.classList.remove("shown");
    }
    for (const input of $$("#provider-form [aria-invalid]")) input.removeAttribute("aria-invalid");
  }

  async function loadTraffic() {
    const response = await api("/traffic");
    if (!response.ok) return failed(response);
    const blocks = response.data.windows.map((w) => {
      const title = w.seconds === 300 ? "Last 5 minutes" : w.seconds === 3600 ? "Last hour" : "Last " + w.seconds + " s";
      const cover = w.complete ? "" : " (the files kept cover only since " + time(response.data["complete-since"]) + ")";
      const rows = [...w.rows, {provider: "all", model: "", ...w.total}];
      return el("div", {class: "traffic-window", "data-window": w.seconds},
        el("h3", {}, title + cover),
        el("p", {class: "hint"}, "workers that served: " + (w.workers.join(", ") || "none")),
        el("table", {}, el("thead", {}, el("tr", {}, ...["provider", "model", "requests", "errors", "p50 ms",
          "p95 ms", "folds"].map((h) => el("th", {}, h)))),
        el("tbody", {}, ...rows.map((r) => el("tr", {class: r.provider === "all" ? "total" : "",
          "data-provider": r.provider === "all" ? null : r.provider, "data-model": r.model},
        el("td", {}, r.provider === "-" ? "(no upstream)" : r.provider), el("td", {}, r.model),
        el("td", {class: "requests"}, r.requests),
        el("td", {}, r.errors), el("td", {}, number(r["p50-ms"])), el("td", {}, number(r["p95-ms"])),
        el("td", {}, r.folds))))));
    });
    $("#traffic").replaceChildren(...blocks);
  }

  async function loadRecent() {
    const form = $("#recent-filter").elements;
    const params = new URLSearchParams();
    for (const name of ["status", "provider", "client"]) {
      const value = form.namedItem(name).value.trim();
      if (value) params.set(name, value);
    }
    const box = $('#recent-filter .problem[data-for="recent-filter"]');
    box.textContent = "";
    const response = await api("/recent" + (params.toString() ? "?" + params : ""));
    if (response.status === 400) {
      box.textContent = message(response.data, "bad filter");
      return;
    }
    if (!response.ok) return failed(response);
    const d = response.data;
    $("#recent-summary").textContent = d.records.length + " shown of " + d.matching + " matching, from workers " +
      (d.workers.join(", ") || "-");
    $("#recent tbody").replaceChildren(...d.records.map((r) => el("tr", {"data-status": r.status},
      el("td", {}, time(r.t)), el("td", {}, r.worker), el("td", {}, r.route), el("td", {}, r.model),
      el("td", {}, r.provider), el("td", {class: r.status >= 400 ? "error" : ""}, r.status), el("td", {}, number(r.ms)),
      el("td", {}, r.folded ? "yes" : ""), el("td", {}, r.client), el("td", {}, r.result), el("td", {}, el("code", {}, r.id)))));
  }

  let usageStore = null;  // whether /v0/management/usage exists (asked once, from the overview)

  async function loadUsage() {
    if (usageStore === null) {
      const o = await api("/overview");
      usageStore = Boolean(o.ok && o.data["usage-store"]);
    }
    if (usageStore) {
      const today = new Date().toISOString().slice(0, 10);
      const response = await api("/usage?group-by=client&from=" + today + "&to=" + today);
      if (response.ok) {
        $("#usage-source").textContent = "From the usage store, today (" + today + ", UTC).";
        $("#usage").replaceChildren(genericTable(response.data));
        return;
      }
    }
    const response = await api("/client-usage");
    if (!response.ok) return failed(response);
    $("#usage-source").textContent = "From the metrics: tokens since the workers started, requests in the last hour " +
      "(the usage store is not installed).";
    $("#usage").replaceChildren(genericTable(response.data.clients));
  }

  // The usage store's answer drawn without knowing its exact shape: the first list of objects in it.
  function genericTable(data) {
    let rows = Array.isArray(data) ? data : null;
    if (!rows && data && typeof data === "object") {
      rows = Object.values(data).find((v) => Array.isArray(v) && v.every((x) => x && typeof x === "object")) || null;
    }
    if (!rows || !rows.length) return el("p", {class: "hint"}, "No usage recorded yet.");
    const columns = [...new Set(rows.flatMap((r) => Object.keys(r)))];
    const cell = (v) => (v !== null && typeof v === "object" ? JSON.stringify(v) : number(v));
    return el("table", {id: "usage-table"}, el("thead", {}, el("tr", {}, ...columns.map((c) => el("th", {}, c)))),
      el("tbody", {}, ...rows.map((r) => el("tr", {}, ...columns.map((c) => el("td", {}, cell(r[c])))))));
  }

  async function loadConfig() {
    const response = await api("/config");
    if (!response.ok) return failed(response);
    $("#config").textContent = JSON.stringify(response.data, null, 2);
  }

  async function download(path, filename, type) {
    const response = await api(path);
    if (!response.ok) return failed(response);
    const text = path === "/config" ? JSON.stringify(response.data, null, 2) + "\n" : response.text;
    const link = el("a", {href: URL.createObjectURL(new Blob([text], {type})), download: filename});
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 1000);
  }

  function guarded(handler) {
    return (event) => handler(event).catch((error) => {
      if (!(error instanceof SignedOut)) notice(error.message, "error");
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("#sign-in-form").addEventListener("submit", guarded(signIn));
    $("#sign-out").addEventListener("click", signOut);
    for (const button of $$("#nav button")) button.addEventListener("click", () => show(button.dataset.panel));
    for (const button of $$(".refresh")) button.addEventListener("click", () => refresh());
    $("#add-provider").addEventListener("click", () => openForm(null));
    $("#provider-cancel").addEventListener("click", () => { $("#provider-form").hidden = true; });
    $("#provider-form").addEventListener("submit", guarded(saveProvider));
    $("#recent-filter").addEventListener("submit", (event) => { event.preventDefault(); refresh(); });
    $("#download-json").addEventListener("click", guarded(() => download("/config", "streamfold-config.json", "application/json")));
    $("#download-yaml").addEventListener("click", guarded(() => download("/config.yaml", "settings.yaml", "application/yaml")));
    if (sessionStorage.getItem(SECRET)) signedIn();
    else showSignIn("");
  });
})();
