// Shared by the operator page's modules: DOM building (text only), formatting, notices, the management API.
//
// Every value from the server reaches the DOM as text (el(): text nodes), never parsed as HTML; the page's
// Content-Security-Policy allows no inline script or style. The secret lives in sessionStorage (this tab
// only) and goes out only as a Bearer header to /v0/management on this origin; any 401 forgets it and
// tells the page (a "signed-out" event) to show the sign-in form.

export const SECRET = "streamfold.secret";
export const API = "/v0/management";
export const $ = (selector, root = document) => root.querySelector(selector);
export const $$ = (selector, root = document) => Array.from(root.querySelectorAll(selector));

export class SignedOut extends Error {}

// One element: el("td", {class: "x"}, "text", child). Strings become text nodes.
export function el(tag, attrs = {}, ...children) {
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

export const time = (epoch) => (epoch ? new Date(epoch * 1000).toLocaleTimeString([], {hour12: false}) : "-");
export const dateTime = (epoch) => (epoch ? new Date(epoch * 1000).toLocaleString([], {hour12: false}) : "-");
export const duration = (seconds) => {
  const s = Math.floor(seconds);
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  return (d ? d + "d " : "") + (d || h ? h + "h " : "") + m + "m " + (s % 60) + "s";
};
export const number = (value) => (value === null || value === undefined ? "-" : String(value));

export function notice(text, kind = "info") {
  const box = $("#notice");
  box.textContent = text;
  box.className = "notice " + kind;
  box.hidden = !text;
}

// ---- the management API --------------------------------------------------------------
export async function api(path, {method = "GET", body} = {}) {
  const secret = sessionStorage.getItem(SECRET);
  if (!secret) {
    signedOut("");
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
    signedOut(message(data, "The management secret was not accepted; sign in again."));
    throw new SignedOut();
  }
  return {status: response.status, ok: response.ok, data, text, headers: response.headers};
}

export function message(data, fallback) {
  return data && data.error && typeof data.error.message === "string" ? data.error.message : fallback;
}

export function forget() {
  sessionStorage.removeItem(SECRET);
}


// The page (manage.js) shows the sign-in form when this fires.
function signedOut(reason) {
  document.dispatchEvent(new CustomEvent("signed-out", {detail: reason}));
}

export function failed(response) {
  notice(message(response.data, "HTTP " + response.status), "error");
}
