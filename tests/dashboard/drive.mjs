// Drives the taskmill dashboard in Debian's Chromium, as a user would, and checks what it
// shows. Run by tests/tests/dashboard.rs, which starts the services' side:
//   URL          the dashboard (http://127.0.0.1:PORT/)
//   TOKEN        its token (the page asks for it)
//   JOB          a slow job enqueued by the CLI, running on two workers (in group demo,
//                with a chaos follow-up)
//   DEAD_JOB     a finished job whose batches all died (chaos, permanent)
//   BAD_JOB      a job whose state was edited by hand into nonsense (unreadable)
//   WORKER_PIDS  the two workers' pids: the first is stopped (SIGTERM) during the run
//   SCHEDULE     a schedule whose first tick was enqueued as SCHEDULE_JOB
//   (group demo is closed with a chaos chord follow-up, demo.chord, once JOB ends)
//   SHOTS        where to write one screenshot of each page (optional)
// Prints one JSON object of what it saw; exits non-zero when a check fails.
import { chromium } from "playwright-core";

const env = (k, d) => process.env[k] ?? d;
const url = env("URL");
const job = env("JOB");
const deadJob = env("DEAD_JOB");
const pids = env("WORKER_PIDS", "").split(",").filter(Boolean).map(Number);
const shots = env("SHOTS", "");
const seen = {};

function check(cond, what) {
  if (!cond) throw new Error("check failed: " + what);
}
async function shot(page, name) {
  if (shots) await page.screenshot({ path: `${shots}/dashboard-${name}.png`, fullPage: false });
}

const browser = await chromium.launch({
  executablePath: env("CHROMIUM", "/usr/bin/chromium"),
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1360, height: 860 } });
  page.setDefaultTimeout(30_000);
  page.on("pageerror", e => { seen.page_errors = [...(seen.page_errors ?? []), String(e)]; });

  // The token, asked once.
  await page.goto(url + "#/jobs");
  await page.waitForSelector("#login:not([hidden])");
  await page.fill("#token", "wrong");
  await page.click("#login-form button");
  await page.waitForSelector("#login:not([hidden]) #login-error:text('wrong token')");
  await page.fill("#token", env("TOKEN"));
  await page.click("#login-form button");
  await page.waitForSelector("#login[hidden]", { state: "attached" });

  // Jobs: the CLI's job is listed and its progress advances without a reload.
  const row = `tr[data-job="${job}"]`;
  await page.waitForSelector(row);
  await page.evaluate(() => { window.__notReloaded = true; });
  const settled = async () => Number((await page.textContent(`${row} .progress-text`)).split("/")[0].replaceAll(",", ""));
  const first = await settled();
  await page.waitForFunction(([sel, n]) => {
    const t = document.querySelector(sel + " .progress-text");
    return t && Number(t.textContent.split("/")[0].replaceAll(",", "")) > n;
  }, [row, first]);
  const second = await settled();
  check(await page.evaluate(() => window.__notReloaded === true), "the page reloaded");
  seen.progress = [first, second];
  await shot(page, "jobs");
  await page.waitForSelector(`${row} .state-completed`, { timeout: 120_000 });

  // Job: its page shows the summary the workers folded.
  await page.click(`${row} a`);
  await page.waitForSelector("#summary");
  const summary = JSON.parse(await page.textContent("#summary"));
  seen.summary = summary;
  await page.waitForSelector("#job-results tbody tr");
  await shot(page, "job");
  // Its group and its follow-up (enqueued with --group demo --then chaos): the link, shown
  // once a worker published the follow-up, opens it; its page links back.
  const child = `#job-chain a[href="#/jobs/${job}.then1"]`;
  await page.waitForSelector(child);
  seen.chain = (await page.textContent("#job-chain")).replace(/\s+/g, " ").trim();
  await page.click(child);
  await page.waitForSelector(`#job-chain a[href="#/jobs/${job}"]`);
  seen.follow_up = (await page.textContent("#job-chain")).replace(/\s+/g, " ").trim();

  // An unreadable job: listed as such with what is wrong; its page says so and deletes it.
  const bad = `tr[data-job="${env("BAD_JOB")}"]`;
  await page.goto(url + "#/jobs");
  await page.waitForSelector(`${bad} .state-unreadable`);
  seen.unreadable_row = (await page.textContent(`${bad} td.muted`)).trim();
  await page.click(`${bad} a`);
  await page.waitForSelector("#job-actions button.danger");
  seen.unreadable_page = (await page.textContent(".message.error")).trim();
  await page.click("#job-actions button.danger");
  await page.click("#job-confirm [data-yes]");
  await page.waitForSelector('#job-confirm .message:text("Deleted.")');
  await page.waitForSelector(row);
  seen.unreadable_listed_after = await page.isVisible(bad);

  // Dead letters: the chaos job's are listed; one's records shown; replayed from the page.
  await page.goto(url + "#/dead");
  const group = `tr[data-group="${deadJob}"]`;
  await page.waitForSelector(group);
  const count = Number(await page.textContent(`${group} td.num`));
  seen.dead_count = count;
  await page.click(`[data-show^="${deadJob}:"]`);
  await page.waitForSelector("#d-records pre");
  seen.dead_records = JSON.parse(await page.textContent("#d-records pre")).length;
  await shot(page, "dead");
  await page.click(`[data-replay="${deadJob}"]`);
  await page.click("#d-confirm [data-yes]");
  await page.waitForSelector("#d-confirm .message");
  seen.replay_message = (await page.textContent("#d-confirm .message")).trim();

  // Queues: the work queue with its consumers, and the chart.
  await page.goto(url + "#/queues");
  await page.waitForSelector('tr[data-queue$=".tasks"]');
  // The chart draws the dashboard's own samples (a flat line is zero pixels high: wait for
  // its points, not its visibility).
  await page.waitForFunction(() => {
    const line = document.querySelector("svg.chart polyline");
    return line && line.getAttribute("points").trim().split(" ").length >= 2;
  });
  // The management API refreshes its figures every few seconds: wait for both consumers.
  const consumers = 'tr[data-queue$=".tasks"] td:nth-child(5)';
  await page.waitForFunction(sel => document.querySelector(sel)?.textContent.trim() === "2", consumers)
    .catch(() => {});
  seen.queue_consumers = Number(await page.textContent(consumers));
  await shot(page, "queues");

  // Workers: both alive; the first one stopped shows as gone within seconds.
  await page.goto(url + "#/workers");
  for (const pid of pids) await page.waitForSelector(`tr[data-pid="${pid}"] .state-alive`);
  // Both have stored batches: their latency cell reads "<p99> ms / <in worker> ms".
  for (const pid of pids) {
    await page.waitForFunction((pid) => /^[\d,]+ ms \/ [\d,.]+ ms$/.test(
      document.querySelector(`tr[data-pid="${pid}"] .latency`)?.textContent.trim() || ""), pid);
  }
  seen.latency = (await page.textContent(`tr[data-pid="${pids[1]}"] .latency`)).trim();
  await shot(page, "workers");
  process.kill(pids[0], "SIGTERM");
  await page.waitForSelector(`tr[data-pid="${pids[0]}"] .state-gone`, { timeout: 20_000 });
  seen.gone = (await page.textContent(`tr[data-pid="${pids[0]}"] .status`)).trim();
  seen.still_alive = await page.isVisible(`tr[data-pid="${pids[1]}"] .state-alive`);

  // Schedules: the schedule, its period and its last job, which opens the job.
  const schedule = env("SCHEDULE"), scheduleJob = env("SCHEDULE_JOB");
  await page.goto(url + "#/schedules");
  const srow = `tr[data-schedule="${schedule}"]`;
  await page.waitForSelector(`${srow} .last-job a`);
  seen.schedule_row = (await page.innerText(srow)).replace(/\s+/g, " ").trim();
  seen.schedule_last_job = (await page.textContent(`${srow} .last-job a`)).trim();
  await shot(page, "schedules");
  await page.click(`${srow} .last-job a`);
  await page.waitForFunction(j => location.hash === "#/jobs/" + j, scheduleJob);
  seen.schedule_job_opened = await page.evaluate(() => location.hash);

  // The group page: its jobs, then its chord follow-up once the slow job has ended; the chord's
  // job page leads back to the group.
  await page.goto(url + "#/groups/demo");
  await page.waitForSelector(`#g-table tr[data-job="${job}"]`);
  await page.waitForSelector(`#g-chord a[href="#/jobs/demo.chord"]`, { timeout: 120_000 });
  seen.group_counts = (await page.textContent("#g-counts")).replace(/\s+/g, " ").trim();
  seen.group_chord = (await page.textContent("#g-chord")).replace(/\s+/g, " ").trim();
  await shot(page, "group");
  await page.click(`#g-chord a[href="#/jobs/demo.chord"]`);
  await page.waitForSelector(`#job-chain a[href="#/groups/demo"]`);
  seen.chord_follows = (await page.textContent("#job-chain")).replace(/\s+/g, " ").trim();

  check(!seen.page_errors, "errors in the page: " + seen.page_errors);
  console.log(JSON.stringify(seen));
} finally {
  await browser.close();
}
