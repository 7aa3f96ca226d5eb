//! Test-only component that misbehaves on demand, selected by event type, so
//! host tests can prove every bound trips and every failure is contained.

use shop_sdk::{Event, HandleError, Host, Outgoing, Request, Response, Service};

/// The misbehaving service.
pub struct Misbehave;

impl Service for Misbehave {
    fn handle(host: &mut impl Host, event: &Event) -> Result<Vec<Outgoing>, HandleError> {
        let key = event.key.clone().unwrap_or_default();
        match event.event_type.as_str() {
            "Panic" => panic!("asked to panic"),
            "Spin" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "Hog" => {
                let hog: Vec<u8> = vec![1; 512 * 1024 * 1024];
                Ok(vec![Outgoing { topic: "out".into(), event_type: "Hogged".into(), key, payload: hog[..2].to_vec() }])
            }
            "WriteThenFail" => {
                host.set(&key, b"written")?;
                Err(HandleError::Retryable("failing after a write".into()))
            }
            _ => {
                host.set(&key, &event.payload)?;
                Ok(vec![Outgoing {
                    topic: "out".into(),
                    event_type: "Echoed".into(),
                    key,
                    payload: event.payload.clone(),
                }])
            }
        }
    }

    fn query(host: &impl Host, request: &Request) -> Response {
        match request.segments().as_slice() {
            ["state", key] => match host.get(key) {
                Ok(Some(value)) => {
                    Response { status: 200, content_type: "application/octet-stream".into(), body: value }
                }
                Ok(None) => Response::not_found("no such key"),
                Err(err) => Response::error(500, "state", &format!("{err:?}")),
            },
            _ => Response::not_found("unknown route"),
        }
    }
}

shop_sdk::export_service!(Misbehave);
