//! A fault-injecting HTTP proxy on 127.0.0.1 in front of the local S3 server.
//!
//! Plain TCP forwarding with just enough HTTP parsing to count requests and find where a
//! response body starts. Every connection carries one request: the proxy asks the server to
//! close after answering (`Connection: close`) and tells the client the same, so a response
//! body ends where the server's connection ends and no body framing needs parsing. A test
//! switches the [`Fault`] at runtime through [`FaultProxy::set`]; a request gets the fault in
//! force when its connection is accepted.
//!
//! Threads, not async: the proxy serves child processes as well as the test, from any context.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the proxy does to the requests it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything unchanged.
    PassThrough,
    /// Close every connection at once, before reading anything.
    Outage,
    /// Answer the next `n` requests with HTTP 503 and an S3 `SlowDown` error body, without
    /// forwarding them; then pass through.
    Status503Burst(u32),
    /// Forward, but cut the connection after `after` bytes of a response body longer than that,
    /// on one such response in `every` (the first, then every `every`th).
    ResetMidBody { after: u64, every: u32 },
    /// Accept, read, never answer.
    Stall,
    /// Forward, with response bodies limited to this many bytes a second.
    Throttle(u64),
}

/// Counts of what the proxy did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Requests (or connections, for `Outage` and `Stall`) seen.
    pub requests: u64,
    /// Connections closed at once (`Outage`).
    pub refused: u64,
    /// 503 answers sent.
    pub status_503: u64,
    /// Response bodies cut short.
    pub resets: u64,
    /// Connections left without an answer.
    pub stalled: u64,
    /// Response bodies throttled.
    pub throttled: u64,
    /// Response body bytes passed on to clients.
    pub body_bytes: u64,
}

impl FaultStats {
    /// Faults injected: everything but plain forwarding.
    pub fn injected(&self) -> u64 {
        self.refused + self.status_503 + self.resets + self.stalled + self.throttled
    }
}

struct Shared {
    upstream: SocketAddr,
    fault: Mutex<Fault>,
    /// Responses eligible for `ResetMidBody` since the mode was set.
    eligible: AtomicU64,
    stats: Mutex<FaultStats>,
    stop: AtomicBool,
    /// Bumped by [`FaultProxy::cut_open_bodies`]: bodies started before are cut.
    cut_generation: AtomicU64,
    /// Bumped by [`FaultProxy::stall_open_bodies`]: bodies started before go silent.
    stall_generation: AtomicU64,
    body_bytes: AtomicU64,
}

/// The running proxy; stops accepting when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

/// How long any proxy socket waits for the other side before giving up (a bound on the
/// proxy's threads, far above any test's own bounds).
const SOCKET_TIMEOUT: Duration = Duration::from_secs(60);

impl FaultProxy {
    /// Starts a proxy on 127.0.0.1 (a free port) forwarding to `upstream`, in pass-through.
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("fault proxy: bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream,
            fault: Mutex::new(Fault::PassThrough),
            eligible: AtomicU64::new(0),
            stats: Mutex::new(FaultStats::default()),
            stop: AtomicBool::new(false),
            cut_generation: AtomicU64::new(0),
            stall_generation: AtomicU64::new(0),
            body_bytes: AtomicU64::new(0),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if s.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = conn else { continue };
                    let s = s.clone();
                    let _ =
                        std::thread::Builder::new().name("fault-proxy-conn".into()).spawn(move || handle(&s, client));
                }
            })
            .expect("fault proxy thread");
        FaultProxy { addr, shared }
    }

    /// Switches the fault for connections accepted from now on.
    pub fn set(&self, fault: Fault) {
        self.shared.eligible.store(0, Ordering::SeqCst);
        *self.shared.fault.lock().unwrap() = fault;
    }

    pub fn fault(&self) -> Fault {
        *self.shared.fault.lock().unwrap()
    }

    pub fn stats(&self) -> FaultStats {
        let mut s = *self.shared.stats.lock().unwrap();
        s.body_bytes = self.shared.body_bytes.load(Ordering::SeqCst);
        s
    }

    /// Every throttled response body being passed on right now goes silent (at its next piece), the
    /// connection left open until the client gives up: a link that stops mid-download.
    pub fn stall_open_bodies(&self) {
        self.shared.stall_generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Cuts every response body being passed on right now (at its next piece), whatever the
    /// mode: a break in the middle of a long download.
    pub fn cut_open_bodies(&self) {
        self.shared.cut_generation.fetch_add(1, Ordering::SeqCst);
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, for `[s3] endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn count(s: &Shared, f: impl FnOnce(&mut FaultStats)) {
    f(&mut s.stats.lock().unwrap());
}

/// The fault for a new request; a 503 burst counts down here.
fn take_fault(s: &Shared) -> Fault {
    let mut f = s.fault.lock().unwrap();
    match *f {
        Fault::Status503Burst(0) => Fault::PassThrough,
        Fault::Status503Burst(n) => {
            *f = Fault::Status503Burst(n - 1);
            Fault::Status503Burst(n)
        }
        other => other,
    }
}

/// Reads an HTTP head (through the blank line); returns it and any bytes read past it.
fn read_head(r: &mut TcpStream) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Some((buf, rest));
        }
        if buf.len() > 1 << 20 {
            return None;
        }
        let n = r.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The head's lines, without `Connection` headers, with `Connection: close` added.
fn closing(head: &[u8]) -> (Vec<u8>, Option<u64>) {
    let text = String::from_utf8_lossy(head);
    let mut out = String::new();
    let mut length = None;
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("connection:") || lower.starts_with("keep-alive:") {
            continue;
        }
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().ok();
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    (out.into_bytes(), length)
}

fn handle(s: &Shared, mut client: TcpStream) {
    let _ = client.set_read_timeout(Some(SOCKET_TIMEOUT));
    let _ = client.set_write_timeout(Some(SOCKET_TIMEOUT));
    let fault = take_fault(s);
    count(s, |c| c.requests += 1);
    match fault {
        Fault::Outage => {
            count(s, |c| c.refused += 1);
            let _ = client.shutdown(Shutdown::Both);
        }
        Fault::Stall => {
            count(s, |c| c.stalled += 1);
            // Read (and drop) whatever comes until the client gives up.
            let mut sink = [0u8; 8192];
            while matches!(client.read(&mut sink), Ok(n) if n > 0) {}
        }
        Fault::Status503Burst(_) => {
            let Some((head, rest)) = read_head(&mut client) else { return };
            // Read the request body first, so the client sees the answer and not a reset.
            let (_, length) = closing(&head);
            let mut left = length.unwrap_or(0).saturating_sub(rest.len() as u64);
            let mut sink = [0u8; 8192];
            while left > 0 {
                match client.read(&mut sink) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => left = left.saturating_sub(n as u64),
                }
            }
            let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>\
                        <Message>Please reduce your request rate.</Message></Error>";
            let answer = format!(
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
            count(s, |c| c.status_503 += 1);
            let _ = client.write_all(answer.as_bytes());
            let _ = client.flush();
            let _ = client.shutdown(Shutdown::Write);
        }
        Fault::PassThrough | Fault::ResetMidBody { .. } | Fault::Throttle(_) => forward(s, client, fault),
    }
}

fn forward(s: &Shared, mut client: TcpStream, fault: Fault) {
    let Some((head, rest)) = read_head(&mut client) else { return };
    let Ok(mut upstream) = TcpStream::connect_timeout(&s.upstream, Duration::from_secs(5)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = upstream.set_read_timeout(Some(SOCKET_TIMEOUT));
    let _ = upstream.set_write_timeout(Some(SOCKET_TIMEOUT));
    let (head, _) = closing(&head);
    if upstream.write_all(&head).is_err() || upstream.write_all(&rest).is_err() {
        return;
    }
    // The rest of the request body, client to server, on its own thread.
    let (Ok(mut from_client), Ok(mut to_upstream)) = (client.try_clone(), upstream.try_clone()) else { return };
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_client, &mut to_upstream);
    });
    let Some((rhead, body_start)) = read_head(&mut upstream) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let ok = rhead.starts_with(b"HTTP/1.1 2") || rhead.starts_with(b"HTTP/1.0 2");
    let (rhead, length) = closing(&rhead);
    if client.write_all(&rhead).is_err() {
        return;
    }
    // Where to cut this body, if anywhere.
    let cut = match fault {
        Fault::ResetMidBody { after, every } if ok && length.is_some_and(|l| l > after) => {
            let n = s.eligible.fetch_add(1, Ordering::SeqCst);
            n.is_multiple_of(u64::from(every.max(1))).then_some(after)
        }
        _ => None,
    };
    let rate = match fault {
        Fault::Throttle(bps) if length.is_some_and(|l| l > 0) => {
            count(s, |c| c.throttled += 1);
            Some(bps.max(1))
        }
        _ => None,
    };
    let mut sent = 0u64;
    let started = Instant::now();
    let generation = s.cut_generation.load(Ordering::SeqCst);
    let cut_now = || s.cut_generation.load(Ordering::SeqCst) != generation;
    let stall_generation = s.stall_generation.load(Ordering::SeqCst);
    let stall_now = || s.stall_generation.load(Ordering::SeqCst) != stall_generation;
    let mut pending = body_start;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut data = if pending.is_empty() {
            match upstream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf[..n].to_vec(),
            }
        } else {
            std::mem::take(&mut pending)
        };
        if cut_now() || cut.is_some_and(|at| sent + data.len() as u64 >= at) {
            data.truncate(cut.map_or(0, |at| at.saturating_sub(sent)) as usize);
            let _ = client.write_all(&data);
            let _ = client.flush();
            count(s, |c| c.resets += 1);
            let _ = client.shutdown(Shutdown::Both);
            let _ = upstream.shutdown(Shutdown::Both);
            let _ = up.join();
            return;
        }
        match rate {
            None => {
                if client.write_all(&data).is_err() {
                    break;
                }
                sent += data.len() as u64;
                s.body_bytes.fetch_add(data.len() as u64, Ordering::SeqCst);
            }
            Some(bps) => {
                // Small slices, each sent no earlier than the rate allows.
                let slice = (bps / 20).max(1) as usize;
                for piece in data.chunks(slice) {
                    let due = Duration::from_secs_f64((sent + piece.len() as u64) as f64 / bps as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(wait);
                    }
                    if stall_now() {
                        count(s, |c| c.stalled += 1);
                        // Silence: wait for the client to close its side (the request copier
                        // ends then), sending nothing.
                        let _ = up.join();
                        let _ = client.shutdown(Shutdown::Both);
                        let _ = upstream.shutdown(Shutdown::Both);
                        return;
                    }
                    if cut_now() {
                        count(s, |c| c.resets += 1);
                        let _ = client.shutdown(Shutdown::Both);
                        let _ = upstream.shutdown(Shutdown::Both);
                        let _ = up.join();
                        return;
                    }
                    if client.write_all(piece).is_err() {
                        let _ = upstream.shutdown(Shutdown::Both);
                        let _ = up.join();
                        return;
                    }
                    sent += piece.len() as u64;
                    s.body_bytes.fetch_add(piece.len() as u64, Ordering::SeqCst);
                }
            }
        }
    }
    let _ = client.flush();
    let _ = client.shutdown(Shutdown::Both);
    let _ = upstream.shutdown(Shutdown::Both);
    let _ = up.join();
}
