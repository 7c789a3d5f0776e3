// The waiting room's page in a real browser: node room.mjs <url> <screenshot.png>
//
// Loads the page through Breakwater in headless Chromium (Debian's), checks it with axe-core,
// works the pause control while counting the page's background polls, takes a screenshot,
// then loads it again with JavaScript off. Prints one JSON object; tests/browser.rs asserts on
// it. Every wait is bounded.

import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import puppeteer from "puppeteer-core";

const [url, shot] = process.argv.slice(2);
const require = createRequire(import.meta.url);
const axeSource = readFileSync(require.resolve("axe-core/axe.min.js"), "utf8");
const chromium = process.env.CHROMIUM || "/usr/bin/chromium";

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function axe(page) {
  await page.evaluate(axeSource);
  const r = await page.evaluate(() => window.axe.run(document, { resultTypes: ["violations"] }));
  return r.violations.map((v) => ({ id: v.id, impact: v.impact, nodes: v.nodes.length }));
}

const browser = await puppeteer.launch({
  executablePath: chromium,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  timeout: 30000,
});
const out = {};
try {
  // JavaScript on.
  const page = await browser.newPage();
  await page.setViewport({ width: 800, height: 700 });
  let polls = 0;
  page.on("request", (r) => {
    if ((r.headers()["accept"] || "").includes("application/json")) polls++;
  });
  const resp = await page.goto(url, { waitUntil: "load", timeout: 15000 });
  out.status = resp.status();
  out.title = await page.title();
  out.position = await page.$eval("#position", (e) => e.textContent.trim());
  out.note = await page.$eval("#how", (e) => e.textContent.trim());
  out.violations = await axe(page);
  await page.waitForSelector("#pause:not([hidden])", { timeout: 5000 });
  // Let it poll on its own first (refresh is 1 s in the test's room).
  await sleep(2500);
  out.polls_running = polls;
  await page.click("#pause");
  out.pressed_after_pause = await page.$eval("#pause", (e) => e.getAttribute("aria-pressed"));
  out.label_after_pause = await page.$eval("#pause", (e) => e.textContent.trim());
  const before = polls;
  await sleep(3000);
  out.polls_while_paused = polls - before;
  await page.click("#pause");
  out.pressed_after_resume = await page.$eval("#pause", (e) => e.getAttribute("aria-pressed"));
  const resumed = polls;
  await sleep(2500);
  out.polls_after_resume = polls - resumed;
  out.still_in_line = await page.$eval("#position", (e) => e.textContent.trim());
  await page.screenshot({ path: shot, fullPage: true });
  out.screenshot = shot;

  // JavaScript off: the page says it does not update by itself and offers a reload the
  // waiter turns on (and off again).
  const plain = await browser.newPage();
  await plain.setJavaScriptEnabled(false);
  const refreshOf = () =>
    plain.evaluate(() => {
      const m = document.querySelector('meta[http-equiv="refresh"]');
      return m ? m.getAttribute("content") : null;
    });
  const nojsText = () => plain.$eval("#nojs", (e) => e.textContent.trim());
  await plain.goto(url, { waitUntil: "load", timeout: 15000 });
  out.nojs_refresh = await refreshOf();
  out.nojs_note = await nojsText();
  out.nojs_pause_hidden = await plain.$eval("#pause", (e) => e.hidden);
  out.nojs_how_hidden = await plain.$eval("#how", (e) => e.hidden);
  out.nojs_position = await plain.$eval("#position", (e) => e.textContent.trim());
  await Promise.all([
    plain.waitForNavigation({ waitUntil: "load", timeout: 15000 }),
    plain.click('#nojs a[href*="bw_room_refresh=on"]'),
  ]);
  out.nojs_on_url = plain.url();
  out.nojs_on_refresh = await refreshOf();
  out.nojs_on_note = await nojsText();
  out.nojs_on_position = await plain.$eval("#position", (e) => e.textContent.trim());
  await Promise.all([
    plain.waitForNavigation({ waitUntil: "load", timeout: 15000 }),
    plain.click('#nojs a[href*="bw_room_refresh=off"]'),
  ]);
  out.nojs_off_refresh = await refreshOf();
  await plain.setJavaScriptEnabled(true);
  await plain.goto(url, { waitUntil: "load", timeout: 15000 });
  await plain.setJavaScriptEnabled(false);
  await plain.reload({ waitUntil: "load", timeout: 15000 });
  await plain.setJavaScriptEnabled(true);
  out.nojs_violations = await axe(plain);
} catch (e) {
  out.error = String(e && e.stack ? e.stack : e);
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
