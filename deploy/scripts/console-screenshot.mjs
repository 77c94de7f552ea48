// Takes a screenshot of the RabbitMQ console's Queues page (used for the README).
//   npm install playwright-core && node deploy/scripts/console-screenshot.mjs OUT.png [FILTER]
// Needs Debian's chromium (/usr/bin/chromium) and the management plugin on localhost:15672.
import { chromium } from "playwright-core";

const out = process.argv[2] ?? "queues.png";
const filter = process.argv[3] ?? "";
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: 1400, height: 720 } });
await page.goto("http://localhost:15672/");
await page.fill('input[name="username"]', "guest");
await page.fill('input[name="password"]', "guest");
await page.click('input[type="submit"]');
await page.waitForSelector("#logout");
await page.goto("http://localhost:15672/#/queues");
await page.waitForSelector("table.list");
if (filter) {
  await page.fill("input#filter, input[name=filter], .filter input", filter);
  await page.press("input#filter, input[name=filter], .filter input", "Enter");
}
await page.waitForTimeout(1500);
await page.screenshot({ path: out });
await browser.close();
