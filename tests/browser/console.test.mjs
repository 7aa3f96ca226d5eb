// The admin console in headless Chromium: an order placed through the
// gateway shows with its saga timeline, the manifest's components with
// their versions, a reload adds to a component's history, and a shadow run
// started from the page shows its differences and stops. The host must
// be running with an admin token; GATEWAY_URL, ADMIN_URL and ADMIN_TOKEN name
// them, COMPONENTS the manifest's component names, comma-separated
// (scripts/browser-test.sh starts one and reads its manifest).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const GATEWAY = process.env.GATEWAY_URL ?? "http://127.0.0.1:3005";
const ADMIN = process.env.ADMIN_URL ?? "http://127.0.0.1:3090";
const TOKEN = process.env.ADMIN_TOKEN;
// Where an undecodable record is put to make a dead letter (needs kcat).
const BROKERS = process.env.KAFKA_BROKERS;
const ORDERS_TOPIC = process.env.ORDERS_TOPIC;
// The shop's four unless the manifest has more (`just new-service`).
const COMPONENTS = (process.env.COMPONENTS ?? "analytics,email,order,payment").split(",").sort();
// The shadow run's candidate: payment built with `--features v2` (`just
// build-test-components`), which declines the card v1 accepts.
const PAYMENT_V2 = process.env.PAYMENT_V2_WASM ??
  fileURLToPath(new URL("../../target/wasm32-wasip2/release/payment-v2.wasm", import.meta.url));
const MASTERCARD = "5555555555554444";
const SCREENSHOT = process.env.CONSOLE_SCREENSHOT ?? "/tmp/shop-console.png";
let browser;

before(async () => {
  assert.ok(TOKEN, "ADMIN_TOKEN must be set");
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run"],
  });
});

after(async () => { await browser?.close(); });

async function placeOrder(sku = "pen", card = "4242424242424242") {
  const r = await fetch(`${GATEWAY}/order`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({
      customer: { name: "Margaret Hamilton", email: "margaret@example.com" },
      items: [{ sku, quantity: 1 }], // priced by the shop's catalog
      payment: { card_number: card },
    }),
  });
  assert.equal(r.status, 202);
  return (await r.json()).order_id;
}

async function openConsole(page) {
  const requests = [];
  page.on("request", req => requests.push(req.url()));
  await page.goto(`${ADMIN}/console`);
  await page.fill("#token", TOKEN);
  await page.click("#connect");
  return requests;
}

test("the console shows components, an order's timeline, and a reload in the history", async () => {
  const id = await placeOrder();
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const requests = await openConsole(page);

  // The manifest's components, each with a version.
  await page.waitForFunction(n => document.querySelectorAll("#components tr").length === n, COMPONENTS.length,
    { timeout: 15_000 });
  const components = await page.$$eval("#components tr", trs => trs.map(tr =>
    [tr.dataset.component, tr.querySelector(".version").textContent, tr.querySelector(".status").textContent]));
  assert.deepEqual(components.map(c => c[0]), COMPONENTS);
  for (const [name, version, status] of components) {
    assert.match(version, /^[0-9a-f]{12}$/, name);
    assert.equal(status, "ok", name);
  }

  // The topology: who publishes each event type on each topic, and who gets it.
  const flow = await page.$eval('#topology tr[data-topic="orders"][data-type="OrderPlaced"]', tr =>
    [tr.querySelector(".publishers").textContent, tr.querySelector(".consumers").textContent]);
  assert.deepEqual(flow, ["gateway", "analytics, order"]);
  const answers = await page.$eval('#topology tr[data-topic="payments"][data-type="PaymentAuthorized"] .publishers',
    td => td.textContent);
  assert.equal(answers, "payment");

  // The order, updated live to its end, with its timeline.
  const row = `#orders tr[data-order="${id}"]`;
  await page.waitForFunction(sel => document.querySelector(`${sel} .order-status`)?.textContent === "CONFIRMED",
    row, { timeout: 30_000 });
  const steps = await page.$$eval(`${row} .timeline li`, els => els.map(e => e.textContent));
  assert.equal(steps.length, 4, steps.join(" | "));
  assert.match(steps[0], /^PENDING/);
  assert.match(steps[3], /^CONFIRMED/);

  // A reload re-reads the file: the history grows by one.
  const count = () => page.$eval('#components tr[data-component="payment"] .history summary', s => Number(s.textContent));
  const before = await count();
  await page.click('#components tr[data-component="payment"] button.reload');
  await page.waitForFunction(n => Number(document.querySelector(
    '#components tr[data-component="payment"] .history summary')?.textContent) === n + 1, before, { timeout: 15_000 });
  assert.equal(await page.textContent("#action-error"), "");
  await page.click('#components tr[data-component="payment"] .history summary');
  const outcomes = await page.$$eval('#components tr[data-component="payment"] .history li', els => els.map(e => e.textContent));
  assert.match(outcomes.at(-1), /serving/);
  assert.match(outcomes.at(-2), /replaced/);

  // Roll back serves the replaced version again (the same bytes here): the
  // history says so, and nothing is left to roll back to.
  const rollback = '#components tr[data-component="payment"] button.rollback';
  assert.equal(await page.$eval(rollback, b => b.disabled), false);
  await page.click(rollback);
  await page.waitForFunction(n => Number(document.querySelector(
    '#components tr[data-component="payment"] .history summary')?.textContent) === n + 2, before, { timeout: 15_000 });
  assert.equal(await page.textContent("#action-error"), "");
  const rolled = await page.$$eval('#components tr[data-component="payment"] .history li', els => els.map(e => e.textContent));
  assert.match(rolled.at(-1), /serving .*— rollback from [0-9a-f]{64}$/);
  assert.match(rolled.at(-2), /rolled back by an operator/);
  await page.waitForFunction(sel => document.querySelector(sel)?.disabled === true, rollback, { timeout: 15_000 });

  // The token travels in a header only.
  assert.ok(requests.every(u => !u.includes(TOKEN)), "no URL carries the token");
  await page.screenshot({ path: SCREENSHOT, fullPage: true });
});

test("event text with markup is shown as text in the timeline", async () => {
  // scripts/browser-test.sh stocks 0 of "<b>bold</b>": cancelled with "out of stock: <b>bold</b>".
  const id = await placeOrder("<b>bold</b>");
  const page = await browser.newPage();
  await openConsole(page);
  const row = `#orders tr[data-order="${id}"]`;
  await page.waitForFunction(sel => document.querySelector(`${sel} .order-status`)?.textContent === "CANCELLED",
    row, { timeout: 30_000 });
  const timeline = await page.textContent(`${row} .timeline`);
  assert.ok(timeline.includes("out of stock: <b>bold</b>"), timeline);
  assert.equal(await page.$$eval("#orders b", els => els.length), 0, "no element made from event text");
});

test("a wrong token is refused and the page asks again", async () => {
  const page = await browser.newPage();
  await page.goto(`${ADMIN}/console`);
  await page.fill("#token", "not-the-token-at-all");
  await page.click("#connect");
  await page.getByText("The token was refused.").waitFor({ timeout: 10_000 });
  assert.equal(await page.locator("#main").isHidden(), true);
});

function hasKcat() {
  try { execFileSync("kcat", ["-V"], { stdio: "ignore" }); return true; } catch { return false; }
}

test("a dead letter shows with its reason and is replayed from the page", {
  skip: !(BROKERS && ORDERS_TOPIC && hasKcat()) && "needs KAFKA_BROKERS, ORDERS_TOPIC and kcat",
}, async () => {
  const key = `console-dlq-${Date.now()}`;
  // Not an envelope: set aside at once by each consumer of the topic.
  execFileSync("kcat", ["-P", "-b", BROKERS, "-t", ORDERS_TOPIC, "-k", key], { input: "<i>not an envelope</i>" });
  const page = await browser.newPage();
  await openConsole(page);
  await page.waitForFunction(() => [...document.querySelectorAll("#dead-letters tr")]
    .some(tr => tr.querySelector("button.replay")), null, { timeout: 30_000 });
  const row = page.locator("#dead-letters tr", { has: page.locator("button.replay") }).first();
  const id = await row.getAttribute("data-id");
  assert.notEqual((await row.locator(".reason").textContent()).trim(), "", "a reason is shown");
  await row.locator("button.replay").click();
  await page.waitForFunction(i => document.querySelector(`#dead-letters tr[data-id="${i}"] td:last-child`)
    ?.textContent === "replayed", id, { timeout: 15_000 });
  assert.equal(await page.textContent("#action-error"), "");
  assert.equal(await page.$$eval("#dead-letters i", els => els.length), 0, "no element made from record text");
});

test("a shadow run uploaded from the page shows the candidate's differences and stops", async () => {
  const candidate = readFileSync(PAYMENT_V2);
  const sha = createHash("sha256").update(candidate).digest("hex");
  const page = await browser.newPage({ viewport: { width: 1280, height: 1100 } });
  await openConsole(page);
  const upload = '#components tr[data-component="payment"]';
  await page.waitForSelector(`${upload} input.shadow-file`, { timeout: 15_000 });
  // The file input is kept across the table's updates: the choice stays.
  await page.setInputFiles(`${upload} input.shadow-file`, PAYMENT_V2);
  await page.click(`${upload} button.shadow-start`);
  const panel = '#shadows .shadow[data-component="payment"]';
  await page.waitForFunction(sel => document.querySelector(`${sel} .shadow-state`)?.textContent === "running",
    panel, { timeout: 15_000 });
  assert.equal(await page.textContent("#action-error"), "");
  assert.equal(await page.getAttribute(`${panel} .candidate-version`, "title"), sha, "the uploaded file is the candidate");

  // v1 (serving) authorizes this card, v2 declines it: the order is
  // confirmed, and the panel shows the difference, field by field.
  const id = await placeOrder("pen", MASTERCARD);
  await page.waitForFunction(([sel, order]) => {
    const differing = Number(document.querySelector(`${sel} .counts-events .differing`)?.textContent);
    const paths = [...document.querySelectorAll(`${sel} .difference .change .path`)].map(p => p.textContent);
    return differing >= 1 && paths.includes("outputs[0].type")
      && document.querySelector(`#orders tr[data-order="${order}"] .order-status`)?.textContent === "CONFIRMED";
  }, [panel, id], { timeout: 30_000 });
  const change = await page.$$eval(`${panel} .difference .change`, els =>
    els.map(e => e.textContent).find(t => t.startsWith("outputs[0].type:")));
  assert.equal(change, 'outputs[0].type: "PaymentAuthorized" → "PaymentDeclined"');
  const differences = await page.$$eval(`${panel} .difference`, els => els.map(e => e.textContent));
  assert.ok(differences.some(d => d.includes(`of order ${id}`)), differences.join(" | "));
  // Side by side, per event: both versions ran, so both have a time.
  for (const side of ["serving", "candidate"]) {
    assert.match(await page.textContent(`${panel} .shadow-cost .time .${side}`), /^\d+ µs$/, side);
    assert.match(await page.textContent(`${panel} .shadow-cost .cpu .${side}`), /^\d+ µs$/, side);
  }
  await page.screenshot({ path: SCREENSHOT.replace(/(\.png)?$/, "-shadow.png"), fullPage: true });

  await page.click(`${panel} button.shadow-stop`);
  await page.waitForFunction(sel => document.querySelector(`${sel} .shadow-state`)?.textContent
    === "ended: stopped by an operator", panel, { timeout: 15_000 });
  assert.equal(await page.textContent("#shadow-error"), "");
  assert.equal(await page.$eval(`${panel} button.shadow-stop`, b => b.disabled), true, "nothing left to stop");
});
