/* quota-gw pages: what both dashboards share. The credential (an API key, a signed link's token
   or the admin token) lives in this tab's sessionStorage only and travels as a bearer header; it
   is never put in a URL the server sees. Data is written with textContent, never as HTML. */
"use strict";

const QGW = (() => {
  const nf = new Intl.NumberFormat("en-US");
  const nf1 = new Intl.NumberFormat("en-US", { maximumFractionDigits: 1 });

  class ApiError extends Error {
    constructor(status, body) {
      super((body && (body.detail || body.title)) || `HTTP ${status}`);
      this.status = status;
      this.body = body;
    }
  }

  function store(name) {
    return {
      get: () => sessionStorage.getItem(name),
      set: (v) => sessionStorage.setItem(name, v),
      clear: () => sessionStorage.removeItem(name),
    };
  }

  async function api(credential, path, options = {}) {
    const headers = { Accept: "application/json", Authorization: `Bearer ${credential}` };
    if (options.body !== undefined) headers["Content-Type"] = "application/json";
    const r = await fetch(path, {
      method: options.method || "GET",
      headers,
      body: options.body === undefined ? undefined : JSON.stringify(options.body),
      cache: "no-store",
      credentials: "omit",
      referrerPolicy: "no-referrer",
    });
    let body = null;
    try { body = await r.json(); } catch (_) { body = null; }
    if (!r.ok) throw new ApiError(r.status, body);
    return body;
  }

  /* Runs every read; a failed one is reported in its own place and does not hide the others. */
  async function settle(entries) {
    const names = Object.keys(entries);
    const results = await Promise.allSettled(names.map((n) => entries[n]));
    const out = {};
    names.forEach((n, i) => {
      out[n] = results[i].status === "fulfilled" ? { ok: true, value: results[i].value }
                                                   : { ok: false, error: results[i].reason };
    });
    return out;
  }

  function el(tag, attrs = {}, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("data-") || k.startsWith("aria-") || k === "role" || k === "title" || k === "colspan") e.setAttribute(k, v);
      else e[k] = v;
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }

  const fmt = (n) => (n === null || n === undefined ? "—" : nf.format(n));
  const fmt1 = (n) => (n === null || n === undefined ? "—" : nf1.format(n));

  function date(iso) {
    if (!iso) return "—";
    return new Date(iso).toLocaleDateString("en-US", { month: "short", day: "numeric", year: "numeric" });
  }

  function time(iso) {
    return new Date(iso).toLocaleString("en-US", { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  function ago(iso) {
    const s = Math.round((Date.now() - new Date(iso).getTime()) / 1000);
    if (s < 45) return "just now";
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    if (s < 86400) return `${Math.round(s / 3600)} h ago`;
    return `${Math.round(s / 86400)} d ago`;
  }

  function daysUntil(iso) {
    return Math.max(0, Math.ceil((new Date(iso).getTime() - Date.now()) / 86400000));
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
    if (seconds < 90) return `${fmt1(seconds)} s`;
    if (seconds < 5400) return `${fmt1(seconds / 60)} min`;
    return `${fmt1(seconds / 3600)} h`;
  }

  /* Chart.js colours that follow the page's light or dark theme. */
  function palette() {
    const css = getComputedStyle(document.documentElement);
    const v = (name) => css.getPropertyValue(name).trim();
    return {
      text: v("--muted"), grid: v("--line"), ok: v("--ok"), warn: v("--warn"), crit: v("--crit"),
      accent: v("--accent"), purchased: v("--purchased"),
      series: [v("--accent"), "#06b6d4", "#f59e0b", "#10b981", "#ec4899", "#8b5cf6", "#64748b", "#ef4444"],
    };
  }

  function chartDefaults() {
    if (!window.Chart) return;
    const p = palette();
    Chart.defaults.color = p.text;
    Chart.defaults.borderColor = p.grid;
    Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
    Chart.defaults.animation = false; // the pages refresh in place; no replayed animation
  }

  /* One chart per canvas, updated in place on refresh. */
  function chart(canvas, config) {
    const existing = Chart.getChart(canvas);
    if (existing) {
      existing.data = config.data;
      existing.options = config.options;
      existing.update();
      return existing;
    }
    return new Chart(canvas, config);
  }

  function stamp(node) {
    node.textContent = `updated ${new Date().toLocaleTimeString("en-US")}`;
  }

  return { ApiError, store, api, settle, el, clear, fmt, fmt1, date, time, ago, daysUntil, duration, palette, chartDefaults, chart, stamp };
})();
