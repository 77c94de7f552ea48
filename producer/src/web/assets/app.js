// taskmill dashboard: one page, hash routes, polling the JSON API under /api/.
"use strict";

const $ = (sel, el = document) => el.querySelector(sel);
const main = $("#main");
let token = sessionStorage.getItem("taskmill-token") || "";
let view = null; // the current view: {refresh, every}
let timer = null;
let generation = 0; // bumped at each route: a view's late answers are dropped after it

// Throws (quietly ended in tick) when the view that asked is no longer shown.
function current(g) {
  if (g !== generation) throw new Stale();
}
class Stale extends Error {}

const STATES = ["pending", "running", "completed", "completed_with_errors", "cancelled", "interrupted", "stalled"];

function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function num(n, digits = 0) {
  if (n === undefined || n === null) return "–";
  return Number(n).toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
}
function ago(ms) {
  if (ms === undefined || ms === null) return "–";
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min";
  if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  return Math.floor(s / 86400) + " d";
}
function time(ms) {
  return ms ? new Date(ms).toLocaleString() : "–";
}
function badge(state, text) {
  return `<span class="state state-${esc(state)}">${esc(text ?? state.replaceAll("_", " "))}</span>`;
}
function json(v) {
  return `<pre>${esc(JSON.stringify(v, null, 2))}</pre>`;
}

async function api(path, opts = {}) {
  const headers = { ...(opts.headers || {}) };
  if (token) headers.Authorization = "Bearer " + token;
  let body = opts.body;
  if (body !== undefined && typeof body !== "string") {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(body);
  }
  const r = await fetch("/api" + path, { ...opts, headers, body });
  const data = await r.json().catch(() => ({}));
  if (r.status === 401) {
    showLogin(token ? data.error || "wrong token" : "");
    throw new Error(data.error || "a token is needed");
  }
  if (!r.ok) {
    const e = new Error(data.error || r.status + " " + r.statusText);
    e.status = r.status;
    throw e;
  }
  return data;
}

function showLogin(error) {
  $("#login").hidden = false;
  $("#login-error").textContent = error || "";
  $("#token").focus();
}
$("#login-form").addEventListener("submit", e => {
  e.preventDefault();
  token = $("#token").value.trim();
  sessionStorage.setItem("taskmill-token", token);
  $("#login").hidden = true;
  route();
});

// A progress bar of settled batches: done in green, dead in red.
function progress(j, big = false) {
  const total = j.batches_total ?? j.batches_published ?? 0;
  const done = j.batches_done || 0;
  const dead = j.batches_dead || 0;
  const other = (j.batches_cancelled || 0) + (j.batches_expired || 0) + (j.batches_lost || 0);
  const pct = n => (total > 0 ? Math.min(100, (100 * n) / total) : 0);
  const publishing = j.batches_total === undefined || j.batches_total === null;
  return `<span class="bar${big ? " big" : ""}"><span style="width:${pct(done)}%"></span><span class="dead" style="width:${pct(dead + other)}%"></span></span>` +
    `<span class="progress-text">${num(done + dead + other)}/${num(total)}${publishing ? "+" : ""} batches</span>`;
}

// A confirmation step inside the page: `what` is asked, `run` runs on yes.
function confirmStep(holder, what, label, run) {
  holder.innerHTML = `<div class="confirm"><span>${esc(what)}</span>` +
    `<button class="danger" data-yes>${esc(label)}</button><button class="secondary" data-no>Keep</button></div>`;
  $("[data-no]", holder).onclick = () => { holder.innerHTML = ""; };
  $("[data-yes]", holder).onclick = async () => {
    holder.innerHTML = `<span class="muted">working…</span>`;
    try {
      holder.innerHTML = `<div class="message">${esc(await run())}</div>`;
    } catch (e) {
      holder.innerHTML = `<div class="message error">${esc(e.message)}</div>`;
    }
  };
}

// ---------------------------------------------------------------------------------- Jobs
function jobsView(params) {
  const g = generation;
  const state = { state: params.get("state") || "", task: params.get("task") || "", q: params.get("q") || "", offset: 0 };
  const limit = 50;
  main.innerHTML = `<h1>Jobs</h1>
    <div class="filters">
      <select id="f-state"><option value="">every state</option>${STATES.map(s => `<option value="${s}">${s.replaceAll("_", " ")}</option>`).join("")}</select>
      <select id="f-task"><option value="">every task</option></select>
      <input id="f-q" type="search" placeholder="search job id" size="30">
      <span class="muted" id="jobs-count"></span>
    </div>
    <div id="jobs-table"></div>
    <div class="pager"><button class="secondary" id="prev">← newer</button><button class="secondary" id="next">older →</button><span class="muted" id="page"></span></div>`;
  $("#f-state").value = state.state;
  $("#f-q").value = state.q;
  const changed = () => { state.offset = 0; refresh().catch(() => {}); };
  $("#f-state").onchange = e => { state.state = e.target.value; changed(); };
  $("#f-task").onchange = e => { state.task = e.target.value; changed(); };
  $("#f-q").oninput = e => { state.q = e.target.value.trim(); changed(); };
  $("#prev").onclick = () => { state.offset = Math.max(0, state.offset - limit); refresh().catch(() => {}); };
  $("#next").onclick = () => { state.offset += limit; refresh().catch(() => {}); };
  api("/tasks").then(({ tasks }) => {
    const sel = $("#f-task");
    if (!sel) return;
    for (const t of tasks) sel.insertAdjacentHTML("beforeend", `<option>${esc(t.name)}</option>`);
    sel.value = state.task;
  }).catch(() => {});
  async function refresh() {
    const qs = new URLSearchParams({ state: state.state, task: state.task, q: state.q, offset: state.offset, limit });
    const data = await api("/jobs?" + qs);
    current(g);
    $("#jobs-count").textContent = `${num(data.total)} job${data.total === 1 ? "" : "s"}`;
    $("#page").textContent = data.total ? `${num(state.offset + 1)}–${num(Math.min(data.total, state.offset + limit))} of ${num(data.total)}` : "";
    $("#prev").disabled = state.offset === 0;
    $("#next").disabled = state.offset + limit >= data.total;
    if (!data.jobs.length) {
      $("#jobs-table").innerHTML = `<div class="card empty">No jobs${state.state || state.task || state.q ? " match" : " yet: <code>producer enqueue --file posts.jsonl</code>"}</div>`;
      return;
    }
    $("#jobs-table").innerHTML = `<table><thead><tr><th>Job</th><th>State</th><th>Task</th><th>Queue</th><th>Progress</th><th class="num">Records/s</th><th class="num">Age</th></tr></thead><tbody>` +
      data.jobs.map(j => j.unreadable !== undefined ? `<tr data-job="${esc(j.job)}">
        <td><a href="#/jobs/${encodeURIComponent(j.job)}"><code>${esc(j.job)}</code></a></td>
        <td>${badge("unreadable")}</td><td colspan="5" class="muted">${esc(j.unreadable)}</td></tr>` : `<tr data-job="${esc(j.job)}">
        <td><a href="#/jobs/${encodeURIComponent(j.job)}"><code>${esc(j.job)}</code></a></td>
        <td>${badge(j.state)}</td><td>${esc(j.task)}</td><td>${esc(j.queue)}</td>
        <td class="progress">${progress(j)}</td>
        <td class="num">${num(j.rate)}</td><td class="num">${ago(j.age_ms)}</td></tr>`).join("") +
      `</tbody></table>`;
  }
  return { refresh, every: 1000 };
}

// ----------------------------------------------------------------------------------- Job
function jobView(id) {
  const g = generation;
  let resultsOffset = 0;
  const limit = 20;
  main.innerHTML = `<h1>Job <code>${esc(id)}</code> <span id="job-state"></span></h1>
    <div class="actions" id="job-actions"></div><div id="job-confirm"></div>
    <div id="job-progress"></div>
    <div id="job-links"></div>
    <div class="grid" id="job-counters"></div>
    <div class="two"><div><h2>Times</h2><div id="job-times" class="card"></div><h2>Parameters</h2><div id="job-params"></div></div>
      <div><h2>Summary</h2><div id="job-summary"></div></div></div>
    <div id="job-problems"></div>
    <div id="job-dead"></div>
    <h2>Results</h2><div id="job-results"></div>
    <div class="pager"><button class="secondary" id="r-prev">← earlier</button><button class="secondary" id="r-next">later →</button><span class="muted" id="r-page"></span></div>`;
  let finishedResults = false;
  $("#r-prev").onclick = () => { resultsOffset = Math.max(0, resultsOffset - limit); finishedResults = false; refresh().catch(() => {}); };
  $("#r-next").onclick = () => { resultsOffset += limit; finishedResults = false; refresh().catch(() => {}); };
  let actionsFor = "";
  async function refresh() {
    let j;
    try {
      j = await api("/jobs/" + encodeURIComponent(id));
      current(g);
    } catch (e) {
      if (e instanceof Stale) throw e;
      main.innerHTML = `<h1>Job <code>${esc(id)}</code></h1><div class="message error">${esc(e.message)}</div>
        <div class="actions" id="job-actions"></div><div id="job-confirm"></div><p><a href="#/jobs">all jobs</a></p>`;
      stop();
      // A job whose record cannot be read can still be removed.
      if (e.status === 500 && e.message.includes(" is unreadable: ")) {
        const b = document.createElement("button");
        b.textContent = "Delete";
        b.className = "danger";
        b.onclick = () => confirmStep($("#job-confirm"), "Delete this unreadable job and its keys? This cannot be undone.", "Yes, delete", async () => {
          await api(`/jobs/${encodeURIComponent(id)}`, { method: "DELETE" });
          setTimeout(() => { location.hash = "#/jobs"; }, 800);
          return "Deleted.";
        });
        $("#job-actions").append(b);
      }
      return;
    }
    $("#job-state").innerHTML = badge(j.state);
    const key = `${j.finished}-${j.batches_dead}`;
    if (key !== actionsFor) {
      actionsFor = key;
      const acts = $("#job-actions");
      acts.innerHTML = "";
      const add = (label, cls, what, yes, run) => {
        const b = document.createElement("button");
        b.textContent = label;
        b.className = cls;
        b.onclick = () => confirmStep($("#job-confirm"), what, yes, run);
        acts.append(b);
      };
      if (!j.finished) add("Cancel", "secondary", "Cancel this job? Its batches not started yet are dropped.", "Yes, cancel", async () => {
        const r = await api(`/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" });
        return r.cancelled ? "Cancelled." : `It had already finished (${r.was}).`;
      });
      if (j.batches_dead > 0) add("Replay dead letters", "secondary", `Send this job's dead letters back to queue ${j.queue}?`, "Yes, replay", async () => {
        const r = await api(`/jobs/${encodeURIComponent(id)}/replay`, { method: "POST" });
        return `Replayed ${r.replayed} dead letter${r.replayed === 1 ? "" : "s"}.` + (r.skipped.length ? " Skipped: " + r.skipped.join("; ") : "");
      });
      if (j.finished) add("Delete", "danger", "Delete this job and its results? This cannot be undone.", "Yes, delete", async () => {
        await api(`/jobs/${encodeURIComponent(id)}`, { method: "DELETE" });
        setTimeout(() => { location.hash = "#/jobs"; }, 800);
        return "Deleted.";
      });
    }
    $("#job-progress").innerHTML = progress(j, true) + ` <span class="muted">· task ${esc(j.task)} · queue ${esc(j.queue)}</span>`;
    // Its group, the job it follows up and its follow-ups (enqueue --group, --then).
    const jobLink = id => `<a href="#/jobs/${encodeURIComponent(id)}"><code>${esc(id)}</code></a>`;
    const links = [];
    const groupLink = g => `<a href="#/groups/${encodeURIComponent(g)}">group <code>${esc(g)}</code></a>`;
    if (j.group) links.push(groupLink(j.group));
    if (j.parent) links.push(j.parent.startsWith("group:") ? `follows ${groupLink(j.parent.slice(6))}` : `follows ${jobLink(j.parent)}`);
    if (j.then) {
      const steps = (j.then.steps || []).map(s => esc(s.task)).join(" → ");
      links.push(`then ${steps}` + (j.then_job ? `: ${jobLink(j.then_job)}` : "") +
        (j.then_note ? ` <span class="muted">(${esc(j.then_note)})</span>` : ""));
    }
    $("#job-links").innerHTML = links.length ? `<div class="card" id="job-chain">${links.join(" · ")}</div>` : "";
    const stat = (v, label) => `<div class="stat"><b>${num(v)}</b><span>${label}</span></div>`;
    $("#job-counters").innerHTML = [
      stat(j.batches_total ?? j.batches_published, j.batches_total === undefined ? "batches published so far" : "batches"),
      stat(j.batches_done, "batches done"), stat(j.batches_dead, "batches dead"),
      stat(j.batches_cancelled, "batches cancelled"), stat(j.batches_expired, "batches expired"),
      ...(j.batches_lost ? [stat(j.batches_lost, "batches lost")] : []),
      stat(j.retries, "retries"), stat(j.records_total, "records"), stat(j.records_done, "records done"),
      stat(j.records_invalid, "records invalid"), stat(j.rate, "records/s"),
    ].join("");
    const dur = j.started_ms ? ((j.finished_ms || Date.now()) - j.started_ms) : null;
    $("#job-times").innerHTML = `<table><tbody>
      <tr><td>created</td><td>${time(j.created_ms)}</td></tr>
      <tr><td>started</td><td>${time(j.started_ms)}</td></tr>
      <tr><td>finished</td><td>${time(j.finished_ms)}</td></tr>
      <tr><td>running for</td><td>${dur === null ? "–" : ago(dur)}</td></tr>
      ${j.eta_ms ? `<tr><td>not before</td><td>${time(j.eta_ms)}</td></tr>` : ""}
      ${j.expires_ms ? `<tr><td>expires</td><td>${time(j.expires_ms)}</td></tr>` : ""}
      </tbody></table>`;
    $("#job-params").innerHTML = json(j.params);
    $("#job-summary").innerHTML = j.summary ? `<div id="summary">${json(j.summary)}</div>` : `<div class="card muted">${j.finished ? "no summary" : "when the job finishes"}</div>`;
    $("#job-problems").innerHTML = j.problems && j.problems.length
      ? `<h2>Problems reported at enqueue</h2><div class="card"><ul>${j.problems.map(p => `<li>${esc(p)}</li>`).join("")}</ul></div>` : "";
    $("#job-dead").innerHTML = j.dead && j.dead.length
      ? `<h2>Dead batches</h2><table><thead><tr><th class="num">Batch</th><th>Kind</th><th class="num">Attempts</th><th>Error</th></tr></thead><tbody>` +
        j.dead.map(d => `<tr><td class="num">${d.batch}</td><td>${esc(d.reason.kind)}</td><td class="num">${esc(d.reason.attempts ?? "")}</td><td>${esc(d.reason.error ?? JSON.stringify(d.reason))}</td></tr>`).join("") +
        `</tbody></table>` : "";
    if (!finishedResults) {
      const r = await api(`/jobs/${encodeURIComponent(id)}/results?offset=${resultsOffset}&limit=${limit}`);
      current(g);
      $("#r-page").textContent = r.total ? `batches ${num(resultsOffset)}–${num(Math.min(r.total, resultsOffset + limit) - 1)} of ${num(r.total)}` : "";
      $("#r-prev").disabled = resultsOffset === 0;
      $("#r-next").disabled = resultsOffset + limit >= r.total;
      $("#job-results").innerHTML = r.results.length
        ? `<table><thead><tr><th class="num">Batch</th><th>Result</th></tr></thead><tbody>` +
          r.results.map(x => `<tr><td class="num">${x.batch}</td><td><code>${esc(JSON.stringify(x.result))}</code></td></tr>`).join("") + `</tbody></table>`
        : `<div class="card empty">no results stored in this range yet</div>`;
      finishedResults = j.finished;
    }
  }
  return { refresh, every: 1000 };
}

// -------------------------------------------------------------------------- Dead letters
function deadView(params) {
  const g = generation;
  const job = params.get("job") || "";
  main.innerHTML = `<h1>Dead letters${job ? ` of job <code>${esc(job)}</code>` : ""}</h1>
    <div class="actions"><button class="secondary" id="d-replay-all">Replay all</button><button class="danger" id="d-purge-all">Purge all</button><span class="muted" id="d-count"></span></div>
    <div id="d-confirm"></div>
    <h2>By job and kind</h2><div id="d-groups"></div>
    <h2>Messages</h2><div id="d-letters"></div>
    <div id="d-detail"></div>`;
  const scope = job ? { job } : { all: true };
  $("#d-replay-all").onclick = () => confirmStep($("#d-confirm"), `Send ${job ? "this job's" : "every"} dead letter back to its work queue?`, "Yes, replay", async () => {
    const r = await api("/dead/replay", { method: "POST", body: scope });
    refresh().catch(() => {});
    return `Replayed ${r.replayed} dead letter${r.replayed === 1 ? "" : "s"}.` + (r.skipped.length ? " Skipped: " + r.skipped.join("; ") : "");
  });
  $("#d-purge-all").onclick = () => confirmStep($("#d-confirm"), `Delete ${job ? "this job's" : "every"} dead letter for good?`, "Yes, purge", async () => {
    const r = await api("/dead/purge", { method: "POST", body: scope });
    refresh().catch(() => {});
    return `Purged ${r.purged} dead letter${r.purged === 1 ? "" : "s"}.`;
  });
  let selected = "";
  async function show(id) {
    selected = id;
    document.querySelectorAll("#d-letters tr").forEach(tr => tr.classList.toggle("selected", tr.dataset.id === id));
    const d = await api("/dead/" + encodeURIComponent(id));
    current(g);
    $("#d-detail").innerHTML = `<h2>Dead letter <code>${esc(id)}</code></h2>
      <div class="card"><p><b>${esc(d.kind)}</b>: ${esc(d.error)} <span class="muted">(${d.attempts} attempt${d.attempts === 1 ? "" : "s"}, ${time(d.at_ms)}, from ${esc(d.queue ?? "?")})</span></p>
      <div class="two"><div><h2>Headers</h2>${json(d.headers)}<h2>Parameters</h2>${json(d.params)}</div><div><h2>Records</h2><div id="d-records">${json(d.records)}</div></div></div></div>`;
  }
  async function refresh() {
    const data = await api("/dead" + (job ? "?job=" + encodeURIComponent(job) : ""));
    current(g);
    $("#d-count").textContent = `${num(data.total)} dead letter${data.total === 1 ? "" : "s"} in the queue`;
    $("#d-replay-all").disabled = $("#d-purge-all").disabled = data.total === 0;
    $("#d-groups").innerHTML = data.groups.length
      ? `<table><thead><tr><th>Job</th><th>Task</th><th>Kind</th><th class="num">Count</th><th></th></tr></thead><tbody>` +
        data.groups.map(g => `<tr data-group="${esc(g.job)}"><td><a href="#/jobs/${encodeURIComponent(g.job)}"><code>${esc(g.job || "?")}</code></a></td><td>${esc(g.task ?? "?")}</td><td>${esc(g.kind)}</td><td class="num">${g.count}</td>
          <td><button class="secondary" data-replay="${esc(g.job)}">Replay job</button> <button class="secondary" data-purge="${esc(g.job)}">Purge job</button></td></tr>`).join("") + `</tbody></table>`
      : `<div class="card empty">No dead letters.</div>`;
    document.querySelectorAll("[data-replay]").forEach(b => b.onclick = () => confirmStep($("#d-confirm"), `Send job ${b.dataset.replay}'s dead letters back to their work queue?`, "Yes, replay", async () => {
      const r = await api(`/dead/replay`, { method: "POST", body: { job: b.dataset.replay } });
      refresh().catch(() => {});
      return `Replayed ${r.replayed} dead letter${r.replayed === 1 ? "" : "s"}.`;
    }));
    document.querySelectorAll("[data-purge]").forEach(b => b.onclick = () => confirmStep($("#d-confirm"), `Delete job ${b.dataset.purge}'s dead letters for good?`, "Yes, purge", async () => {
      const r = await api(`/dead/purge`, { method: "POST", body: { job: b.dataset.purge } });
      refresh().catch(() => {});
      return `Purged ${r.purged} dead letter${r.purged === 1 ? "" : "s"}.`;
    }));
    $("#d-letters").innerHTML = data.letters.length
      ? `<table><thead><tr><th>Batch</th><th>Task</th><th>Kind</th><th class="num">Attempts</th><th>Died</th><th>Error</th></tr></thead><tbody>` +
        data.letters.map(d => `<tr data-id="${esc(d.id ?? "")}" class="${d.id === selected ? "selected" : ""}"><td>${d.id ? `<a href="javascript:void 0" data-show="${esc(d.id)}"><code>${esc(d.id)}</code></a>` : "?"}</td>
          <td>${esc(d.task ?? "?")}</td><td>${esc(d.kind)}</td><td class="num">${d.attempts}</td><td>${time(d.at_ms)}</td><td>${esc(d.error)}</td></tr>`).join("") + `</tbody></table>`
      : "";
    document.querySelectorAll("[data-show]").forEach(a => a.onclick = () => show(a.dataset.show));
  }
  return { refresh, every: 3000 };
}

// -------------------------------------------------------------------------------- Queues
function chart(history, seconds) {
  const W = 1000, H = 220, L = 50, R = 14, T = 12, B = 26;
  const now = Date.now();
  const work = q => !/\.(dead|dead\.events)$|\.delay\./.test(q.queue);
  const points = history.filter(s => s.t >= now - 3600e3).map(s => {
    const sum = k => s.queues.filter(work).reduce((a, q) => a + (q[k] || 0), 0);
    return { t: s.t, pub: sum("publish_rate"), ack: sum("ack_rate") };
  });
  // The last hour at most; a young history is drawn over at least 5 minutes.
  const span = Math.min(3600e3, Math.max(300e3, points.length ? now - points[0].t : 0));
  const from = now - span;
  const max = Math.max(1, ...points.map(p => Math.max(p.pub, p.ack)));
  const x = t => L + ((t - from) / span) * (W - L - R);
  const y = v => T + (1 - v / max) * (H - T - B);
  const line = (k, color) => points.length ? `<polyline fill="none" stroke="${color}" stroke-width="2" points="${points.map(p => `${x(p.t).toFixed(1)},${y(p[k]).toFixed(1)}`).join(" ")}"/>` : "";
  const ticks = [0, 0.5, 1].map(f => `<text x="${L - 6}" y="${y(max * f) + 4}" text-anchor="end">${num(max * f)}</text><line x1="${L}" x2="${W - R}" y1="${y(max * f)}" y2="${y(max * f)}" stroke="#eee"/>`).join("");
  const xt = [1, 0.75, 0.5, 0.25, 0].map(f => {
    const m = Math.round((f * span) / 60000);
    return `<text x="${x(now - f * span)}" y="${H - 8}" text-anchor="${f === 0 ? "end" : f === 1 ? "start" : "middle"}">${m ? "-" + m + " min" : "now"}</text>`;
  }).join("");
  return `<div class="legend"><span><i style="background:#3b5bdb"></i>published/s</span><span><i style="background:#2b8a3e"></i>acked/s</span><span>work queues, sampled every ${seconds} s (${points.length} samples in the last hour)</span></div>
    <svg class="chart" viewBox="0 0 ${W} ${H}" preserveAspectRatio="none">${ticks}${xt}${line("pub", "#3b5bdb")}${line("ack", "#2b8a3e")}</svg>`;
}

function queuesView() {
  const g = generation;
  main.innerHTML = `<h1>Queues</h1><div id="q-chart"></div><h2>Now</h2><div id="q-table"></div>`;
  async function refresh() {
    const data = await api("/queues");
    current(g);
    $("#q-chart").innerHTML = chart(data.history, data.sample_seconds);
    $("#q-table").innerHTML = `<table><thead><tr><th>Queue</th><th>Type</th><th class="num">Ready</th><th class="num">Unacked</th><th class="num">Consumers</th><th class="num">Published/s</th><th class="num">Delivered/s</th><th class="num">Acked/s</th></tr></thead><tbody>` +
      data.queues.map(q => `<tr data-queue="${esc(q.queue)}"><td><code>${esc(q.queue)}</code></td><td>${esc(q.type)}</td><td class="num">${num(q.ready)}</td><td class="num">${num(q.unacked)}</td><td class="num">${num(q.consumers)}</td>
        <td class="num">${num(q.publish_rate, 1)}</td><td class="num">${num(q.deliver_rate, 1)}</td><td class="num">${num(q.ack_rate, 1)}</td></tr>`).join("") +
      `</tbody></table>`;
  }
  return { refresh, every: 2000 };
}

// ------------------------------------------------------------------------------- Workers
// "120 ms / 2.8 ms": the p99 latency of the batches a worker stored and the part of it spent in
// the worker; a dash before its first batch (or from a worker without these figures).
function latency(w) {
  const whole = w.latency_ms && w.latency_ms.p99, here = w.in_worker_us && w.in_worker_us.p99;
  if (!w.batches_done || whole == null || here == null) return "–";
  return `${num(whole)} ms / ${num(here / 1000, 1)} ms`;
}

function workersView() {
  const g = generation;
  main.innerHTML = `<h1>Workers</h1><div id="w-table"></div>`;
  async function refresh() {
    const { workers } = await api("/workers");
    current(g);
    $("#w-table").innerHTML = workers.length
      ? `<table><thead><tr><th>Status</th><th>Host</th><th class="num">PID</th><th>Version</th><th>Queues</th><th class="num">Threads</th><th class="num">Prefetch</th><th>Started</th>
        <th class="num">Done</th><th class="num">Retried</th><th class="num">Dead</th><th class="num">In flight</th>
        <th class="num" title="p99 of the batches' latency, from creation to result stored / the part of it spent in this worker (the rest waits in RabbitMQ)">Latency p99 / in worker</th><th class="num">Last seen</th></tr></thead><tbody>` +
        workers.map(w => `<tr data-worker="${esc(w.id)}" data-pid="${esc(w.pid)}"><td class="status">${w.alive ? badge("alive") : badge("gone", "gone (" + w.gone_because + ")")}</td>
          <td>${esc(w.host)}</td><td class="num">${esc(w.pid)}</td><td>${esc(w.version)}</td><td>${esc((w.queues || []).join(", "))}</td>
          <td class="num">${num(w.threads)}</td><td class="num">${num(w.prefetch)}</td><td>${time(w.started_ms)}</td>
          <td class="num">${num(w.batches_done)}</td><td class="num">${num(w.batches_retried)}</td><td class="num">${num(w.batches_dead)}</td><td class="num">${num(w.in_flight)}</td>
          <td class="num latency">${latency(w)}</td><td class="num">${ago(w.seen_ago_ms)} ago</td></tr>`).join("") + `</tbody></table>`
      : `<div class="card empty">No worker has sent a heartbeat in the last hour. Start one: <code>worker</code></div>`;
  }
  return { refresh, every: 1000 };
}

// ------------------------------------------------------------------------------- Groups
// A group (enqueue --group): its jobs counted by state, each job, and its chord follow-up
// (group close --then) once it is closed.
function groupView(name) {
  const g = generation;
  main.innerHTML = `<h1>Group <code>${esc(name)}</code></h1><div id="g-summary" class="card"></div><div id="g-table"></div>`;
  async function refresh() {
    let v;
    try {
      v = await api(`/groups/${encodeURIComponent(name)}`);
    } catch (e) {
      current(g);
      if (e.status !== 404) throw e;
      $("#g-summary").innerHTML = `<span class="empty">No job in group <code>${esc(name)}</code> in this namespace (wrong namespace, or they expired).</span>`;
      $("#g-table").innerHTML = "";
      return;
    }
    current(g);
    const counts = Object.entries(v.counts).map(([s, n]) => `${badge(s)} ${num(n)}`).join(" ");
    const link = id => `<a href="#/jobs/${encodeURIComponent(id)}"><code>${esc(id)}</code></a>`;
    let chord = v.closed ? "closed" : "open (jobs may still join)";
    if (v.then) {
      const steps = (v.then.steps || []).map(s => esc(s.task)).join(" → ");
      chord += ` · then ${steps}` + (v.then_job ? `: ${link(v.then_job)}` : ` (as <code>${esc(v.then.root)}</code>)`) +
        (v.then_note ? ` <span class="muted">(${esc(v.then_note)})</span>` : "");
    }
    $("#g-summary").innerHTML = `<div id="g-counts">${num(v.jobs)} job${v.jobs === 1 ? "" : "s"}, ${v.finished ? "finished" : "not finished"}: ${counts}</div><div id="g-chord">${chord}</div>`;
    $("#g-table").innerHTML = `<table><thead><tr><th>Job</th><th>State</th><th>Progress</th><th>Task</th></tr></thead><tbody>` +
      v.statuses.map(j => `<tr data-job="${esc(j.job)}"><td>${link(j.job)}</td><td>${j.state ? badge(j.state) : badge("unreadable")}</td>
        <td>${j.state ? progress(j) : esc(j.unreadable)}</td><td>${esc(j.task)}</td></tr>`).join("") + `</tbody></table>`;
  }
  return { refresh, every: 1000 };
}

// ------------------------------------------------------------------------------- Schedules
function schedulesView() {
  const g = generation;
  main.innerHTML = `<h1>Schedules</h1><div id="s-table"></div>`;
  async function refresh() {
    const { schedules } = await api("/schedules");
    current(g);
    $("#s-table").innerHTML = schedules.length
      ? `<table><thead><tr><th>Name</th><th>Period</th><th>State</th><th>Next tick</th><th>Last job</th><th>Last error</th><th>Enqueue options</th></tr></thead><tbody>` +
        schedules.map(s => `<tr data-schedule="${esc(s.name)}"><td>${esc(s.name)}</td><td>${esc(s.period)}</td>
          <td class="state">${s.paused ? badge("paused") : badge("active")}</td><td>${s.paused ? "–" : time(s.next_ms)}</td>
          <td class="last-job">${s.last_job ? `<a href="#/jobs/${encodeURIComponent(s.last_job)}">${esc(s.last_job)}</a>` : "–"}</td>
          <td class="error">${esc(s.last_error || "")}</td><td><code>${esc((s.enqueue || []).join(" "))}</code></td></tr>`).join("") + `</tbody></table>`
      : `<div class="card empty">No schedule in this namespace. Add one: <code>producer schedule add NAME --every 5m -- --file posts.jsonl</code>, and run <code>producer scheduler</code></div>`;
  }
  return { refresh, every: 1000 };
}

// ------------------------------------------------------------------------------- Routing
function stop() {
  clearTimeout(timer);
  timer = null;
  view = null;
}

async function tick(v) {
  if (view !== v) return;
  try {
    await v.refresh();
    $("#live").classList.remove("stale");
    $("#live").textContent = "live";
  } catch (e) {
    if (e instanceof Stale) return;
    $("#live").classList.add("stale");
    $("#live").textContent = "offline: " + e.message;
  }
  if (view === v) timer = setTimeout(() => tick(v), v.every);
}

function route() {
  stop();
  generation += 1;
  const [path, query] = (location.hash.slice(1) || "/jobs").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  document.querySelectorAll("[data-nav]").forEach(a => a.classList.toggle("active", a.dataset.nav === parts[0]));
  let v;
  if (parts[0] === "jobs" && parts[1]) v = jobView(decodeURIComponent(parts.slice(1).join("/")));
  else if (parts[0] === "dead") v = deadView(params);
  else if (parts[0] === "queues") v = queuesView();
  else if (parts[0] === "workers") v = workersView();
  else if (parts[0] === "schedules") v = schedulesView();
  else if (parts[0] === "groups" && parts[1]) v = groupView(decodeURIComponent(parts.slice(1).join("/")));
  else v = jobsView(params);
  view = v;
  tick(v);
}

window.addEventListener("hashchange", route);
route();
