// The email service's logic, against a `host` object (the WIT imports in the
// component, see index.js; a plain object in tests). A port of
// components/email/src/lib.rs: same state keys, same JSON, same events, so
// either build can take over the other's state.
//
// Consumes `emails` (`EmailRequested`); reports `EmailSent` on `analytics`.
// Routes: `GET /emails?order={id}`.

import { render } from './render.js';

/** Default for the `from` config value. */
export const DEFAULT_FROM = 'Shop <orders@shop.example>';
const KINDS = ['order_confirmed', 'order_rejected', 'order_cancelled'];
const U64_MAX = (1n << 64n) - 1n;
const U32_MAX = 2 ** 32 - 1;

/** A WIT `handle-error`, thrown to return `err(...)` from `handle`. */
export class HandleError {
  constructor(tag, message) {
    this.tag = tag;
    this.val = message;
  }

  toString() {
    return `${this.tag}: ${this.val}`;
  }
}

const permanent = (message) => new HandleError('permanent', message);

/**
 * Runs `fn`, turning a WIT `state-error` thrown by an import into a
 * `HandleError` as the Rust SDK does (unavailable: retryable; invalid:
 * permanent). Anything else is a bug and propagates (a trap).
 */
function state(fn) {
  try {
    return fn();
  } catch (err) {
    const payload = err?.payload ?? err;
    if (payload?.tag === 'unavailable') throw new HandleError('retryable', `state unavailable: ${payload.val}`);
    if (payload?.tag === 'invalid') throw new HandleError('permanent', `invalid state access: ${payload.val}`);
    throw err;
  }
}

function field(obj, name, check, what) {
  const value = obj[name];
  if (value === undefined) throw new Error(`missing field \`${name}\``);
  if (!check(value)) throw new Error(`invalid \`${name}\`: expected ${what}`);
  return value;
}

const isString = (v) => typeof v === 'string';
const isU64 = (v) => Number.isInteger(v) && v >= 0 && BigInt(v) <= U64_MAX;
const isU32 = (v) => Number.isInteger(v) && v >= 0 && v <= U32_MAX;

/**
 * Decodes an `EmailRequested` payload as serde does in the Rust service:
 * every field but `reason` required, unknown fields ignored, money as
 * BigInt cents (JSON numbers, so exact up to 2^53).
 */
export function parseRequest(json) {
  const obj = JSON.parse(json);
  if (obj === null || typeof obj !== 'object' || Array.isArray(obj)) throw new Error('expected an object');
  const items = field(obj, 'items', Array.isArray, 'an array').map((item) => {
    if (item === null || typeof item !== 'object') throw new Error('invalid item: expected an object');
    return {
      sku: field(item, 'sku', isString, 'a string'),
      quantity: field(item, 'quantity', isU32, 'a u32'),
      unit_price_cents: BigInt(field(item, 'unit_price_cents', isU64, 'a u64')),
    };
  });
  const reason = obj.reason ?? undefined;
  if (reason !== undefined && !isString(reason)) throw new Error('invalid `reason`: expected a string');
  return {
    order_id: field(obj, 'order_id', isString, 'a string'),
    kind: field(obj, 'kind', (v) => KINDS.includes(v), `one of ${KINDS.join(', ')}`),
    to: field(obj, 'to', isString, 'a string'),
    customer_name: field(obj, 'customer_name', isString, 'a string'),
    items,
    total_cents: BigInt(field(obj, 'total_cents', isU64, 'a u64')),
    reason,
  };
}

/** A stored email, checked and in the Rust struct's field order. */
function toEmail(obj) {
  if (obj === null || typeof obj !== 'object') throw new Error('expected an object');
  return {
    email_id: field(obj, 'email_id', isString, 'a string'),
    order_id: field(obj, 'order_id', isString, 'a string'),
    kind: field(obj, 'kind', (v) => KINDS.includes(v), `one of ${KINDS.join(', ')}`),
    from: field(obj, 'from', isString, 'a string'),
    to: field(obj, 'to', isString, 'a string'),
    subject: field(obj, 'subject', isString, 'a string'),
    body: field(obj, 'body', isString, 'a string'),
    sent_at_ms: field(obj, 'sent_at_ms', isU64, 'a u64'),
  };
}

const encoder = new TextEncoder();
const utf8 = new TextDecoder('utf-8', { fatal: true });
const emailPrefix = (orderId) => `email/${orderId}/`;

/** Handles one event; returns the events to emit or throws a `HandleError`. */
export function handle(host, event) {
  if (event.eventType !== 'EmailRequested') return [];
  let req;
  try {
    req = parseRequest(utf8.decode(event.payload));
  } catch (err) {
    throw permanent(`malformed ${event.eventType} payload in event ${event.id}: ${err.message}`);
  }
  return send(host, req);
}

/**
 * Sends at most one email per order and kind: a redelivered request finds
 * the recorded email and sends nothing.
 */
function send(host, req) {
  const emailId = `${req.order_id}-${req.kind}`;
  const key = `${emailPrefix(req.order_id)}${req.kind}`;
  if (state(() => host.get(key)) !== undefined) {
    host.log('debug', 'email already sent', [['email_id', emailId]]);
    return [];
  }
  const { subject, body } = render(req);
  const email = {
    email_id: emailId,
    order_id: req.order_id,
    kind: req.kind,
    from: host.config('from') ?? DEFAULT_FROM,
    to: req.to,
    subject,
    body,
    sent_at_ms: Number(host.nowMs()),
  };
  state(() => host.set(key, encoder.encode(JSON.stringify(email))));
  host.log('info', 'email sent', [['email_id', emailId], ['to', req.to]]);
  const sent = { order_id: req.order_id, email_id: emailId, kind: req.kind, to: req.to, subject };
  return [{
    topic: 'analytics',
    eventType: 'EmailSent',
    key: req.order_id,
    payload: encoder.encode(JSON.stringify(sent)),
  }];
}

function emailsOf(host, orderId) {
  const emails = [];
  for (const key of state(() => host.listKeys(emailPrefix(orderId), 100))) {
    const bytes = state(() => host.get(key));
    if (bytes === undefined) continue;
    try {
      emails.push(toEmail(JSON.parse(utf8.decode(bytes))));
    } catch (err) {
      throw permanent(`corrupt state at ${JSON.stringify(key)}: ${err.message}`);
    }
  }
  return emails;
}

/** The first value of query parameter `name`, percent-decoded ('+' is a space). */
export function queryParam(query, name) {
  for (const pair of query.split('&')) {
    const eq = pair.indexOf('=');
    const [k, v] = eq < 0 ? [pair, ''] : [pair.slice(0, eq), pair.slice(eq + 1)];
    if (k === name) return percentDecode(v);
  }
  return undefined;
}

function percentDecode(raw) {
  const bytes = encoder.encode(raw);
  const out = [];
  const hex = (b) => parseInt(String.fromCharCode(b), 16);
  for (let i = 0; i < bytes.length; i++) {
    const [hi, lo] = [hex(bytes[i + 1]), hex(bytes[i + 2])];
    if (bytes[i] === 0x2b) out.push(0x20);
    else if (bytes[i] === 0x25 && i + 2 < bytes.length && !Number.isNaN(hi) && !Number.isNaN(lo)) {
      out.push(hi * 16 + lo);
      i += 2;
    } else out.push(bytes[i]);
  }
  return new TextDecoder().decode(new Uint8Array(out));
}

function json(status, value) {
  return { status, contentType: 'application/json', body: encoder.encode(JSON.stringify(value)) };
}

const error = (status, code, message) => json(status, { error: { code, message } });

/** Answers a read-only query on the service's port. */
export function query(host, request) {
  const segments = request.path.split('/').filter((s) => s !== '');
  if (request.method !== 'GET' || segments.length !== 1 || segments[0] !== 'emails') {
    return error(404, 'not_found', 'unknown route; try GET /emails?order={id}');
  }
  const orderId = queryParam(request.query, 'order');
  if (!orderId) return error(400, 'missing_order', 'query parameter `order` is required');
  try {
    return json(200, emailsOf(host, orderId));
  } catch (err) {
    if (err instanceof HandleError) return error(500, 'state_error', err.toString());
    throw err;
  }
}
