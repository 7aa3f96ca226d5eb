// Places orders in the frontend served by the gateway, in headless Chromium,
// and waits for their final status. The host must be running; GATEWAY_URL
// names it (scripts/browser-test.sh starts one).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const GATEWAY = process.env.GATEWAY_URL ?? "http://127.0.0.1:3005";
let browser;

before(async () => {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run"],
  });
});

after(async () => { await browser?.close(); });

test("an order placed in the page reaches CONFIRMED", async () => {
  const page = await browser.newPage();
  await page.goto(GATEWAY);
  await page.fill("#name", "Katherine Johnson");
  await page.fill("#email", "katherine@example.com");
  await page.click("#add-item");
  await page.click("#submit");
  await page.waitForFunction(() => document.querySelector("#order-status")?.textContent === "CONFIRMED",
    null, { timeout: 30_000 });
  const steps = await page.$$eval("#history li", els => els.map(e => e.textContent));
  assert.equal(steps.length, 4, steps.join(" | "));
  assert.match(steps[0], /^PENDING/);
  assert.match(steps[1], /authorized/);
  assert.match(steps[2], /^STOCK_RESERVED/);
  assert.match(steps[3], /^CONFIRMED/);
  await page.screenshot({ path: process.env.SCREENSHOT ?? "/tmp/shop-order.png" });
});

test("a 503 is retried with the same Idempotency-Key and the order goes through", async () => {
  const page = await browser.newPage();
  const keys = [];
  // The first try meets the gateway as it answers while the broker is down.
  await page.route("**/order", async route => {
    keys.push(route.request().headers()["idempotency-key"]);
    if (keys.length === 1) {
      await route.fulfill({
        status: 503,
        headers: { "retry-after": "1", "content-type": "application/json" },
        body: JSON.stringify({ error: { code: "unavailable", message: "the message broker is unreachable" } }),
      });
    } else {
      await route.continue();
    }
  });
  await page.goto(GATEWAY);
  await page.fill("#name", "Grace Hopper");
  await page.fill("#email", "grace@example.com");
  await page.click("#submit");
  await page.waitForFunction(() => document.querySelector("#order-status")?.textContent === "CONFIRMED",
    null, { timeout: 30_000 });
  assert.equal(keys.length, 2, `tries: ${keys.length}`);
  assert.ok(keys[0] && keys[0] === keys[1], `the retry reuses the key: ${keys}`);
  assert.equal(await page.textContent("#form-error"), "");
});

test("more lamps than in stock: paid, refunded, CANCELLED", async () => {
  const page = await browser.newPage();
  await page.goto(GATEWAY);
  await page.selectOption("#items .item:first-child .sku", "lamp");
  // The products, prices and stock come from GET /catalog (the order service's).
  assert.equal(await page.textContent("#items .item:first-child option[value=lamp]"), "Lamp — 34.00 (3 left)");
  await page.fill("#items .item:first-child .quantity", "4"); // app.toml stocks 3
  await page.click("#submit");
  await page.waitForFunction(() => document.querySelector("#order-status")?.textContent === "CANCELLED",
    null, { timeout: 30_000 });
  const steps = await page.$$eval("#history li", els => els.map(e => e.textContent));
  assert.ok(steps.some(s => s.startsWith("COMPENSATING")), steps.join(" | "));
  assert.match(steps.at(-1), /^CANCELLED/);
});

test("a declined card ends REJECTED", async () => {
  const page = await browser.newPage();
  await page.goto(GATEWAY);
  await page.selectOption("#card-preset", "4000 0000 0000 0002");
  await page.click("#submit");
  await page.waitForFunction(() => document.querySelector("#order-status")?.textContent === "REJECTED",
    null, { timeout: 30_000 });
});

test("invalid fields are shown next to the fields and nothing is placed", async () => {
  const page = await browser.newPage();
  await page.goto(GATEWAY);
  await page.fill("#email", "nope");
  await page.fill("#card", "1234");
  await page.fill(".quantity", "0");
  await page.click("#submit");
  const error = field => page.locator(`.error[data-for="${field}"]`);
  await error("customer.email").getByText("email address").waitFor({ timeout: 10_000 });
  assert.match(await error("payment.card_number").textContent(), /12 to 19 digits/);
  assert.match(await error("items[0].quantity").textContent(), /between 1 and 1000/);
  assert.equal(await page.locator("#status").isHidden(), true);
});

test("event text with markup in the history is shown as text, never parsed", async () => {
  const page = await browser.newPage();
  await page.goto(GATEWAY);
  // scripts/browser-test.sh stocks 0 of the SKU "<b>bold</b>": the order
  // is cancelled with the note "out of stock: <b>bold</b>".
  const id = await page.evaluate(async () => {
    const r = await fetch("/order", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        customer: { name: "Ada", email: "ada@example.com" },
        items: [{ sku: "<b>bold</b>", quantity: 1, unit_price_cents: 100 }],
        payment: { card_number: "4242424242424242" },
      }),
    });
    const body = await r.json();
    follow(body.order_id);
    return body.order_id;
  });
  await page.waitForFunction(() => document.querySelector("#order-status")?.textContent === "CANCELLED",
    null, { timeout: 30_000 });
  assert.equal(await page.textContent("#order-id"), id);
  const history = await page.textContent("#history");
  assert.ok(history.includes("out of stock: <b>bold</b>"), history);
  assert.equal(await page.$$eval("#history b", els => els.length), 0, "no element made from event text");
  // Catalog names are text too (scripts/browser-test.sh names it "<i>Bold</i>").
  const names = await page.$$eval("#items option", els => els.map(e => e.textContent));
  assert.ok(names.some(n => n.startsWith("<i>Bold</i> — 1.00")), names.join(" | "));
  assert.equal(await page.$$eval("#items i", els => els.length), 0, "no element made from catalog text");
});
