// Drives Debian's chromium through playwright-core for tests/test_web_panel.py (never downloads a browser).
// Protocol: one JSON command per stdin line {id, op, ...}; one JSON reply per stdout line {id, ok, value|error}.
//   goto {url, width, height}   open a fresh page (the previous one is closed)
//   eval {expr}                 evaluate an expression (promises are awaited), return its JSON value
//   wait {expr, timeout}        wait until the expression is truthy
//   click {selector}            click (also checks the element is visible and enabled)
//   hover {selector, x, y}      move the mouse over an element at (x, y) inside it
//   key {key}                   press a key on the focused element
//   screenshot {path, selector} PNG of the page or one element
//   errors {}                   page errors and console errors since the page opened
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const browser = await chromium.launch({
  executablePath,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--autoplay-policy=no-user-gesture-required",
    "--mute-audio"],
});
let page = null;
let errors = [];

async function run(cmd) {
  switch (cmd.op) {
    case "goto": {
      if (page) await page.close();
      errors = [];
      page = await browser.newPage({ viewport: { width: cmd.width || 1280, height: cmd.height || 900 } });
      page.on("pageerror", (e) => errors.push(`pageerror: ${e.message}`));
      page.on("console", (m) => { if (m.type() === "error") errors.push(`console: ${m.text()}`); });
      await page.goto(cmd.url);
      return null;
    }
    case "eval":
      return await page.evaluate(cmd.expr);
    case "wait":
      await page.waitForFunction(cmd.expr, null, { timeout: cmd.timeout || 10000, polling: 50 });
      return null;
    case "click":
      await page.click(cmd.selector, { timeout: cmd.timeout || 10000 });
      return null;
    case "hover": {
      const box = await page.locator(cmd.selector).first().boundingBox();
      await page.mouse.move(box.x + cmd.x, box.y + cmd.y);
      return null;
    }
    case "key":
      await page.keyboard.press(cmd.key);
      return null;
    case "screenshot":
      if (cmd.selector) await page.locator(cmd.selector).first().screenshot({ path: cmd.path });
      else await page.screenshot({ path: cmd.path, fullPage: !!cmd.fullPage });
      return null;
    case "errors":
      return errors;
    default:
      throw new Error(`unknown op ${cmd.op}`);
  }
}

const lines = createInterface({ input: process.stdin });
process.stdout.write(JSON.stringify({ id: 0, ok: true, value: browser.version() }) + "\n");
for await (const line of lines) {
  if (!line.trim()) continue;
  const cmd = JSON.parse(line);
  let reply;
  try {
    reply = { id: cmd.id, ok: true, value: (await run(cmd)) ?? null };
  } catch (e) {
    reply = { id: cmd.id, ok: false, error: String(e && e.stack ? e.stack : e) };
  }
  process.stdout.write(JSON.stringify(reply) + "\n");
}
await browser.close();
