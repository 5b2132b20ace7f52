// lmcache-rs dashboard: polls stats/history and draws it. No library, no network but this
// server. Every value a server or a client chose (model names, salts, reasons) is inserted as
// text, never as markup.
"use strict";
(() => {
  const TOKEN_KEY = "lmcache-rs-http-token";
  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];
  const SVG = "http://www.w3.org/2000/svg";
  const MAX_LATENCY_CHARTS = 6;
  const MAX_SERIES = 6;
  const state = { samples: [], since: null, startedAt: null, timer: null, period: 2000, lastOk: 0, seq: 0 };

  // ---- helpers ---------------------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "class") e.className = v;
      else if (k === "dataset") Object.assign(e.dataset, v);
      else e.setAttribute(k, v);
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      e.append(c instanceof Node ? c : String(c));
    }
    return e;
  }

  function svg(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    return e;
  }

  function scaled(n, base, units, digits) {
    let i = 0;
    while (Math.abs(n) >= base && i < units.length - 1) { n /= base; i++; }
    const d = i === 0 ? 0 : (Math.abs(n) < 10 ? digits : digits - 1);
    return n.toFixed(Math.max(0, d)) + " " + units[i];
  }
  const fmt = {
    bytes: (n) => scaled(n, 1024, ["B", "KiB", "MiB", "GiB", "TiB"], 2),
    rate: (n) => scaled(n, 1000, ["B/s", "kB/s", "MB/s", "GB/s", "TB/s"], 2),
    int: (n) => Math.round(n).toLocaleString("en-US"),
    perSec: (n) => (n >= 100 ? Math.round(n).toLocaleString("en-US") : n.toFixed(n >= 10 ? 1 : 2)) + "/s",
    pct: (r) => (r === null || r === undefined ? "–" : (100 * r).toFixed(1) + " %"),
    secs: (s) => {
      if (s === null || s === undefined) return "–";
      const sig = (n) => String(parseFloat(n.toPrecision(3)));
      if (s < 1e-3) return sig(s * 1e6) + " µs";
      if (s < 1) return sig(s * 1e3) + " ms";
      return sig(s) + " s";
    },
    ago: (s) => {
      if (s === null || s === undefined) return "never";
      if (s < 60) return s.toFixed(1) + " s ago";
      if (s < 3600) return (s / 60).toFixed(1) + " min ago";
      return (s / 3600).toFixed(1) + " h ago";
    },
    dur: (s) => (s < 60 ? s.toFixed(s < 10 ? 1 : 0) + " s" : s < 3600 ? (s / 60).toFixed(0) + " min" : (s / 3600).toFixed(1) + " h"),
  };

  // A number shown on the page; data-value keeps the exact value for tests and copy-paste.
  function value(text, metric, raw, extra) {
    return el("b", { dataset: Object.assign({ metric, value: String(raw) }, extra || {}) }, text);
  }

  function niceCeil(v) {
    if (!(v > 0)) return 1;
    const e = Math.pow(10, Math.floor(Math.log10(v)));
    const f = v / e;
    return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 2.5 ? 2.5 : f <= 5 ? 5 : 10) * e;
  }

  // ---- charts ---------------------------------------------------------------------------------

  // series: [{name, points: [[t, v|null], ...], color?, dashed?}]; x spans [t0, t1].
  // opts: fixedMax (linear axis from 0), log (decades; for request times), empty (text).
  function chart(fig, title, series, format, t0, t1, opts) {
    opts = opts || {};
    const W = 480, H = 150, L = 58, R = 8, T = 8, B = 18;
    let max = 0, minPos = Infinity, points = 0;
    for (const s of series) for (const [, v] of s.points) {
      if (v === null) continue;
      points++;
      if (v > max) max = v;
      if (v > 0 && v < minPos) minPos = v;
    }
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
    let y, ticks;
    if (opts.log && points && minPos < Infinity) {
      const lo = Math.floor(Math.log10(minPos)), hi = Math.max(lo + 1, Math.ceil(Math.log10(max)));
      y = (v) => T + (1 - (Math.log10(Math.max(v, Math.pow(10, lo))) - lo) / (hi - lo)) * (H - T - B);
      ticks = [];
      for (let e = lo; e <= hi; e++) ticks.push(Math.pow(10, e));
      max = Math.pow(10, hi);
    } else {
      max = opts.fixedMax || niceCeil(max * 1.05);
      y = (v) => T + (1 - v / max) * (H - T - B);
      ticks = [0, 1, 2, 3, 4].map((i) => (max * i) / 4);
    }
    const x = (t) => L + ((t - t0) / Math.max(1e-9, t1 - t0)) * (W - L - R);
    for (const v of ticks) {
      const yy = y(v);
      root.append(svg("line", { x1: L, x2: W - R, y1: yy, y2: yy, class: "grid-line" }));
      const lab = svg("text", { x: L - 4, y: yy + 3, "text-anchor": "end", class: "axis-label" });
      lab.textContent = format(v);
      root.append(lab);
    }
    const span = t1 - t0;
    for (let i = 0; i <= 4; i++) {
      const t = t0 + (span * i) / 4;
      const lab = svg("text", { x: x(t), y: H - 4, "text-anchor": i === 0 ? "start" : i === 4 ? "end" : "middle", class: "axis-label" });
      lab.textContent = i === 4 ? "now" : "−" + fmt.dur(t1 - t);
      root.append(lab);
    }
    series.forEach((s, i) => {
      const color = s.color || COLORS[i % COLORS.length];
      let run = [];
      const flush = () => {
        if (run.length === 1) {
          root.append(svg("circle", { cx: run[0][0], cy: run[0][1], r: 2, fill: color }));
        } else if (run.length > 1) {
          root.append(svg("polyline", { points: run.map((p) => p.join(",")).join(" "), class: s.dashed ? "capacity" : "series", stroke: color }));
        }
        run = [];
      };
      for (const [t, v] of s.points) {
        if (v === null || t < t0) { flush(); continue; }
        run.push([x(t).toFixed(1), y(Math.min(v, max)).toFixed(1)]);
      }
      flush();
    });
    if (points === 0) {
      const e = svg("text", { x: (L + W) / 2, y: H / 2, "text-anchor": "middle", class: "empty" });
      e.textContent = opts.empty || "no data yet";
      root.append(e);
    }
    const legend = el("div", { class: "legend" });
    series.forEach((s, i) => {
      const last = [...s.points].reverse().find((p) => p[1] !== null);
      const sw = el("i");
      sw.style.background = s.color || COLORS[i % COLORS.length];
      legend.append(el("span", {}, sw, s.name + " ", el("b", {}, last ? format(last[1]) : "–")));
    });
    fig.replaceChildren(el("figcaption", {}, title), root, legend);
    fig.dataset.points = String(points);
  }

  // ---- rendering ------------------------------------------------------------------------------

  function renderHealth(h) {
    const badge = $("health-badge");
    badge.textContent = h.health.is_healthy ? "healthy" : "unhealthy";
    badge.className = "badge " + (h.health.is_healthy ? "ok" : "bad");
    badge.dataset.value = String(h.health.is_healthy);
    const reason = $("health-reason");
    reason.textContent = h.health.is_healthy
      ? "The request I/O loop and every critical and high periodic thread tick."
      : "Unhealthy: " + h.health.reason;
    reason.className = "reason " + (h.health.is_healthy ? "ok-text" : "bad-text");
    const io = h.health.io_thread;
    const rows = [
      el("tr", { class: io.is_healthy ? "" : "bad", dataset: { thread: "io" } },
        el("td", {}, "request I/O loop"), el("td", {}, "critical"), el("td", {}, "0.1 s"),
        el("td", {}, fmt.ago(io.last_tick_ago)),
        el("td", { class: "num" }, fmt.int(io.requests_received) + " req"),
        el("td", { class: "num" }, io.pending_requests + " pending"),
        el("td", { class: io.is_healthy ? "ok-text" : "bad-text" }, io.is_healthy ? "ok" : io.reason)),
    ];
    for (const t of h.health.threads) {
      rows.push(el("tr", { class: t.is_healthy ? "" : "bad", dataset: { thread: t.name } },
        el("td", {}, t.name), el("td", {}, t.level), el("td", {}, fmt.dur(t.interval)),
        el("td", {}, fmt.ago(t.last_run_ago)),
        el("td", { class: "num" }, fmt.int(t.total_runs)),
        el("td", { class: "num" }, fmt.int(t.failed_runs)),
        el("td", { class: t.is_healthy ? "ok-text" : "bad-text" },
          t.is_healthy ? (t.last_message ? "ok: " + t.last_message : "ok") : t.reason)));
    }
    $("threads").tBodies[0].replaceChildren(...rows);
  }

  function evictionText(evicted) {
    const parts = Object.entries(evicted).filter(([, n]) => n > 0).map(([k, n]) => `${k} ${fmt.int(n)}`);
    return parts.length ? parts.join(" · ") : "none";
  }

  function renderTiers(h, t0, t1) {
    const cards = h.tiers.map((tier) => {
      const ratio = tier.capacity_bytes > 0 ? tier.used_bytes / tier.capacity_bytes : null;
      const fill = el("div");
      fill.style.width = ratio === null ? "0%" : Math.min(100, 100 * ratio).toFixed(1) + "%";
      const fig = el("figure", { class: "chart", dataset: { chart: "tier-" + tier.name } });
      const used = [], cap = [];
      for (const s of state.samples) {
        const p = s.tiers.find((x) => x.name === tier.name);
        used.push([s.t, p ? p.used_bytes : null]);
        cap.push([s.t, p && p.capacity_bytes > 0 ? p.capacity_bytes : null]);
      }
      const series = [{ name: "used", points: used }];
      if (tier.capacity_bytes > 0) series.push({ name: "capacity", points: cap, dashed: true, color: "#9ca3af" });
      chart(fig, "Used over time", series, fmt.bytes, t0, t1);
      const attrs = { tier: tier.name };
      return el("div", { class: "card", dataset: { tier: tier.name } },
        el("h4", {}, tier.name, el("span", { class: "muted" }, tier.type),
          el("span", { class: tier.is_healthy ? "ok-text" : "bad-text" }, tier.is_healthy ? "healthy" : "unhealthy")),
        tier.problems.length ? el("p", { class: "reason bad-text" }, tier.problems.join("; ")) : null,
        el("div", { class: "bar" + (ratio !== null && ratio >= 0.95 ? " full" : "") }, fill),
        el("div", { class: "kv" },
          el("span", {}, "used ", value(fmt.bytes(tier.used_bytes), "tier-used-bytes", tier.used_bytes, attrs)),
          el("span", {}, "of ", value(tier.capacity_bytes > 0 ? fmt.bytes(tier.capacity_bytes) : "unlimited", "tier-capacity-bytes", tier.capacity_bytes, attrs)),
          el("span", {}, value(ratio === null ? "–" : fmt.pct(ratio), "tier-usage-ratio", ratio === null ? "" : ratio, attrs)),
          el("span", {}, "objects ", value(fmt.int(tier.objects), "tier-objects", tier.objects, attrs))),
        el("div", { class: "kv" }, el("span", {}, "left since start: ", value(evictionText(tier.evicted), "tier-evicted", JSON.stringify(tier.evicted), attrs))),
        fig);
    });
    $("tiers").replaceChildren(...cards);
  }

  function topKeys(field, limit) {
    const total = {};
    for (const s of state.samples) for (const [k, v] of Object.entries(s[field])) {
      total[k] = (total[k] || 0) + (typeof v === "number" ? v : v.requests);
    }
    return Object.keys(total).sort((a, b) => total[b] - total[a] || a.localeCompare(b)).slice(0, limit);
  }

  function renderTraffic(h, t0, t1) {
    const S = state.samples;
    const errTotal = Object.values(h.errors).reduce((a, b) => a + b, 0);
    const errs = el("span", {}, "error replies ", value(fmt.int(errTotal), "errors-total", errTotal));
    for (const [code, n] of Object.entries(h.errors).sort()) {
      errs.append(" · " + code + " ", value(fmt.int(n), "errors", n, { code }));
    }
    $("totals").replaceChildren(
      el("span", {}, "requests since start ", value(fmt.int(h.requests_total), "requests-total", h.requests_total)),
      errs,
      el("span", {}, "up ", value(fmt.dur(h.now - h.started_at), "uptime", h.now - h.started_at)));
    chart($("chart-lookups"), "Lookups / s", [{ name: "lookups", points: S.map((s) => [s.t, s.lookups_per_s]) }], fmt.perSec, t0, t1);
    chart($("chart-hit-ratio"), "Lookup hit ratio (tokens)", [{ name: "hit ratio", points: S.map((s) => [s.t, s.lookup_hit_ratio]) }], fmt.pct, t0, t1, { fixedMax: 1, empty: "no lookups yet" });
    chart($("chart-throughput"), "Store and retrieve throughput", [
      { name: "store (L1 writes)", points: S.map((s) => [s.t, s.store_bytes_per_s]) },
      { name: "retrieve", points: S.map((s) => [s.t, s.retrieve_bytes_per_s]) },
    ], fmt.rate, t0, t1);
    const ops = topKeys("requests_per_s", MAX_SERIES);
    chart($("chart-requests"), "Requests / s by operation",
      ops.map((op) => ({ name: op, points: S.map((s) => [s.t, s.requests_per_s[op] || 0]) })),
      fmt.perSec, t0, t1, { empty: "no requests yet" });
    const codes = topKeys("errors", MAX_SERIES);
    const errSeries = codes.length
      ? codes.map((c) => ({ name: c, points: S.map((s) => [s.t, (s.errors[c] || 0) / s.interval]) }))
      : [{ name: "all codes", points: S.map((s) => [s.t, 0]) }];
    chart($("chart-errors"), "Error replies / s by code", errSeries, fmt.perSec, t0, t1);
    const lat = $("latency");
    const figs = topKeys("latency", MAX_LATENCY_CHARTS).map((op) => {
      const fig = el("figure", { class: "chart", dataset: { chart: "latency-" + op } });
      chart(fig, op, [
        { name: "p50", points: S.map((s) => [s.t, s.latency[op] ? s.latency[op].p50 : null]) },
        { name: "p99", points: S.map((s) => [s.t, s.latency[op] ? s.latency[op].p99 : null]) },
      ], fmt.secs, t0, t1, { log: true });
      return fig;
    });
    lat.replaceChildren(...(figs.length ? figs : [el("p", { class: "muted" }, "No requests in the window yet.")]));
  }

  function renderTenants(h) {
    const isolated = h.eviction_policy === "IsolatedLRU";
    $("tenants-sub").textContent = `${h.tenant_count} cache_salt${h.tenant_count === 1 ? "" : "s"}` +
      (h.tenant_count > h.tenants.length ? `, the ${h.tenants.length} largest shown` : "") +
      ` · policy ${h.eviction_policy} · hit ratio since start or the last /metrics/reset`;
    const rows = h.tenants.map((t) => {
      const ratio = t.quota_bytes ? t.l1_bytes / t.quota_bytes : null;
      const fill = el("div");
      fill.style.width = ratio === null ? "0%" : Math.min(100, 100 * ratio).toFixed(1) + "%";
      const a = { salt: t.cache_salt };
      return el("tr", { dataset: { salt: t.cache_salt } },
        el("td", {}, t.cache_salt),
        el("td", { class: "num" }, value(fmt.bytes(t.l1_bytes), "tenant-l1-bytes", t.l1_bytes, a)),
        el("td", { class: "num" }, t.quota_bytes === null ? (isolated ? "none (not kept)" : "none") : fmt.bytes(t.quota_bytes)),
        el("td", {}, ratio === null ? "–" : el("div", { class: "bar" + (ratio > 1 ? " full" : "") }, fill), ratio === null ? null : fmt.pct(ratio)),
        el("td", { class: "num" }, value(fmt.bytes(t.l2_bytes), "tenant-l2-bytes", t.l2_bytes, a)),
        el("td", { class: "num" }, fmt.int(t.objects)),
        el("td", { class: "num" }, value(fmt.int(t.lookups), "tenant-lookups", t.lookups, a)),
        el("td", { class: "num" }, value(fmt.pct(t.hit_ratio), "tenant-hit-ratio", t.hit_ratio === null ? "" : t.hit_ratio, a)));
    });
    $("tenants").tBodies[0].replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 8, class: "muted" }, "No tenant has stored or looked up anything yet."))]));
  }

  function renderWorkers(h) {
    $("workers-sub").textContent = `${h.workers.length} registered`;
    const rows = h.workers.map((w) => el("tr", { dataset: { instanceId: String(w.instance_id) } },
      el("td", { class: "num" }, value(String(w.instance_id), "worker-instance", w.instance_id)),
      el("td", {}, w.model_name), el("td", { class: "num" }, w.world_size), el("td", {}, w.transfer_mode),
      el("td", {}, w.device), el("td", {}, fmt.ago(w.last_seen_ago)), el("td", {}, fmt.ago(w.registered_ago))));
    $("workers").tBodies[0].replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 7, class: "muted" }, "No worker registered."))]));
  }

  function render(h) {
    // The x axis spans the window, or the server's uptime while that is shorter.
    const t1 = h.now, t0 = Math.max(h.now - h.window_seconds, Math.min(h.started_at, t1 - 10));
    state.samples = state.samples.filter((s) => s.t >= t0);
    renderHealth(h);
    renderTiers(h, t0, t1);
    renderTraffic(h, t0, t1);
    renderTenants(h);
    renderWorkers(h);
    $("meta").textContent = `samples every ${fmt.dur(h.interval_seconds)}, last ${fmt.dur(h.window_seconds)}`;
    $("updated").textContent = "updated " + new Date().toLocaleTimeString("en-GB");
  }

  // ---- polling and auth -------------------------------------------------------------------------

  function banner(text) {
    const b = $("banner");
    b.textContent = text || "";
    b.hidden = !text;
  }

  function showLogin(message) {
    // Nothing of the server's state stays on the page without the token.
    state.samples = []; state.since = null; state.startedAt = null;
    $("main").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    const badge = $("health-badge");
    badge.textContent = "token required"; badge.className = "badge"; delete badge.dataset.value;
    $("meta").textContent = "";
    $("updated").textContent = "";
    banner("");
    $("token-input").focus();
  }

  function schedule() {
    clearTimeout(state.timer);
    state.timer = setTimeout(poll, state.period);
  }

  async function poll() {
    // One poll at a time wins: a poll started later (a new token) discards an older answer.
    const my = ++state.seq;
    clearTimeout(state.timer);
    const token = sessionStorage.getItem(TOKEN_KEY);
    const headers = { Accept: "application/json" };
    if (token) headers.Authorization = "Bearer " + token;
    const url = "stats/history" + (state.since === null ? "" : "?since=" + encodeURIComponent(state.since));
    let r;
    try {
      r = await fetch(url, { headers, cache: "no-store", credentials: "omit" });
    } catch (e) {
      if (my !== state.seq) return;
      banner("The server does not answer (" + e.message + "); retrying. Data shown is from " + new Date(state.lastOk).toLocaleTimeString("en-GB") + ".");
      schedule();
      return;
    }
    if (my !== state.seq) return;
    if (r.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin(token ? "The server refused that token." : "");
      return;
    }
    if (!r.ok) {
      let why = "";
      try { why = (await r.json()).error || ""; } catch (e) { why = r.statusText; }
      banner(`stats/history answered ${r.status} ${why}; retrying.`);
      schedule();
      return;
    }
    const h = await r.json();
    if (my !== state.seq) return;
    if (state.startedAt !== h.started_at) { state.samples = []; state.startedAt = h.started_at; }
    state.samples.push(...h.samples);
    if (state.samples.length) state.since = state.samples[state.samples.length - 1].t;
    state.period = 1000 * Math.min(5, Math.max(1, h.interval_seconds));
    state.lastOk = Date.now();
    $("login").hidden = true;
    $("main").hidden = false;
    banner("");
    render(h);
    schedule();
  }

  function takeFragmentToken() {
    const m = location.hash.match(/(?:^#|&)token=([^&]+)/);
    if (!m) return false;
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
    return true;
  }

  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("token-input").value.trim();
    if (!t) return;
    sessionStorage.setItem(TOKEN_KEY, t);
    $("token-input").value = "";
    poll();
  });
  // A token pasted into the address bar of an open page arrives as a fragment change.
  window.addEventListener("hashchange", () => { if (takeFragmentToken()) poll(); });
  takeFragmentToken();
  poll();
})();
