//! Email service: renders the confirmation, rejection or cancellation email of
//! an order and records it as sent, once per order and kind.
//!
//! Consumes `emails` (`EmailRequested`); reports `EmailSent` on `analytics`.
//! Routes: `GET /emails?order={id}`. Delivery is recorded, not performed: a
//! mail adapter in the host would be the place for SMTP.

mod render;

pub use render::{Rendered, render};
use serde::{Deserialize, Serialize};
use shop_events::{EmailKind, EmailRequested, EmailSent, topics, types};
use shop_sdk::{Event, HandleError, Host, Level, Outgoing, Request, Response, Service};

/// Default for the `from` config value.
pub const DEFAULT_FROM: &str = "Shop <orders@shop.example>";

/// An email as recorded by the service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Email {
    pub email_id: String,
    pub order_id: String,
    pub kind: EmailKind,
    pub from: String,
    pub to: String,
    pub subject: String,
    pub body: String,
    pub sent_at_ms: u64,
}

/// The email service.
pub struct EmailService;

fn kind_name(kind: EmailKind) -> &'static str {
    match kind {
        EmailKind::OrderConfirmed => "order_confirmed",
        EmailKind::OrderRejected => "order_rejected",
        EmailKind::OrderCancelled => "order_cancelled",
    }
}

fn email_prefix(order_id: &str) -> String {
    format!("email/{order_id}/")
}

impl Service for EmailService {
    fn handle(host: &mut impl Host, event: &Event) -> Result<Vec<Outgoing>, HandleError> {
        match event.event_type.as_str() {
            types::EMAIL_REQUESTED if cfg!(feature = "fail") => {
                Err(HandleError::Permanent(format!("test variant `fail`: refusing email request {}", event.id)))
            }
            types::EMAIL_REQUESTED => send(host, event.payload_json()?),
            _ => Ok(Vec::new()),
        }
    }

    fn query(host: &impl Host, request: &Request) -> Response {
        match (request.method.as_str(), request.segments().as_slice()) {
            ("GET", ["emails"]) => {
                let Some(order_id) = request.query_param("order").filter(|id| !id.is_empty()) else {
                    return Response::error(400, "missing_order", "query parameter `order` is required");
                };
                match emails_of(host, &order_id) {
                    Ok(emails) => Response::json(200, &emails),
                    Err(err) => Response::error(500, "state_error", &err.to_string()),
                }
            }
            _ => Response::not_found("unknown route; try GET /emails?order={id}"),
        }
    }
}

fn emails_of(host: &impl Host, order_id: &str) -> Result<Vec<Email>, HandleError> {
    let mut emails = Vec::new();
    for key in host.list_keys(&email_prefix(order_id), 100)? {
        emails.extend(host.get_json::<Email>(&key)?);
    }
    Ok(emails)
}

/// Sends at most one email per order and kind: a redelivered request finds
/// the recorded email and sends nothing.
fn send(host: &mut impl Host, req: EmailRequested) -> Result<Vec<Outgoing>, HandleError> {
    let email_id = format!("{}-{}", req.order_id, kind_name(req.kind));
    let key = format!("{}{}", email_prefix(&req.order_id), kind_name(req.kind));
    if host.get(&key)?.is_some() {
        host.log(Level::Debug, "email already sent", &[("email_id", &email_id)]);
        return Ok(Vec::new());
    }
    let Rendered { subject, body } = render(&req);
    let from = host.config("from").unwrap_or_else(|| DEFAULT_FROM.to_owned());
    let email = Email {
        email_id: email_id.clone(),
        order_id: req.order_id.clone(),
        kind: req.kind,
        from,
        to: req.to.clone(),
        subject: subject.clone(),
        body,
        sent_at_ms: host.now_ms(),
    };
    host.put_json(&key, &email)?;
    host.log(Level::Info, "email sent", &[("email_id", &email_id), ("to", &req.to)]);
    let sent = EmailSent { order_id: req.order_id.clone(), email_id, kind: req.kind, to: req.to, subject };
    Ok(vec![Outgoing::json(topics::ANALYTICS, types::EMAIL_SENT, &req.order_id, &sent)?])
}

shop_sdk::export_service!(EmailService);
shop_sdk::contract!();

#[cfg(test)]
mod tests {
    use super::*;
    use shop_events::LineItem;
    use shop_sdk::MemoryHost;

    fn request(kind: EmailKind) -> Event {
        let req = EmailRequested {
            order_id: "o1".into(),
            kind,
            to: "ada@example.com".into(),
            customer_name: "Ada".into(),
            items: vec![LineItem { sku: "book".into(), quantity: 2, unit_price_cents: 1250 }],
            total_cents: 2500,
            reason: (kind == EmailKind::OrderRejected).then(|| "the card was declined".into()),
        };
        Event::json("e", topics::EMAILS, types::EMAIL_REQUESTED, "o1", &req)
    }

    #[test]
    fn sends_once_and_is_queryable() {
        let mut host = MemoryHost::at(7).with_config("from", "Test <t@example.com>");
        let out = EmailService::handle(&mut host, &request(EmailKind::OrderConfirmed)).unwrap();
        assert_eq!((out[0].topic.as_str(), out[0].event_type.as_str()), (topics::ANALYTICS, types::EMAIL_SENT));
        assert_eq!(EmailService::handle(&mut host, &request(EmailKind::OrderConfirmed)).unwrap(), vec![]);
        let resp = EmailService::query(&host, &Request::get("/emails?order=o1"));
        let emails: Vec<Email> = resp.body_json().unwrap();
        assert_eq!(emails.len(), 1);
        assert_eq!(emails[0].from, "Test <t@example.com>");
        assert_eq!(emails[0].sent_at_ms, 7);
        assert!(emails[0].subject.contains("confirmed"), "{}", emails[0].subject);
    }

    #[test]
    fn cancellation_is_sent_once_next_to_other_kinds() {
        let mut host = MemoryHost::at(7);
        let mut cancelled = request(EmailKind::OrderCancelled);
        let mut req: EmailRequested = cancelled.payload_json().unwrap();
        req.reason = Some("out of stock: book".into());
        cancelled.payload = serde_json::to_vec(&req).unwrap();
        let out = EmailService::handle(&mut host, &cancelled).unwrap();
        let sent: EmailSent = out[0].payload_json().unwrap();
        assert_eq!((sent.kind, sent.email_id.as_str()), (EmailKind::OrderCancelled, "o1-order_cancelled"));
        assert_eq!(EmailService::handle(&mut host, &cancelled).unwrap(), vec![]);
        EmailService::handle(&mut host, &request(EmailKind::OrderConfirmed)).unwrap();
        let emails: Vec<Email> = EmailService::query(&host, &Request::get("/emails?order=o1")).body_json().unwrap();
        assert_eq!(emails.len(), 2);
        let email = emails.iter().find(|e| e.kind == EmailKind::OrderCancelled).unwrap();
        assert!(email.subject.contains("was cancelled"), "{}", email.subject);
        assert!(email.body.contains("out of stock: book") && email.body.contains("refunded"), "{}", email.body);
    }

    #[test]
    fn query_needs_an_order() {
        let host = MemoryHost::default();
        assert_eq!(EmailService::query(&host, &Request::get("/emails")).status, 400);
        let resp = EmailService::query(&host, &Request::get("/emails?order=none"));
        assert_eq!((resp.status, resp.body.as_slice()), (200, b"[]".as_slice()));
    }
}
