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
  // the page names the model and starts from the server's own defaults (/health)
  await page.waitForFunction(() => document.body.dataset.ready === "1", null, { timeout: 30000 });
  const health = await (await fetch(base + "/health")).json();
  const model = await page.textContent("#model");
  if (model !== health.model) throw new Error(`model name ${model}, /health says ${health.model}`);
  if (await page.inputValue("#max_tokens") !== String(health.defaults.max_tokens)) throw new Error("max_tokens is not the server's default");
  if (await page.inputValue("#cache") !== health.defaults.cache) throw new Error("cache is not the server's default");
  const legend = await page.textContent("#legend");
  for (const w of ["masked", "committed this step", "padding"]) if (!legend.includes(w)) throw new Error("legend lacks " + w);
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
  if (!/\d+ answer tokens?\b.*answer tokens\/s/.test(stats)) throw new Error("no answer tokens/s: " + stats);
  if (tokens === 0) throw new Error("no token appeared on the canvas");
  // after an early stop the positions left masked are shown as the padding they became
  if (await page.$$eval("#canvas .mask", (els) => els.length)) throw new Error("masks left on the canvas after done: " + stats);
  if (/err/.test(await page.innerHTML("#answer"))) throw new Error("page error: " + answer);
  await page.screenshot({ path: shot, fullPage: true });
  // an empty answer is said, with its reason, instead of showing nothing
  const sse = (ev, d) => (ev ? `event: ${ev}\n` : "") + `data: ${JSON.stringify(d)}\n\n`;
  await page.route("**/v1/chat/completions", (route) => route.fulfill({
    status: 200, contentType: "text/event-stream",
    body: sse("denoise", { step: 1, total_steps: 1, block: 0, nfe: 1, tokens: ["<|eot_id|>"], committed: [0], masked: 0, elapsed: 0.1 })
      + sse("done", { nfe: 1, seconds: 0.1, text: "", answer_tokens: 0, tokens_per_s: 0, empty_reason: "the model ended the answer at once (EOS first)" })
      + "data: [DONE]\n\n",
  }));
  await page.click("#go");
  await page.waitForFunction(() => /empty answer/.test(document.querySelector("#answer").textContent), null, { timeout: 30000 });
  if (!(await page.textContent("#answer")).includes("EOS first")) throw new Error("the empty answer's reason is not shown");
  await page.screenshot({ path: shot.replace(/\.png$/, "-empty.png"), fullPage: true });
  await page.unroute("**/v1/chat/completions");
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
