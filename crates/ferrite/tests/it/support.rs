//! Starting the server and the helpers the tests share.

#![allow(dead_code)]

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BINARY: &str = env!("CARGO_BIN_EXE_ferrite");
pub const ADMIN_EMAIL: &str = "tester@example.com";
pub const ADMIN_PASSWORD: &str = "correct horse battery staple";

pub struct Server {
    pub mqtt_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// UDP address of the LoRaWAN listener (Semtech packet forwarder).
    pub lorawan_addr: SocketAddr,
    pub http_url: String,
    pub data_dir: PathBuf,
    child: Option<Child>,
    /// Keeps the data directory alive; `None` when the caller owns it.
    _temp: Option<tempfile::TempDir>,
    env: Vec<(String, String)>,
    admin_token: tokio::sync::OnceCell<String>,
}

pub struct TestDevice {
    pub id: String,
    pub token: String,
}

/// Returns a loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("local address")
        .port()
}

/// Returns a loopback UDP port that was free a moment ago.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .expect("bind an ephemeral UDP port")
        .local_addr()
        .expect("local address")
        .port()
}

/// Runs a `ferrite` subcommand against `data_dir` and returns its standard output.
pub fn run_cli(args: &[&str], data_dir: &Path, stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new(BINARY)
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ferrite");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    } else {
        drop(child.stdin.take());
    }
    let output = child.wait_with_output().expect("ferrite finished");
    assert!(
        output.status.success(),
        "ferrite {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 output")
}

impl Server {
    pub async fn start() -> Server {
        Self::start_with_env(&[]).await
    }

    pub async fn start_with_env(env: &[(&str, &str)]) -> Server {
        let temp = tempfile::tempdir().expect("temp dir");
        let data_dir = temp.path().join("data");
        let mut server = Self::start_in(&data_dir, env).await;
        server._temp = Some(temp);
        server
    }

    /// Starts a server on an existing data directory (for restart tests).
    pub async fn start_in(data_dir: &Path, env: &[(&str, &str)]) -> Server {
        std::fs::create_dir_all(data_dir).expect("create data dir");
        if !data_dir.join("metadata.db").exists() {
            run_cli(
                &["user", "create", ADMIN_EMAIL, "--role", "admin"],
                data_dir,
                Some(&format!("{ADMIN_PASSWORD}\n")),
            );
        }
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut server = Server {
            mqtt_addr: "127.0.0.1:0".parse().unwrap(),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            lorawan_addr: "127.0.0.1:0".parse().unwrap(),
            http_url: String::new(),
            data_dir: data_dir.to_owned(),
            child: None,
            _temp: None,
            env,
            admin_token: tokio::sync::OnceCell::new(),
        };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        for _attempt in 0..5 {
            let mqtt: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let lorawan: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
            let mut command = Command::new(BINARY);
            command
                .arg("serve")
                .arg("--data-dir")
                .arg(&self.data_dir)
                .arg("--http-listen")
                .arg(http.to_string())
                .arg("--mqtt-listen")
                .arg(mqtt.to_string())
                .arg("--lorawan-listen")
                .arg(lorawan.to_string())
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit());
            for (key, value) in &self.env {
                command.env(key, value);
            }
            let mut child = command.spawn().expect("start ferrite serve");
            self.mqtt_addr = mqtt;
            self.http_addr = http;
            self.lorawan_addr = lorawan;
            self.http_url = format!("http://{http}");
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if let Ok(response) = reqwest::get(format!("{}/healthz", self.http_url)).await
                    && response.status().is_success()
                {
                    self.child = Some(child);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("ferrite serve did not become healthy");
    }

    /// Stops the server with SIGKILL: no shutdown work runs.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server with SIGTERM and waits for a clean exit.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let status = child.wait().expect("wait for ferrite");
            assert!(status.success(), "ferrite exited with {status}");
        }
    }

    /// Starts the server again on the same data directory and fresh ports.
    pub async fn restart(&mut self) {
        self.kill();
        self.admin_token = tokio::sync::OnceCell::new();
        self.spawn().await;
    }

    pub async fn create_device(&self, name: &str) -> TestDevice {
        let output = run_cli(&["device", "create", name], &self.data_dir, None);
        let value: Value = serde_json::from_str(output.trim()).expect("device JSON");
        TestDevice {
            id: value["id"].as_str().expect("id").to_owned(),
            token: value["token"].as_str().expect("token").to_owned(),
        }
    }

    pub fn create_api_key(&self, name: &str, role: &str) -> String {
        let output = run_cli(
            &["api-key", "create", name, "--role", role],
            &self.data_dir,
            None,
        );
        let value: Value = serde_json::from_str(output.trim()).expect("api key JSON");
        value["key"].as_str().expect("key").to_owned()
    }

    pub async fn admin_token(&self) -> String {
        self.admin_token
            .get_or_init(|| async {
                let response = reqwest::Client::new()
                    .post(format!("{}/api/v1/auth/login", self.http_url))
                    .json(&serde_json::json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}))
                    .send()
                    .await
                    .expect("login request");
                assert_eq!(response.status(), 200, "login failed");
                let body: Value = response.json().await.expect("login JSON");
                body["access_token"]
                    .as_str()
                    .expect("access_token")
                    .to_owned()
            })
            .await
            .clone()
    }

    /// `GET path` with the admin token; returns status and JSON body.
    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let response = reqwest::Client::new()
            .get(format!("{}{path}", self.http_url))
            .bearer_auth(self.admin_token().await)
            .send()
            .await
            .expect("GET request");
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    pub async fn latest(&self, device_id: &str) -> Value {
        let (status, body) = self
            .get_json(&format!("/api/v1/devices/{device_id}/telemetry/latest"))
            .await;
        assert_eq!(status, 200, "latest failed: {body}");
        body
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `check` until it returns true or `timeout` passes; returns the last result.
pub async fn wait_until<F, Fut>(mut check: F, timeout: Duration) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
