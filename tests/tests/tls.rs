//! rediss:// end to end: a local TLS-only redis-server with a certificate made by the test,
//! trusted by the worker and the producer through SSL_CERT_FILE (rustls' native roots).
#![allow(clippy::unwrap_used)]

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use serde_json::Value;
use taskmill_tests::{bin_path, sample, write_jsonl, TestNs};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_job_through_redis_over_tls() {
    let t = TestNs::new();
    let dir = std::env::temp_dir().join(format!("{}-tls", t.ns));
    std::fs::create_dir_all(&dir).unwrap();

    // A CA, and a server certificate for localhost signed by it.
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    let (ca_pem, cert_pem, key_pem) = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&ca_pem, ca.pem()).unwrap();
    std::fs::write(&cert_pem, server.pem()).unwrap();
    std::fs::write(&key_pem, server_key.serialize_pem()).unwrap();

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _redis = Killed(
        Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--tls-auth-clients",
                "no",
            ])
            .arg("--tls-cert-file")
            .arg(&cert_pem)
            .arg("--tls-key-file")
            .arg(&key_pem)
            .arg("--tls-ca-cert-file")
            .arg(&ca_pem)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server"),
    );
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let redis_url = format!("rediss://localhost:{port}/0");
    let with_env = |c: &mut Command| {
        c.env("TASKMILL_NAMESPACE", &t.ns)
            .env("REDIS_URL", &redis_url)
            .env("SSL_CERT_FILE", &ca_pem)
            .env_remove("RUST_LOG");
    };

    let mut worker_cmd = Command::new(bin_path("worker"));
    with_env(&mut worker_cmd);
    let _worker = Killed(
        worker_cmd
            .env("TASKMILL_THREADS", "2")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let file = write_jsonl(sample::posts(50));
    let mut enqueue = Command::new(bin_path("producer"));
    with_env(&mut enqueue);
    let out = enqueue
        .args([
            "enqueue",
            "--file",
            file.to_str().unwrap(),
            "--wait",
            "--json",
            "--timeout",
            "60",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let status: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(status["state"], "completed");
    assert_eq!(status["records_done"], 50);

    // Without the CA the server's certificate is refused: TLS is really checked.
    let mut other_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    other_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let other = CertifiedIssuer::self_signed(other_params, KeyPair::generate().unwrap()).unwrap();
    let other_ca = dir.join("other-ca.pem");
    std::fs::write(&other_ca, other.pem()).unwrap();
    let mut untrusted = Command::new(bin_path("producer"));
    with_env(&mut untrusted);
    let out = untrusted
        // Another CA's certificate: a readable root that did not sign the server's.
        .env("SSL_CERT_FILE", &other_ca)
        .args(["jobs"])
        .output()
        .unwrap();
    // Exit 5: a service is unreachable, and it is the certificate that was refused (not,
    // say, a port nobody listens on).
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    let _ = std::fs::remove_file(file);
    let _ = std::fs::remove_dir_all(dir);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(t.cleanup());
}
