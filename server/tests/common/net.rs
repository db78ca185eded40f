//! Loopback TCP ports.

use std::time::Duration;

/// A free loopback port (the agent binds it a moment later).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("binding a loopback port")
        .local_addr()
        .expect("the bound address")
        .port()
}

/// Waits until something accepts connections on 127.0.0.1:`port` (a guard against hanging: it
/// fails after 500 tries 10 ms apart, never passes early).
pub fn wait_tcp(port: u16) {
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("nothing listens on port {port}");
}
