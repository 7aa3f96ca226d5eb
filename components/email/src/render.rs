//! Rendering of the emails: plain text, deterministic.

use shop_events::{EmailKind, EmailRequested};

/// Subject and body of an email.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub subject: String,
    pub body: String,
}

/// Formats integer cents as `12.34`.
pub fn money(cents: u64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

/// Renders the email asked for.
pub fn render(req: &EmailRequested) -> Rendered {
    let short_id: String = req.order_id.chars().take(8).collect();
    let lines: Vec<String> = req
        .items
        .iter()
        .map(|item| {
            format!(
                "  {} x {} @ {} = {}",
                item.quantity,
                item.sku,
                money(item.unit_price_cents),
                money(item.subtotal_cents())
            )
        })
        .collect();
    match req.kind {
        EmailKind::OrderConfirmed => Rendered {
            subject: format!("Your order {short_id} is confirmed"),
            body: format!(
                "Hello {},\n\nThank you for your order {}. Your payment was accepted.\n\n{}\n  Total: {}\n\nThe Shop\n",
                req.customer_name,
                req.order_id,
                lines.join("\n"),
                money(req.total_cents)
            ),
        },
        EmailKind::OrderRejected => Rendered {
            subject: format!("Your order {short_id} could not be completed"),
            body: format!(
                "Hello {},\n\nWe could not complete your order {}: {}.\nYou have not been charged.\n\nThe Shop\n",
                req.customer_name,
                req.order_id,
                req.reason.as_deref().unwrap_or("the payment was declined")
            ),
        },
        EmailKind::OrderCancelled => {
            let reason = req.reason.as_deref().unwrap_or("it could not be completed");
            Rendered {
                subject: format!("Your order {short_id} was cancelled"),
                body: format!(
                    "Hello {},\n\nWe cancelled your order {}: {}.\n{}\n\nThe Shop\n",
                    req.customer_name,
                    req.order_id,
                    reason,
                    money_note(reason)
                ),
            }
        }
    }
}

/// What happened to the money, told from the cancellation reason: an order
/// cancelled for want of stock had been paid and is refunded; one whose
/// payment did not answer in time is voided, so nothing is charged.
fn money_note(reason: &str) -> &'static str {
    if reason.contains("out of stock") || reason.contains("refund") {
        "Your payment has been refunded."
    } else {
        "You have not been charged."
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shop_events::LineItem;

    #[test]
    fn renders_lines_and_totals() {
        let req = EmailRequested {
            order_id: "0123456789".into(),
            kind: EmailKind::OrderConfirmed,
            to: "a@b.c".into(),
            customer_name: "Ada".into(),
            items: vec![LineItem { sku: "pen".into(), quantity: 3, unit_price_cents: 105 }],
            total_cents: 315,
            reason: None,
        };
        let r = render(&req);
        assert_eq!(r.subject, "Your order 01234567 is confirmed");
        assert!(r.body.contains("3 x pen @ 1.05 = 3.15"), "{}", r.body);
        assert!(r.body.contains("Total: 3.15"));
        let rejected =
            render(&EmailRequested { kind: EmailKind::OrderRejected, reason: Some("no funds".into()), ..req.clone() });
        assert!(rejected.body.contains("0123456789: no funds."), "{}", rejected.body);
        let cancel = |reason: &str| {
            render(&EmailRequested { kind: EmailKind::OrderCancelled, reason: Some(reason.into()), ..req.clone() })
        };
        let timed_out = cancel("no answer from payment within 30000 ms");
        assert_eq!(timed_out.subject, "Your order 01234567 was cancelled");
        assert!(timed_out.body.contains("0123456789: no answer from payment within 30000 ms."), "{}", timed_out.body);
        assert!(timed_out.body.contains("You have not been charged."), "{}", timed_out.body);
        let sold_out = cancel("out of stock: pen");
        assert!(sold_out.body.contains("Your payment has been refunded."), "{}", sold_out.body);
        assert!(!sold_out.body.contains("not been charged"), "{}", sold_out.body);
    }
}
