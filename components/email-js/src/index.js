// The component's entry point: binds the WIT imports of
// shop:service/service@0.2.0 to the `host` object email.js is written
// against, and exports the world's `handle` and `query`.
//
// componentize-js conventions: u64 is a BigInt, list<u8> a Uint8Array,
// option<T> a value or undefined, a variant `{ tag, val }`; an import that
// returns `err(e)` throws an error whose `payload` is `e`; an export
// returning a result returns the `ok` value or throws the `err` value.

import { get, set, listKeys } from 'shop:service/state@0.2.0';
import { log } from 'shop:service/log@0.2.0';
import { nowMs } from 'shop:service/clock@0.2.0';
import { get as configGet } from 'shop:service/config@0.2.0';
import * as email from './email.js';

const host = {
  get,
  set,
  listKeys,
  nowMs,
  config: configGet,
  log,
};

export function handle(event) {
  return email.handle(host, event);
}

export function query(request) {
  return email.query(host, request);
}
