// The operator page's providers panel: the list with live key state, toggles, test connection, and the
// add / edit form that shows the validator's messages next to each field.
import {$, $$, api, el, failed, message, notice, SignedOut, time} from "./dom.js";

// Providers: the list as the API shows it (keys redacted) plus each key's live state.
let providerList = [];

export async function loadProviders() {
  const [list, keys, fleet] = await Promise.all([api("/openai-compatibility"), api("/keys"), api("/fleet")]);
  if (!list.ok) return failed(list);
  if (!keys.ok) return failed(keys);
  if (!fleet.ok) return failed(fleet);
  providerList = list.data["openai-compatibility"];
  const state = keys.data.providers;
  const replicas = fleet.data.providers;
  $("#providers tbody").replaceChildren(...providerList.map((p) => providerRow(p, state[p.name], replicas[p.name])));
  $("#replica-sets tbody").replaceChildren(...fleet.data.sets.map(setRow));
  $("#replica-sets-none").hidden = fleet.data.sets.length > 0;
}

// Each replica of a provider (its base-urls, or its one base URL) with the requests in flight to it now.
function replicaList(p, fleet) {
  if (!fleet) return el("div", {}, p["base-url"]);
  const list = el("ul", {class: "plain replicas"});
  for (const r of fleet.replicas) {
    const busy = r["in-flight"] + r["other-instances"];
    const notes = [busy + " in flight"];
    if (r["other-instances"]) notes.push(r["other-instances"] + " of them at other instances");
    if (r["backoff-until"]) notes.push("connect back-off until " + time(r["backoff-until"]));
    if (r["keys-cooling"]) notes.push(r["keys-cooling"] + " key(s) cooling");
    const several = fleet.replicas.length > 1;
    list.append(el("li", {"data-replica": r.replica, class: r.disabled ? "replica-off" : ""},
      several ? el("code", {}, r.replica) : null, several ? " " : null,
      r.url, el("span", {class: "hint"}, " · " + (r.disabled ? "disabled" : notes.join(" · "))),
      several ? " " : null, several ? replicaSwitch(r) : null));
  }
  if (fleet.balance) list.append(el("li", {class: "hint"}, "balance: " + fleet.balance));
  return list;
}

// One replica of base-urls taken out of its set (or put back): its sessions move to the next best replica.
function replicaSwitch(r) {
  const box = el("input", {type: "checkbox", name: "replica-disabled", checked: Boolean(r.disabled),
                           "aria-label": "disabled " + r.replica});
  box.addEventListener("change", async () => {
    box.disabled = true;
    try {
      const response = await api("/fleet/replica", {method: "PATCH", body: {replica: r.replica, disabled: box.checked}});
      if (!response.ok) {
        box.checked = !box.checked;
        return failed(response);
      }
      notice(r.replica + " is now " + (box.checked ? "disabled" : "enabled") + " (every worker within about a second).", "ok");
      await loadProviders();
    } catch (error) {
      if (!(error instanceof SignedOut)) notice("Could not save: " + error.message, "error");
    } finally {
      box.disabled = false;
    }
  });
  return el("label", {class: "hint"}, box, " disabled");
}

// A name that reaches several replicas: its policy and why the balancer chose as it did (whole instance).
function setRow(s) {
  const reasons = Object.entries(s.decisions).map(([reason, count]) => reason + " " + count).join(", ");
  return el("tr", {"data-set": s.name}, el("td", {}, el("code", {}, s.name)), el("td", {}, s.policy),
    el("td", {}, s.replicas.join(", ")), el("td", {}, reasons || "none yet"));
}

function providerRow(p, live, fleet) {
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
    el("td", {}, replicaList(p, fleet)), el("td", {}, models), el("td", {}, keys),
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

export function openForm(p) {
  const form = $("#provider-form");
  clearProblems();
  form.reset();
  editing = p ? {index: providerList.indexOf(p), original: p} : null;
  $("#provider-form-title").textContent = p ? "Edit provider " + p.name : "Add provider";
  const f = form.elements;
  f.namedItem("name").value = p ? p.name : "";
  f.namedItem("base-url").value = p ? p["base-url"] || "" : "";  // a provider with base-urls has none
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
    if (key === "base-url" && !now && original["base-urls"]) continue;  // replicas: the form leaves them be
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

export async function saveProvider(event) {
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
