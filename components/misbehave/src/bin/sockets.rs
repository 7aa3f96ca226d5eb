//! A service that opens a TCP socket, so it imports `wasi:sockets/*`: the
//! host must refuse it at load time, since no component is granted sockets.
//! (A binary of its own: the `misbehave` library must stay loadable.)

use shop_sdk::{Event, HandleError, Host, Outgoing, Request, Response, Service};

// Exported only on wasm32 (see `export_service!`).
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
struct Sockets;

impl Service for Sockets {
    fn handle(_host: &mut impl Host, _event: &Event) -> Result<Vec<Outgoing>, HandleError> {
        match std::net::TcpStream::connect("127.0.0.1:9092") {
            Ok(_) => Err(HandleError::Permanent("connected: the host granted a socket".into())),
            Err(err) => Err(HandleError::Permanent(format!("no socket: {err}"))),
        }
    }

    fn query(_host: &impl Host, _request: &Request) -> Response {
        Response::not_found("unknown route")
    }
}

shop_sdk::export_service!(Sockets);

fn main() {}
