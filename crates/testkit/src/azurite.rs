//! Azurite, Microsoft's Azure Storage emulator (npm package `azurite`, installed by
//! scripts/setup.sh), serving Blob storage on 127.0.0.1 (a free port) from a temporary
//! directory, telemetry off, with one container, [`CONTAINER`].

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

/// Azurite's well-known development account and key (public, documented by Microsoft).
pub const ACCOUNT: &str = "devstoreaccount1";
pub const KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
pub const CONTAINER: &str = "walnut";

pub struct Azurite {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Azurite {
    pub fn start() -> Azurite {
        let dir = tempfile::Builder::new().prefix("walnut-azurite-").tempdir().expect("temp dir for Azurite");
        let mut child = Command::new("azurite-blob")
            .args(["--blobHost", "127.0.0.1", "--blobPort", "0", "--skipApiVersionCheck", "--disableTelemetry"])
            .args(["--disableProductStyleUrl", "--silent", "--location"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start azurite-blob ({e}): install it with `npm install -g azurite` (scripts/setup.sh does)"
                )
            });
        // It prints the port it bound: "... successfully listens on http://127.0.0.1:PORT".
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(url) = line.split("listens on http://").nth(1) {
                        break url.trim().parse::<SocketAddr>().expect("Azurite's address");
                    }
                }
                _ => {
                    let _ = child.kill();
                    panic!("azurite-blob exited before listening: run it by hand to see why");
                }
            }
        };
        // Keep reading its output so that it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let az = Azurite { child, addr, _dir: dir };
        az.create_container(CONTAINER);
        az
    }

    /// `http://127.0.0.1:PORT/devstoreaccount1`: the account's Blob endpoint, path style.
    pub fn endpoint(&self) -> String {
        format!("http://{}/{ACCOUNT}", self.addr)
    }

    /// The `object_store` Azure settings for this server, as walnut takes them (`AZURE_*`).
    pub fn settings(&self) -> Vec<(&'static str, String)> {
        vec![
            ("azure_storage_account_name", ACCOUNT.to_string()),
            ("azure_storage_account_key", KEY.to_string()),
            ("azure_storage_endpoint", self.endpoint()),
        ]
    }

    /// Creates a container with one Shared Key-signed request (object_store creates none).
    fn create_container(&self, name: &str) {
        use base64::Engine;
        use hmac::{KeyInit, Mac};
        let b64 = base64::engine::general_purpose::STANDARD;
        let date = chrono::Utc::now().format("%a, %d %b %Y %H:%M:%S GMT").to_string();
        let version = "2021-08-06";
        let path = format!("/{ACCOUNT}/{name}");
        let to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{ACCOUNT}{path}\nrestype:container"
        );
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&b64.decode(KEY).unwrap()).unwrap();
        mac.update(to_sign.as_bytes());
        let signature = b64.encode(mac.finalize().into_bytes());
        let request = format!(
            "PUT {path}?restype=container HTTP/1.1\r\nHost: {}\r\nx-ms-date: {date}\r\nx-ms-version: {version}\r\n\
             Authorization: SharedKey {ACCOUNT}:{signature}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.addr
        );
        let mut socket = std::net::TcpStream::connect(self.addr).expect("connect to Azurite");
        socket.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        let _ = socket.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 201"), "Azurite refused to create container {name}: {answer}");
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
