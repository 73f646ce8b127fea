/* The ops dashboard (GET /ops), for the admin token. Reads GET /v1/admin/worker (live, Redis),
   /v1/admin/activity (per minute by outcome), /v1/admin/top, /v1/admin/orgs?low=true and
   /v1/admin/burn. Every figure shown is one of theirs. */
"use strict";

(() => {
  const cred = QGW.store("qgw.ops.token");
  const $ = (id) => document.getElementById(id);
  const REFRESH_MS = 15000;
  const OUTCOME_LABEL = { ok: "ok", 402: "402 exhausted", 403: "403 forbidden", 429: "429 rate limited" };
  let timer = null;

  function showLogin(message) {
    clearInterval(timer);
    $("app").hidden = true;
    for (const id of ["prefix", "signout", "refresh"]) $(id).hidden = true;
    $("updated").textContent = "";
    $("login").hidden = false;
    $("login-error").hidden = !message;
    $("login-error").textContent = message || "";
    $("token").value = "";
    $("token").focus();
  }

  function kpi(id, value, sub, tone) {
    const box = $(id);
    box.classList.remove("good", "warn", "bad");
    if (tone) box.classList.add(tone);
    box.querySelector(".value").textContent = value;
    box.querySelector(".sub").textContent = sub || "";
  }

  function renderWorker(w) {
    $("prefix").hidden = false;
    $("prefix").textContent = `prefix ${w.prefix} · ${w.shards} shards`;
    const t = w.totals;
    const age = t.oldest_unacked_age_s;
    kpi("kpi-lag", QGW.fmt(t.unacked), `events not yet in Postgres · oldest ${QGW.duration(age)}`,
        age === null ? "good" : age < 10 ? "good" : age < 60 ? "warn" : "bad");
    kpi("kpi-dead", QGW.fmt(t.dead_letters), "events the worker set aside", t.dead_letters ? "bad" : "good");
    const consumers = t.consumers.length;
    const idle = Math.min(...w.streams.flatMap((s) => s.consumers.map((c) => c.idle_s)), Infinity);
    let health = "healthy", tone = "good";
    if (!consumers) { health = "no worker"; tone = t.unacked ? "bad" : "warn"; }
    else if (age !== null && age >= 60) { health = "behind"; tone = "bad"; }
    else if (age !== null && age >= 10) { health = "lagging"; tone = "warn"; }
    kpi("kpi-worker", health, consumers ? `${consumers} consumer${consumers === 1 ? "" : "s"} · last seen ${QGW.duration(idle === Infinity ? null : idle)} ago` : "no consumer has joined the group", tone);

    const body = QGW.clear($("streams").tBodies[0]);
    const busy = w.streams.filter((s) => s.length || s.dead_letters || s.unacked);
    $("streams-note").textContent = `${busy.length} of ${w.streams.length} streams hold entries · group ${w.group}`;
    for (const s of busy) {
      body.append(QGW.el("tr", { "data-stream": s.stream },
        QGW.el("td", { class: "mono", text: s.stream }),
        QGW.el("td", { class: "num", text: QGW.fmt(s.length) }),
        QGW.el("td", { class: "num", text: QGW.fmt(s.undelivered) }),
        QGW.el("td", { class: "num", text: QGW.fmt(s.pending) }),
        QGW.el("td", { text: QGW.duration(s.oldest_unacked_age_s) }),
        QGW.el("td", { class: "num", text: QGW.fmt(s.dead_letters) }),
        QGW.el("td", { class: "muted", text: s.consumers.map((c) => c.name).join(", ") || "—" })));
    }
  }

  function renderActivity(a) {
    const sum = (o) => Object.values(o).reduce((x, y) => x + y, 0);
    const decisions = sum(a.totals.decisions);
    const refused = decisions - (a.totals.decisions.ok || 0);
    kpi("kpi-decisions", QGW.fmt(decisions), `${QGW.fmt(a.totals.decisions.ok)} allowed`);
    kpi("kpi-refused", QGW.fmt(refused),
        ["402", "403", "429"].map((o) => `${o}: ${QGW.fmt(a.totals.decisions[o])}`).join(" · "),
        refused ? (refused * 10 > decisions ? "bad" : "warn") : "good");
    kpi("kpi-tokens", QGW.fmt(a.totals.tokens.ok), `${QGW.fmt(a.totals.refunded)} refunded`);

    const p = QGW.palette();
    const color = { ok: p.ok, 402: p.warn, 403: p.purchased, 429: p.crit };
    const labels = a.by_minute.map((m) => new Date(m.minute).toLocaleTimeString("en-US", { hour: "2-digit", minute: "2-digit" }));
    const series = (field) => a.outcomes.map((o) => ({
      label: OUTCOME_LABEL[o] || o, data: a.by_minute.map((m) => m[field][o] || 0),
      backgroundColor: color[o], borderRadius: 2, stack: field, maxBarThickness: 14,
    }));
    const options = {
      responsive: true, maintainAspectRatio: false, interaction: { mode: "index", intersect: false },
      plugins: { legend: { position: "bottom", labels: { boxWidth: 10, boxHeight: 10 } } },
      scales: { x: { stacked: true, grid: { display: false }, ticks: { maxTicksLimit: 6, maxRotation: 0 } },
                y: { stacked: true, beginAtZero: true, ticks: { precision: 0 } } },
    };
    QGW.chart($("decisions-chart"), { type: "bar", data: { labels, datasets: series("decisions") }, options });
    QGW.chart($("tokens-chart"), { type: "bar", data: { labels, datasets: series("tokens") }, options });
  }

  function orgCell(id, name, withName) {
    const show = withName && name && name !== id;
    return QGW.el("td", { title: name || undefined }, QGW.el("strong", { text: id }), show ? QGW.el("span", { class: "muted", text: ` ${name}` }) : null);
  }

  function renderTop(t) {
    const body = QGW.clear($("top").tBodies[0]);
    for (const o of t.orgs) {
      body.append(QGW.el("tr", { "data-org": o.org_id },
        QGW.el("td", { class: "muted num", text: String(o.rank) }), orgCell(o.org_id, o.name, true),
        QGW.el("td", { text: o.plan || "—" }),
        QGW.el("td", { class: "num", "data-field": "tokens", text: QGW.fmt(o.tokens) }),
        QGW.el("td", { class: "num", text: QGW.fmt(o.calls) })));
    }
    $("top-empty").hidden = t.orgs.length > 0;
  }

  function renderLow(l) {
    const body = QGW.clear($("low").tBodies[0]);
    let rows = 0;
    for (const o of l.orgs) {
      for (const [meter, m] of Object.entries(o.meters || {})) {
        if (!m.low) continue;
        rows += 1;
        const tr = QGW.el("tr", { "data-org": o.org_id, "data-meter": meter },
          orgCell(o.org_id, o.name), QGW.el("td", { text: meter }),
          QGW.el("td", { class: "num", text: QGW.fmt(m.balance) }), QGW.el("td", { class: "num muted", text: QGW.fmt(m.limit) }));
        if (m.balance <= 0) tr.querySelector("td:nth-child(3)").classList.add("alert");
        body.append(tr);
      }
    }
    $("low-note").textContent = l.next_cursor ? "first page of orgs scanned" : "below the low-balance threshold";
    $("low-empty").hidden = rows > 0;
  }

  function renderBurn(b) {
    const body = QGW.clear($("burn").tBodies[0]);
    for (const o of b.orgs) {
      const runs = o.unlimited ? "never (unlimited)" : o.projected_exhaustion ? QGW.date(o.projected_exhaustion) : "—";
      body.append(QGW.el("tr", { "data-org": o.org_id, "data-meter": o.meter },
        orgCell(o.org_id, o.name), QGW.el("td", { text: o.meter }),
        QGW.el("td", { class: "num", text: QGW.fmt1(o.burn_per_day) }),
        QGW.el("td", { class: "num", text: o.unlimited ? "∞" : QGW.fmt(o.balance) }),
        QGW.el("td", { class: o.exhausts_before_reset ? "alert" : "" }, runs, o.exhausts_before_reset ? " · before the refill" : ""),
        QGW.el("td", { class: "muted", text: QGW.date(o.period_end) })));
    }
    $("burn-empty").hidden = b.orgs.length > 0;
  }

  async function load() {
    const token = cred.get();
    if (!token) return showLogin();
    let worker;
    try {
      worker = await QGW.api(token, "/v1/admin/worker"); // first alone: a refused token makes one request
    } catch (err) {
      if (err.status === 401 || err.status === 403) {
        cred.clear();
        return showLogin(err.status === 403 ? "The admin API is disabled on this gateway (QUOTA_GW_ADMIN_TOKEN is unset)."
                                            : "That admin token was not accepted.");
      }
      $("load-error").hidden = false;
      $("load-error").textContent = `Could not load: ${err.message}`;
      return;
    }
    $("login").hidden = true;
    $("app").hidden = false;
    $("signout").hidden = false;
    $("refresh").hidden = false;
    renderWorker(worker);
    const r = await QGW.settle({
      activity: QGW.api(token, "/v1/admin/activity?minutes=60"),
      top: QGW.api(token, "/v1/admin/top?days=30&limit=10"),
      low: QGW.api(token, "/v1/admin/orgs?low=true&limit=50"),
      burn: QGW.api(token, "/v1/admin/burn?days=7&limit=15"),
    });
    const problems = Object.entries(r).filter(([, v]) => !v.ok).map(([k, v]) => `${k}: ${v.error.message}`);
    $("load-error").hidden = problems.length === 0;
    $("load-error").textContent = problems.length ? `Some data could not be loaded — ${problems.join("; ")}` : "";
    if (r.activity.ok) renderActivity(r.activity.value);
    if (r.top.ok) renderTop(r.top.value);
    if (r.low.ok) renderLow(r.low.value);
    if (r.burn.ok) renderBurn(r.burn.value);
    QGW.stamp($("updated"));
    document.body.dataset.loaded = "true";
  }

  function schedule() {
    clearInterval(timer);
    if (!cred.get()) return;
    timer = setInterval(() => { if (!document.hidden && cred.get()) load(); }, REFRESH_MS);
  }

  QGW.chartDefaults();
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const token = $("token").value.trim();
    if (!token) return;
    cred.set(token);
    load().then(schedule);
  });
  $("signout").addEventListener("click", () => { cred.clear(); showLogin(); });
  $("refresh").addEventListener("click", () => load());
  load().then(schedule);
})();
