//! A private RabbitMQ node for tests that change the broker itself (alarms), started from
//! the machine's RabbitMQ installation under a temporary directory, on free loopback ports,
//! and stopped on drop. The shared broker on 5672 is never touched.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::free_port;

/// Where the RabbitMQ scripts are, run directly (not through Debian's wrapper in /usr/sbin,
/// which switches to the `rabbitmq` user) so that the node runs as the current user with its
/// own cookie and data: `$RABBITMQ_SBIN`, Debian's `/usr/lib/rabbitmq/bin`, the `sbin` of an
/// installation under `$RABBITMQ_HOME`, `/usr/lib/rabbitmq/lib/rabbitmq_server-*` or
/// `/opt/rabbitmq`, else the directory of `rabbitmq-server` on the `PATH`.
fn sbin() -> PathBuf {
    static FOUND: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FOUND
        .get_or_init(|| {
            let mut candidates: Vec<PathBuf> = Vec::new();
            if let Some(dir) = std::env::var_os("RABBITMQ_SBIN") {
                candidates.push(dir.into());
            }
            candidates.push("/usr/lib/rabbitmq/bin".into());
            if let Some(home) = std::env::var_os("RABBITMQ_HOME") {
                candidates.push(PathBuf::from(home).join("sbin"));
            }
            if let Ok(dirs) = std::fs::read_dir("/usr/lib/rabbitmq/lib") {
                candidates.extend(dirs.flatten().map(|d| d.path().join("sbin")));
            }
            candidates.push("/opt/rabbitmq/sbin".into());
            if let Some(path) = std::env::var_os("PATH") {
                candidates.extend(std::env::split_paths(&path));
            }
            candidates
                .into_iter()
                .find(|d| d.join("rabbitmq-server").is_file() && d.join("rabbitmqctl").is_file())
                .expect(
                    "a RabbitMQ installation (rabbitmq-server and rabbitmqctl); set RABBITMQ_SBIN",
                )
        })
        .clone()
}

/// A running private broker.
pub struct PrivateBroker {
    /// Its AMQP URL (guest/guest on loopback).
    pub url: String,
    node: String,
    dir: PathBuf,
    child: Child,
}

impl PrivateBroker {
    /// Starts a node and waits until it accepts connections (a few seconds).
    pub fn start() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let node = format!("tmt{}@localhost", &id[..10]);
        let dir = std::env::temp_dir().join(format!("taskmill-broker-{}", &id[..10]));
        std::fs::create_dir_all(dir.join("home")).expect("broker dir");
        let port = free_port();
        let dist = free_port();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("plugins file");
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.default = 127.0.0.1:{port}\n"),
        )
        .expect("config file");
        let child = Command::new(sbin().join("rabbitmq-server"))
            .envs(Self::env(&dir, &node))
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rabbitmq-server (Debian's rabbitmq-server package)");
        let broker = Self {
            url: format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
            node,
            dir,
            child,
        };
        // `await_startup` fails at once until the node has registered itself: ask again.
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while !broker.ctl(&["await_startup", "--timeout", "120"]) {
            assert!(
                std::time::Instant::now() < deadline,
                "the private broker {} did not start",
                broker.node
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        broker
    }

    fn env(dir: &std::path::Path, node: &str) -> Vec<(String, String)> {
        vec![
            ("HOME".into(), dir.join("home").display().to_string()),
            ("RABBITMQ_NODENAME".into(), node.into()),
            // Not the machine's env file: it names the shared node.
            (
                "RABBITMQ_CONF_ENV_FILE".into(),
                dir.join("none.env").display().to_string(),
            ),
        ]
    }

    /// Runs `rabbitmqctl -n NODE args…`; true when it succeeded.
    pub fn ctl(&self, args: &[&str]) -> bool {
        Command::new(sbin().join("rabbitmqctl"))
            .envs(Self::env(&self.dir, &self.node))
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Raises (true) or clears (false) a memory alarm: with it, the broker blocks every
    /// connection that publishes.
    pub fn memory_alarm(&self, on: bool) {
        let watermark = if on { "0.0000001" } else { "0.4" };
        assert!(self.ctl(&["set_vm_memory_high_watermark", watermark]));
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = self.ctl(&["stop"]);
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(Duration::from_millis(10));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
