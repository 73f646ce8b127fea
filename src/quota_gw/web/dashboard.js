/* The token dashboard (GET /dashboard). Reads GET /v1/balance, /v1/pricing, /v1/analytics and
   /v1/usage with the tab's credential: an API key typed in, or a signed read-only link's token
   taken from the URL fragment (#t=...), which the server never sees. The thresholds at which a
   bar turns amber and red come from /v1/pricing (balance_thresholds), the same rule as the API's
   `low` flag: balance * 100 < limit * threshold. */
"use strict";

(() => {
  const cred = QGW.store("qgw.dashboard.credential");
  const $ = (id) => document.getElementById(id);
  const REFRESH_MS = 20000;
  let timer = null;

  /* A signed link: keep its token for this tab, then drop it from the address bar. */
  function takeLinkFromFragment() {
    const m = location.hash.match(/[#&]t=([^&]+)/);
    if (!m) return;
    cred.set(decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }

  const isLink = (c) => typeof c === "string" && c.startsWith("qgwl_");

  function showLogin(message) {
    clearInterval(timer);
    $("app").hidden = true;
    for (const id of ["org", "plan", "readonly", "signout", "refresh"]) $(id).hidden = true;
    $("updated").textContent = "";
    $("login").hidden = false;
    $("login-error").hidden = !message;
    $("login-error").textContent = message || "";
    $("key").value = "";
    $("key").focus();
  }

  function showApp(balance, credential) {
    $("login").hidden = true;
    $("app").hidden = false;
    $("org").hidden = false;
    $("org").textContent = balance.org_id;
    $("plan").hidden = false;
    $("plan").textContent = `${balance.plan} plan`;
    $("readonly").hidden = !isLink(credential);
    $("signout").hidden = false;
    $("refresh").hidden = false;
  }

  function state(m, t) {
    if (m.unlimited) return "unlimited";
    if (!m.available) return "unavailable";
    if (!m.limit) return m.balance > 0 ? "ok" : "crit"; // purchased credit only
    if (m.balance * 100 < m.limit * t.critical_percent) return "crit";
    if (m.balance * 100 < m.limit * t.warn_percent) return "warn";
    return "ok";
  }

  const BADGE = { ok: "Healthy", warn: "Low", crit: "Critical", unlimited: "Unlimited", unavailable: "Not in plan" };

  function stat(label, field, value, extra) {
    return QGW.el("div", {},
      QGW.el("dt", { text: label }),
      QGW.el("dd", { "data-field": field, "data-value": value === null ? "" : String(value) }, QGW.fmt(value), extra || null));
  }

  function meterCard(name, m, burn, t) {
    const s = state(m, t);
    const card = QGW.el("article", { class: "card meter", "data-meter": name, "data-state": s });
    const badge = s === "crit" && m.balance <= 0 && m.available ? "Empty" : BADGE[s];
    card.append(QGW.el("header", {}, QGW.el("h3", { text: name.replace(/_/g, " ") }), QGW.el("span", { class: "badge", text: badge })));

    if (s === "unavailable") {
      card.append(QGW.el("div", { class: "muted" }, "Not included in your plan. Buy credit or change plans to use it."));
      return card;
    }
    if (m.unlimited) {
      card.append(QGW.el("div", { class: "big" }, "Unlimited"));
      card.append(QGW.el("dl", { class: "stats" }, stat("Used this period", "used", m.used)));
    } else {
      const pct = m.limit ? Math.max(0, Math.round((m.balance * 1000) / m.limit) / 10) : null;
      card.append(QGW.el("div", { class: "big num" },
        QGW.el("span", { "data-field": "balance", "data-value": String(m.balance) }, QGW.fmt(m.balance)),
        QGW.el("span", { class: "unit", text: "tokens left" })));
      const cap = Math.max(m.limit || 0, m.allocated + m.purchased, 1);
      const purchasedShown = Math.min(m.purchased, Math.max(m.balance, 0));
      const allocShown = Math.max(0, m.balance - purchasedShown);
      const cls = s === "crit" ? "bar crit" : s === "warn" ? "bar warn" : "bar";
      const bar = QGW.el("div", { class: cls, role: "meter", "aria-label": `${name} balance`,
                                  "aria-valuemin": "0", "aria-valuemax": String(cap), "aria-valuenow": String(Math.max(0, m.balance)) });
      const a = QGW.el("span", { class: "fill alloc" });
      const p = QGW.el("span", { class: "fill purchased" });
      a.style.width = `${(allocShown * 100) / cap}%`;
      p.style.width = `${(purchasedShown * 100) / cap}%`;
      bar.append(a, p);
      for (const level of [t.warn_percent, t.critical_percent]) { // where amber and red begin
        if (!m.limit) continue;
        const mark = QGW.el("span", { class: "mark", title: `${level}%` });
        mark.style.left = `${(m.limit * level) / cap}%`;
        bar.append(mark);
      }
      card.append(bar);
      const parts = [];
      if (m.limit) parts.push(`${QGW.fmt1(pct)}% of the ${QGW.fmt(m.limit)}-token allocation`);
      if (m.purchased) parts.push(`incl. ${QGW.fmt(m.purchased)} purchased`);
      if (parts.length) card.append(QGW.el("div", { class: "pct num" }, parts.join(" · ")));
      card.append(QGW.el("dl", { class: "stats" },
        stat("Used this period", "used", m.used),
        stat("Allocated", "allocated", m.allocated, null),
        stat("Purchased", "purchased", m.purchased),
        stat("On hold", "held", m.held)));
    }

    const foot = QGW.el("div", { class: "foot" });
    const days = QGW.daysUntil(m.period_end);
    foot.append(QGW.el("div", {}, "Refills in ", QGW.el("strong", { "data-field": "refill-days", text: `${days} day${days === 1 ? "" : "s"}` }),
      ` · ${QGW.date(m.period_end)}`));
    if (burn && burn.burn_per_day > 0) {
      const runs = burn.projected_exhaustion;
      foot.append(QGW.el("div", {}, `Burning ≈ ${QGW.fmt1(burn.burn_per_day)} tokens/day`,
        runs ? QGW.el("span", { class: burn.exhausts_before_reset ? "alert" : "" }, ` · runs out ${QGW.date(runs)}`) : null));
    }
    card.append(foot);
    return card;
  }

  function renderMeters(balance, analytics, t) {
    const box = QGW.clear($("meters"));
    const burns = (analytics && analytics.meters) || {};
    const order = (m) => (m.available ? 0 : 1); // what the plan includes first, the rest after
    const meters = Object.entries(balance.meters).sort((a, b) => order(a[1]) - order(b[1]));
    for (const [name, m] of meters) box.append(meterCard(name, m, burns[name], t));
  }

  function renderUsage(result) {
    const canvas = $("usage-chart");
    const none = $("usage-unavailable");
    if (!result.ok) {
      canvas.parentElement.hidden = true;
      none.hidden = false;
      none.textContent = `Usage is unavailable right now (${result.error.message}).`;
      $("usage-totals").textContent = "";
      return;
    }
    const a = result.value;
    canvas.parentElement.hidden = false;
    none.hidden = true;
    $("usage-totals").textContent = `${QGW.fmt(a.totals.tokens)} tokens · ${QGW.fmt(a.totals.calls)} calls`;
    const names = a.by_feature.map((f) => f.feature || "-");
    const colors = QGW.palette().series;
    const labels = a.by_day.map((d) => new Date(`${d.date}T00:00:00Z`).toLocaleDateString("en-US", { month: "short", day: "numeric", timeZone: "UTC" }));
    const datasets = names.map((n, i) => ({
      label: n, data: a.by_day.map((d) => (d.features && d.features[n]) || 0),
      backgroundColor: colors[i % colors.length], borderRadius: 3, maxBarThickness: 22, stack: "tokens",
    }));
    QGW.chart(canvas, {
      type: "bar",
      data: { labels, datasets },
      options: {
        responsive: true, maintainAspectRatio: false,
        interaction: { mode: "index", intersect: false },
        plugins: { legend: { position: "bottom", labels: { boxWidth: 10, boxHeight: 10 } } },
        scales: { x: { stacked: true, grid: { display: false } }, y: { stacked: true, beginAtZero: true, ticks: { precision: 0 } } },
      },
    });

    const body = QGW.clear($("features").tBodies[0]);
    for (const f of a.by_feature) {
      body.append(QGW.el("tr", {},
        QGW.el("td", { title: f.meter ? `meter ${f.meter}` : undefined, text: f.feature || "-" }),
        QGW.el("td", { class: "num", text: QGW.fmt(f.calls) }), QGW.el("td", { class: "num", text: QGW.fmt(f.tokens) }),
        QGW.el("td", { class: "num", text: QGW.fmt(f.denied) })));
    }
    $("features-empty").hidden = a.by_feature.length > 0;
  }

  function reason(e) {
    const md = e.metadata || {};
    if (e.kind === "denied") {
      let why = md.status ? `${md.code} (${md.status})` : md.code || "refused";
      if (md.layer) why += ` at ${md.layer}`;  /* the waterfall's layer that refused */
      return md.cost ? `${why} · ${QGW.fmt(md.cost)} tokens asked` : why;
    }
    /* A charge or refund: the layers it came from or went back to. */
    if (e.sources && e.sources.length) return e.sources.map((s) => `${s.layer} ${QGW.fmt(Math.abs(s.amount))}`).join(" · ");
    return md.code || md.reason || "";
  }

  /* The signed change of the balance (a refusal changes nothing). */
  function change(e) {
    if (!e.delta) return "0";
    return e.delta > 0 ? `+${QGW.fmt(e.delta)}` : `−${QGW.fmt(-e.delta)}`;
  }

  function renderEvents(result) {
    const body = QGW.clear($("events").tBodies[0]);
    const empty = $("events-empty");
    if (!result.ok) {
      empty.hidden = false;
      empty.textContent = `Activity is unavailable right now (${result.error.message}).`;
      return;
    }
    const events = result.value.events;
    empty.hidden = events.length > 0;
    empty.textContent = "No activity yet.";
    for (const e of events) {
      body.append(QGW.el("tr", { "data-kind": e.kind },
        QGW.el("td", { title: QGW.time(e.ts), text: QGW.ago(e.ts) }),
        QGW.el("td", {}, QGW.el("span", { class: `kind ${e.kind}`, text: e.kind })),
        QGW.el("td", { text: e.feature || "—" }),
        QGW.el("td", { class: "muted", text: e.user_id || "—" }),
        QGW.el("td", { class: e.delta > 0 ? "num credit" : "num", text: change(e) }),
        QGW.el("td", { class: "num", text: QGW.fmt(e.balance_after) }),
        QGW.el("td", { class: "muted", text: reason(e) })));
    }
  }

  function renderPacks(pricing, credential) {
    const packs = Object.entries(pricing.packs || {});
    const box = $("buy");
    box.hidden = !(pricing.purchases_available && packs.length && !isLink(credential));
    if (box.hidden) return;
    const list = QGW.clear($("packs"));
    for (const [name, pk] of packs) {
      const price = new Intl.NumberFormat("en-US", { style: "currency", currency: (pk.currency || "usd").toUpperCase() }).format(pk.price_cents / 100);
      const button = QGW.el("button", { class: "primary", type: "button", text: "Buy" });
      button.addEventListener("click", async () => {
        button.disabled = true;
        try {
          const r = await QGW.api(credential, "/v1/purchases", { method: "POST", body: { pack: name } });
          if (r && r.checkout_url) location.assign(r.checkout_url);
        } catch (err) {
          $("buy-error").hidden = false;
          $("buy-error").textContent = `The purchase could not start: ${err.message}`;
        } finally {
          button.disabled = false;
        }
      });
      list.append(QGW.el("div", { class: "pack", "data-pack": name },
        QGW.el("strong", { text: pk.name || name }),
        QGW.el("span", { class: "muted num", text: `${QGW.fmt(pk.tokens)} ${pk.meter || ""} tokens` }),
        QGW.el("span", { class: "price num", text: price }), button));
    }
  }

  async function load() {
    const credential = cred.get();
    if (!credential) return showLogin();
    let balance;
    try {
      balance = await QGW.api(credential, "/v1/balance"); // first alone: a refused credential makes one request
    } catch (err) {
      if (err.status === 401 || err.status === 403) {
        cred.clear();
        const msg = isLink(credential) ? "This dashboard link has expired or is not valid. Ask for a new link, or enter an API key."
          : err.status === 403 ? "This key cannot read balances: it needs the read scope." : "That key was not accepted.";
        return showLogin(msg);
      }
      $("load-error").hidden = false;
      $("load-error").textContent = `Could not load balances: ${err.message}`;
      return;
    }
    showApp(balance, credential);
    const r = await QGW.settle({
      pricing: QGW.api(credential, "/v1/pricing"),
      analytics: QGW.api(credential, "/v1/analytics?days=30"),
      usage: QGW.api(credential, "/v1/usage?limit=25"),
    });
    const problems = Object.entries(r).filter(([, v]) => !v.ok).map(([k, v]) => `${k}: ${v.error.message}`);
    $("load-error").hidden = problems.length === 0;
    $("load-error").textContent = problems.length ? `Some data could not be loaded — ${problems.join("; ")}` : "";
    // Without pricing there are no thresholds to colour by (the banner says why); never a guess.
    const t = r.pricing.ok ? r.pricing.value.balance_thresholds : { warn_percent: 0, critical_percent: 0 };
    renderMeters(balance, r.analytics.ok ? r.analytics.value : null, t);
    renderUsage(r.analytics);
    renderEvents(r.usage);
    if (r.pricing.ok) renderPacks(r.pricing.value, credential);
    QGW.stamp($("updated"));
    document.body.dataset.loaded = "true";
  }

  function start() {
    QGW.chartDefaults();
    takeLinkFromFragment();
    $("login-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const key = $("key").value.trim();
      if (!key) return;
      cred.set(key);
      load().then(schedule);
    });
    $("signout").addEventListener("click", () => { cred.clear(); showLogin(); });
    $("refresh").addEventListener("click", () => load());
    window.addEventListener("hashchange", () => { takeLinkFromFragment(); load().then(schedule); });
    load().then(schedule);
  }

  function schedule() {
    clearInterval(timer);
    if (!cred.get()) return;
    timer = setInterval(() => { if (!document.hidden && cred.get()) load(); }, REFRESH_MS);
  }

  start();
})();
