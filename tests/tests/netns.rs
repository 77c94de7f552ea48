//! Two workers on "two machines" (network namespaces with their own addresses); one is cut
//! off by taking its link down in the middle of a job. The broker notices the silence through
//! the AMQP heartbeat (5 s here), gives that worker's unacked batches to the other one, and the
//! job completes with every batch counted once.
//!
//! Needs root and iproute2 (`ip netns`, veth); skipped with a message otherwise.
#![allow(clippy::unwrap_used)]

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::{Child, Command, Stdio},
    time::Duration,
};

use taskmill_producer::cmd::enqueue::{enqueue, EnqueueArgs};
use taskmill_tests::{
    bin_path, proxy::Proxy, sample, until, wait_batches_done, write_jsonl, TestNs,
};

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// One "machine": a network namespace joined to the host by a veth pair.
struct Host {
    netns: String,
    veth: String,
    host_addr: Ipv4Addr,
}

impl Host {
    fn create(tag: &str, subnet: u8) -> Option<Self> {
        let netns = format!("tmt-{tag}");
        let veth = format!("tv{tag}");
        let peer = format!("tp{tag}");
        let host_addr = Ipv4Addr::new(10, 213, subnet, 1);
        let ns_addr = Ipv4Addr::new(10, 213, subnet, 2);
        let ok = ip(&["netns", "add", &netns])
            && ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer])
            && ip(&["link", "set", &peer, "netns", &netns])
            && ip(&["addr", "add", &format!("{host_addr}/30"), "dev", &veth])
            && ip(&["link", "set", &veth, "up"])
            && ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{ns_addr}/30"),
                "dev",
                &peer,
            ])
            && ip(&["-n", &netns, "link", "set", &peer, "up"])
            && ip(&["-n", &netns, "link", "set", "lo", "up"]);
        let host = Self {
            netns,
            veth,
            host_addr,
        };
        ok.then_some(host)
    }

    fn cut(&self) {
        assert!(ip(&["link", "set", &self.veth, "down"]));
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        ip(&["link", "del", &self.veth]);
        ip(&["netns", "del", &self.netns]);
    }
}

/// Starts the worker binary inside `host`, reaching RabbitMQ and Redis through proxies that
/// listen on the host's side of its link.
fn worker_in(host: &Host, ns: &str, amqp: &Proxy, redis: &Proxy) -> Child {
    Command::new("ip")
        .args(["netns", "exec", &host.netns])
        .arg(bin_path("worker"))
        .env("TASKMILL_NAMESPACE", ns)
        .env(
            "AMQP_URL",
            format!("amqp://guest:guest@{}/%2f?heartbeat=5", amqp.addr),
        )
        .env("REDIS_URL", format!("redis://{}/0", redis.addr))
        .env("TASKMILL_THREADS", "1")
        .env("TASKMILL_PREFETCH", "20")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_the_network_gives_its_batches_to_the_other() {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let t = TestNs::new();
    let tag = &t.ns[4..10];
    let subnet = u8::from_str_radix(&t.ns[10..12], 16).unwrap_or(1);
    let hosts = if is_root {
        Host::create(&format!("a{tag}"), subnet)
            .zip(Host::create(&format!("b{tag}"), subnet.wrapping_add(128)))
    } else {
        None
    };
    let Some((a, b)) = hosts else {
        // The only test behind the partition claim: it never passes without running, unless
        // skipping is asked for (a machine without root or network privileges).
        assert!(
            std::env::var_os("TASKMILL_TEST_SKIP_NETNS").is_some_and(|v| v == "1"),
            "network namespaces need root and iproute2 (ip netns, veth; `make test` installs \
             iproute2); set TASKMILL_TEST_SKIP_NETNS=1 to skip this test on purpose"
        );
        eprintln!("SKIPPED on request (TASKMILL_TEST_SKIP_NETNS=1)");
        return;
    };
    let rabbit: SocketAddr = "127.0.0.1:5672".parse().unwrap();
    let redis: SocketAddr = "127.0.0.1:6379".parse().unwrap();
    let mut proxies = Vec::new();
    for h in [&a, &b] {
        let amqp = Proxy::start_on(SocketAddr::new(h.host_addr.into(), 0), rabbit)
            .await
            .unwrap();
        let red = Proxy::start_on(SocketAddr::new(h.host_addr.into(), 0), redis)
            .await
            .unwrap();
        proxies.push((amqp, red));
    }
    let mut wa = worker_in(&a, &t.ns, &proxies[0].0, &proxies[0].1);
    let mut wb = worker_in(&b, &t.ns, &proxies[1].0, &proxies[1].1);

    let file = write_jsonl(sample::posts(3000));
    let mut args = EnqueueArgs::new("chaos");
    args.files = vec![file.clone()];
    args.params = vec!["spin_us=2000".into()];
    let report = enqueue(&t.conn(), &args, |_| {}).await.unwrap();
    let store = t.store().await;
    let job = report.job.clone();
    // Both machines are working before one is cut off.
    until(
        "both workers connected",
        Duration::from_secs(60),
        || async { proxies[0].0.accepted() >= 1 && proxies[1].0.accepted() >= 1 },
    )
    .await;
    wait_batches_done(&store, &job, 50).await;
    a.cut();
    let status = t
        .wait_finished(&store, &job, Duration::from_secs(120))
        .await;
    assert_eq!(status.state(), "completed", "{:?}", status);
    assert_eq!(status.batches_done, 300);
    assert_eq!(status.records_done, 3000);
    assert_eq!(store.results(&job).await.unwrap().len(), 300);

    let _ = wa.kill();
    let _ = wa.wait();
    let _ = wb.kill();
    let _ = wb.wait();
    drop((a, b));
    let _ = std::fs::remove_file(file);
    t.cleanup().await;
}
