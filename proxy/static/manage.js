// streamfold operator page: signs in with the management secret and draws each panel from /v0/management.
// Shared helpers (text-only DOM, the API call) are in dom.js; the providers panel is in providers.js.
import {$, $$, API, SECRET, SignedOut, api, dateTime, duration, el, failed, forget, message, notice, number, time}
  from "./dom.js";
import {loadProviders, openForm, saveProvider} from "./providers.js";

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
    ["instances", o.redis.state === "off" ? "this one (instances share state only through Redis)"
      : o.instances === null ? "unknown (Redis cannot be asked)"
        : o.instances.map((i) => i.id + (i.this ? " (this one)" : "") + ", seen " + time(i.seen) +
          ", providers version " + i["providers-version"]).join("; ")],
  ];
  $("#overview").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k),
    el("dd", {class: k === "reload error" && o["reload-error"] ? "error" : ""}, v)]));
  $("#workers tbody").replaceChildren(...o.workers.map((w) => el("tr", {},
    el("td", {}, w.pid), el("td", {}, dateTime(w.started)), el("td", {}, w.alive ? "yes" : "no"),
    el("td", {}, w.this ? "yes" : ""))));
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

async function loadUsage() {
  const today = new Date().toISOString().slice(0, 10);
  const stored = await api("/usage?group-by=client&from=" + today + "&to=" + today);
  if (stored.ok) {
    $("#usage-source").textContent = "From the usage store, today (" + today + ", UTC).";
    $("#usage").replaceChildren(genericTable(stored.data));
    return;
  }
  // the store did not answer (down, or its file unreadable): what the metrics know still helps
  const response = await api("/client-usage");
  if (!response.ok) return failed(response);
  $("#usage-source").textContent = "From the metrics: tokens since the workers started, requests in the last hour " +
    "(the usage store did not answer: " + message(stored.data, "HTTP " + stored.status) + ").";
  $("#usage").replaceChildren(genericTable(response.data.clients));
}

// The usage store's answer drawn without knowing its exact shape: the first list of objects in it.
function genericTable(data) {
  // the usage store answers {"object": "usage", ..., "data": [rows], "total": {...}}
  let rows = Array.isArray(data) ? data : data && Array.isArray(data.data) ? data.data : null;
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

document.addEventListener("signed-out", (event) => showSignIn(event.detail));

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
