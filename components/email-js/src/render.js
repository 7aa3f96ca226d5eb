// Rendering of the emails: plain text, deterministic. A port of
// components/email/src/render.rs; both must render the same bytes.

const U64_MAX = (1n << 64n) - 1n;

/** Formats integer cents (a BigInt) as `12.34`. */
export function money(cents) {
  return `${cents / 100n}.${String(cents % 100n).padStart(2, '0')}`;
}

/** `quantity × unit price`, saturating at u64::MAX like the Rust service. */
export function subtotalCents(item) {
  const product = BigInt(item.quantity) * item.unit_price_cents;
  return product > U64_MAX ? U64_MAX : product;
}

/** The first `n` characters (Unicode scalar values, as Rust's `chars()`). */
function firstChars(text, n) {
  return Array.from(text).slice(0, n).join('');
}

/**
 * What happened to the money, told from the cancellation reason: an order
 * cancelled for want of stock had been paid and is refunded; one whose
 * payment did not answer in time is voided, so nothing is charged.
 */
function moneyNote(reason) {
  return reason.includes('out of stock') || reason.includes('refund')
    ? 'Your payment has been refunded.'
    : 'You have not been charged.';
}

/** Subject and body of the email asked for (`req` as `parseRequest` made it). */
export function render(req) {
  const shortId = firstChars(req.order_id, 8);
  const lines = req.items
    .map((item) =>
      `  ${item.quantity} x ${item.sku} @ ${money(item.unit_price_cents)} = ${money(subtotalCents(item))}`)
    .join('\n');
  switch (req.kind) {
    case 'order_confirmed':
      return {
        subject: `Your order ${shortId} is confirmed`,
        body: `Hello ${req.customer_name},\n\nThank you for your order ${req.order_id}. ` +
          `Your payment was accepted.\n\n${lines}\n  Total: ${money(req.total_cents)}\n\nThe Shop\n`,
      };
    case 'order_rejected':
      return {
        subject: `Your order ${shortId} could not be completed`,
        body: `Hello ${req.customer_name},\n\nWe could not complete your order ${req.order_id}: ` +
          `${req.reason ?? 'the payment was declined'}.\nYou have not been charged.\n\nThe Shop\n`,
      };
    default: {
      const reason = req.reason ?? 'it could not be completed';
      return {
        subject: `Your order ${shortId} was cancelled`,
        body: `Hello ${req.customer_name},\n\nWe cancelled your order ${req.order_id}: ${reason}.\n` +
          `${moneyNote(reason)}\n\nThe Shop\n`,
      };
    }
  }
}
