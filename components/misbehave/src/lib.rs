//! Test-only component that misbehaves on demand, selected by event type (and
//! by route for queries), so host tests can prove every bound trips and every
//! failure is contained.

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
            // A WASI wait (`poll`) that the epoch trap cannot interrupt.
            "Sleep" => {
                std::thread::sleep(std::time::Duration::from_secs(3600));
                Ok(Vec::new())
            }
            // Buffers 1 MiB writes (or timers) until refused, ignores ten
            // refusals, and returns success.
            "WriteBomb" => {
                let value = vec![7u8; 1 << 20];
                Ok(vec![bomb(key.clone(), |i| host.set(&format!("{key}-{i}"), &value).is_ok())])
            }
            "TimerBomb" => Ok(vec![bomb(key.clone(), |i| {
                host.schedule(&format!("{key}-{i}"), u64::MAX, "Tick", &key, b"{}").is_ok()
            })]),
            // Recurses as deep as the payload says.
            "Recurse" => {
                let depth: u32 =
                    std::str::from_utf8(&event.payload).ok().and_then(|p| p.trim().parse().ok()).unwrap_or(1 << 20);
                let sum = recurse(depth);
                Ok(vec![Outgoing {
                    topic: "out".into(),
                    event_type: "Recursed".into(),
                    key,
                    payload: sum.to_string().into_bytes(),
                }])
            }
            "Hog" => {
                let hog: Vec<u8> = vec![1; 512 * 1024 * 1024];
                Ok(vec![Outgoing { topic: "out".into(), event_type: "Hogged".into(), key, payload: hog[..2].to_vec() }])
            }
            // Emits the event the payload names, `topic:EventType`: the
            // host publishes it only if the component's grant allows it.
            "EmitAs" => {
                let named = String::from_utf8_lossy(&event.payload).trim_matches('"').to_owned();
                let (topic, event_type) = named.split_once(':').unwrap_or(("out", "Unnamed"));
                Ok(vec![Outgoing { topic: topic.into(), event_type: event_type.into(), key, payload: b"{}".to_vec() }])
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
            // How many queries this instance has answered, this one included.
            ["calls"] => {
                static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let calls = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                Response { status: 200, content_type: "text/plain".into(), body: calls.to_string().into_bytes() }
            }
            ["spin"] => loop {
                std::hint::black_box(());
            },
            ["sleep"] => {
                std::thread::sleep(std::time::Duration::from_secs(3600));
                Response::not_found("woke up")
            }
            _ => Response::not_found("unknown route"),
        }
    }
}

/// Makes changes with `change` until ten were refused (or a million made)
/// and reports how many were accepted, if the host lets the call return.
fn bomb(key: String, mut change: impl FnMut(u32) -> bool) -> Outgoing {
    let (mut accepted, mut refused) = (0u32, 0u32);
    for i in 0..1_000_000 {
        if change(i) {
            accepted += 1;
        } else {
            refused += 1;
            if refused == 10 {
                break;
            }
        }
    }
    Outgoing { topic: "out".into(), event_type: "Bombed".into(), key, payload: accepted.to_string().into_bytes() }
}

/// Recursion that cannot be turned into a loop, on the Wasm stack (no
/// locals in linear memory): each frame keeps a few values alive across the
/// call below it.
#[inline(never)]
fn recurse(depth: u32) -> u64 {
    if depth == 0 {
        return 1;
    }
    let d = u64::from(depth);
    let (a, b, c, e) = (d.wrapping_mul(31), d ^ 0x55, d.rotate_left(7), d.wrapping_add(99));
    let below = recurse(depth - 1);
    below ^ (below >> 3) ^ a ^ b.wrapping_mul(c) ^ e
}

shop_sdk::export_service!(Misbehave);
