//! A real S3-compatible server (`s3s-fs`) on 127.0.0.1, run in-process on its own runtime so it
//! serves child processes (walnut spawned by PostgreSQL) as well as the test itself. It can be
//! stopped and started again on the same port, to test storage outages.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const ACCESS_KEY: &str = "walnut-test-key";
pub const SECRET_KEY: &str = "walnut-test-secret-0123456789";
pub const BUCKET: &str = "walnut";

pub struct S3Server {
    root: PathBuf,
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
    _dir: Option<tempfile::TempDir>,
}

impl S3Server {
    /// Starts a server with one bucket, [`BUCKET`], storing its data in a new temporary directory.
    pub fn start() -> S3Server {
        S3Server::start_on(0)
    }

    /// Like [`S3Server::start`], on 127.0.0.1:`port` (0 picks a free port).
    pub fn start_on(port: u16) -> S3Server {
        let dir = tempfile::Builder::new().prefix("walnut-s3-").tempdir().expect("temp dir for S3 data");
        std::fs::create_dir_all(dir.path().join(BUCKET)).expect("create bucket dir");
        let root = dir.path().to_path_buf();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut s = S3Server { root, addr, runtime: None, _dir: Some(dir) };
        s.serve();
        s
    }

    fn serve(&mut self) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            // No signal driver: a process that embeds the server (walnut-s3-server) handles its
            // own signals, and two runtimes' signal drivers can lose a signal between them.
            .enable_io()
            .enable_time()
            .build()
            .expect("S3 server runtime");
        let root = self.root.clone();
        let bind = self.addr;
        // Bound with std so this works from inside another runtime (async tests).
        let listener =
            std::net::TcpListener::bind(bind).unwrap_or_else(|e| panic!("local S3 server: cannot bind {bind}: {e}"));
        listener.set_nonblocking(true).expect("nonblocking listener");
        self.addr = listener.local_addr().unwrap();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            use s3s::auth::SimpleAuth;
            use s3s::service::S3ServiceBuilder;
            let fs = s3s_fs::FileSystem::new(&root).expect("s3s-fs root");
            let mut b = S3ServiceBuilder::new(crate::s3list::FastList { inner: fs, root: root.clone() });
            b.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
            let service = b.build();
            let http = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            loop {
                let Ok((socket, _)) = listener.accept().await else { continue };
                let conn = http.serve_connection(hyper_util::rt::TokioIo::new(socket), service.clone()).into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        self.runtime = Some(runtime);
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `s3://walnut/<prefix>`
    pub fn repo_url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    /// Where the bucket's objects live on disk (s3s-fs stores each object as a plain file).
    pub fn bucket_dir(&self) -> PathBuf {
        self.root.join(BUCKET)
    }

    /// Stops serving: the port refuses connections and open connections are dropped.
    pub fn stop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        // Wait until the port really refuses connections.
        for _ in 0..100 {
            if std::net::TcpStream::connect(self.addr).is_err() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Serves again on the same port with the same data.
    pub fn restart(&mut self) {
        assert!(self.runtime.is_none(), "server is running");
        self.serve();
    }

    /// The `[s3]` section of a walnut config file for this server.
    pub fn config_toml(&self) -> String {
        self.config_toml_via(&self.endpoint())
    }

    /// The `[s3]` section of a walnut config file for this server reached at `endpoint` (a
    /// [`crate::FaultProxy`] in front of it, say).
    pub fn config_toml_via(&self, endpoint: &str) -> String {
        format!(
            "[s3]\nendpoint = \"{endpoint}\"\nregion = \"us-east-1\"\naccess_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\nforce_path_style = true\n"
        )
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
