// Drives the live denoising page in headless Chromium (Debian's package) with playwright-core:
// types a prompt, clicks Generate, waits for denoise steps and for the answer to appear, and
// saves a screenshot. Usage: node browser.mjs BASE_URL SCREENSHOT.png
import { chromium } from "playwright-core";

const [base, shot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1100, height: 700 } });
  await page.goto(base + "/");
  await page.fill("#prompt", "The LORD is my shepherd; I shall not want.");
  await page.fill("#max_tokens", "32");
  await page.fill("#steps", "32");
  await page.fill("#block_length", "8");
  await page.click("#go");
  // the canvas shows masks first, then tokens step by step
  await page.waitForFunction(() => document.querySelectorAll("#canvas .tok").length === 32, null, { timeout: 60000 });
  await page.waitForFunction(() => /done in/.test(document.querySelector("#stats").textContent), null, { timeout: 120000 });
  const stats = await page.textContent("#stats");
  const tokens = await page.$$eval("#canvas .tok", (els) => els.filter((e) => !e.classList.contains("mask")).length);
  const answer = await page.textContent("#answer");
  if (!/step \d+ \/ \d+/.test(stats)) throw new Error("no step counter: " + stats);
  if (tokens === 0) throw new Error("no token appeared on the canvas");
  if (/err/.test(await page.innerHTML("#answer"))) throw new Error("page error: " + answer);
  await page.screenshot({ path: shot, fullPage: true });
  // an error message carrying markup (a checkpoint's template error, say) is shown as text
  await page.route("**/v1/chat/completions", (route) => route.fulfill({
    status: 422, contentType: "application/json",
    body: JSON.stringify({ error: { message: '<img id="injected" src="x">template says no', type: "invalid_request_error", param: "messages", code: null } }),
  }));
  await page.click("#go");
  await page.waitForFunction(() => /template says no/.test(document.querySelector("#answer").textContent), null, { timeout: 30000 });
  if (await page.$("#answer img, #injected")) throw new Error("an error message was inserted as HTML");
  if (!(await page.textContent("#answer")).includes('<img id="injected"')) throw new Error("the error text was not shown as is");
  console.log(JSON.stringify({ stats, tokens, answer }));
  console.log("browser: ok");
} finally {
  await browser.close();
}
