// The __NAME__ service: handles the events of its topic `__NAME__` and
// counts them by type in its state; `GET /events` answers the counts.
// Written by `just new-service __NAME__ --lang js` as a starting point
// (components/email-js is a fuller example).
//
// componentize-js conventions: u64 is a BigInt, list<u8> a Uint8Array,
// option<T> a value or undefined, a variant `{ tag, val }`; an import that
// returns `err(e)` throws an error whose `payload` is `e`; an export
// returning a result returns the `ok` value or throws the `err` value.

import { get, set } from 'shop:service/state@0.2.0';

const COUNTS_KEY = 'counts';
const encoder = new TextEncoder();
const decoder = new TextDecoder('utf-8', { fatal: true });

/** A WIT `handle-error`, thrown to return `err(...)` from `handle`. */
class HandleError {
  constructor(tag, message) {
    this.tag = tag;
    this.val = message;
  }
}

/** Runs a state call, turning a WIT `state-error` into a `HandleError`. */
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

function counts() {
  const bytes = state(() => get(COUNTS_KEY));
  return bytes === undefined ? { handled: 0, by_type: {}, last_event_id: null } : JSON.parse(decoder.decode(bytes));
}

function json(status, value) {
  return { status, contentType: 'application/json', body: encoder.encode(JSON.stringify(value)) };
}

/** Handles one event; returns the events to publish (granted by the manifest's `publishes`). */
export function handle(event) {
  if (event.topic === 'timer') return [];
  const now = counts();
  now.handled += 1;
  now.by_type[event.eventType] = (now.by_type[event.eventType] ?? 0) + 1;
  now.last_event_id = event.id;
  state(() => set(COUNTS_KEY, encoder.encode(JSON.stringify(now))));
  return [];
}

/** Answers a read-only query on the service's port. */
export function query(request) {
  const segments = request.path.split('/').filter((s) => s !== '');
  if (request.method !== 'GET' || segments.length !== 1 || segments[0] !== 'events') {
    return json(404, { error: { code: 'not_found', message: 'unknown route; try GET /events' } });
  }
  try {
    return json(200, counts());
  } catch (err) {
    if (err instanceof HandleError) return json(500, { error: { code: 'state_error', message: err.val } });
    throw err;
  }
}
