//! Cluster workers against a real NATS server that each test starts on a
//! free loopback port with a temporary store (the binary `scripts/setup.sh`
//! installs in models/nats-server), and stops.

mod common;

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{finish_within, imdb_data as imdb, imdb_input, lr_config, repo_root};
use serde_json::Value;

/// The first `n` IMDB test items and an LR → LLM config; their paths.
fn setup(dir: &Path, n: usize) -> (PathBuf, PathBuf) {
    imdb_input(dir, n, &lr_config(65536, 0))
}

/// A nats-server with JetStream on a free 127.0.0.1 port; killed on drop.
struct Server {
    child: Child,
    port: u16,
    store: tempfile::TempDir,
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    fn start() -> Self {
        let store = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Self::spawn(port, store.path());
        Self { child, port, store }
    }

    fn spawn(port: u16, store: &Path) -> Child {
        let binary = repo_root().join("models/nats-server/nats-server");
        assert!(
            binary.exists(),
            "{} is missing: run scripts/setup.sh nats",
            binary.display()
        );
        let child = Command::new(binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no server on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server and starts it again on the same port and store.
    fn restart(&mut self, down_for: Duration) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        std::thread::sleep(down_for);
        self.child = Self::spawn(self.port, self.store.path());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cascade(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cascade"));
    command.args(args).current_dir(repo_root());
    command
}

/// A worker with the recorded expert (20 ms a call) and a learner snapshot
/// every 50 labels; `extra` after.
fn worker(server: &Server, config: &Path, name: &str, state: &Path, extra: &[&str]) -> Command {
    let mut command = cascade(&["worker", "--nats", &server.url()]);
    command.args(["--task", "tasks/imdb.toml"]);
    command
        .arg("--config")
        .arg(config)
        .arg("--recorded-data")
        .arg(imdb())
        .args(["--recorded-delay-ms", "20", "--snapshot-every", "50"])
        .args(["--ack-wait-secs", "3", "--name", name])
        .arg("--save-learner")
        .arg(state)
        .args(extra)
        .stderr(Stdio::piped());
    command
}

fn publish(server: &Server, input: &Path) {
    let mut command = cascade(&["publish", "--nats", &server.url()]);
    command.arg("--input").arg(input);
    let out = finish_within(command, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every record in the RESULTS stream, as stored (duplicates included).
fn collect(server: &Server, dir: &Path) -> Vec<Value> {
    let output = dir.join("results.jsonl");
    let mut command = cascade(&["collect", "--nats", &server.url(), "--idle-secs", "3"]);
    command.arg("--output").arg(&output);
    let out = finish_within(command, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Waits until the RESULTS stream holds `n` records (checked with `collect --expect`).
fn wait_for_results(server: &Server, dir: &Path, n: usize, limit: Duration) {
    let mut command = cascade(&["collect", "--nats", &server.url(), "--idle-secs", "20"]);
    command
        .arg("--output")
        .arg(dir.join("progress.jsonl"))
        .args(["--expect", &n.to_string()]);
    let out = finish_within(command, limit);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// SIGTERM, then the worker's stderr once it has exited (within 60 s).
fn stop(mut child: Child) -> String {
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "worker still running after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    stderr
}

fn kill(mut child: Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

/// One record per input id, none missing, none stored twice.
fn assert_one_result_per_id(records: &[Value], n: usize) {
    let mut per_id: HashMap<u64, usize> = HashMap::new();
    for record in records {
        *per_id.entry(record["id"].as_u64().unwrap()).or_default() += 1;
    }
    let doubled: Vec<_> = per_id.iter().filter(|(_, &c)| c > 1).collect();
    assert!(doubled.is_empty(), "ids stored twice: {doubled:?}");
    assert_eq!(per_id.len(), n, "results for {} of {n} ids", per_id.len());
    assert_eq!(records.len(), n);
}

/// The CI version of results/cluster.md's first rows: two workers, one
/// SIGKILLed while it has items unacked and restarted; every item gets
/// exactly one result; every replica (and a worker that joins after the
/// stream, from a snapshot) holds the same learner, byte for byte.
#[test]
fn a_killed_worker_loses_nothing_and_every_replica_learns_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let n = 400;
    let (input, config) = setup(dir.path(), n);
    let server = Server::start();
    publish(&server, &input);
    let state = |name: &str| dir.path().join(format!("{name}.learner"));
    // --purge-log: a restarted or late worker must do with the kept snapshots.
    let purge = ["--purge-log"];
    let a = worker(&server, &config, "a", &state("a"), &purge)
        .spawn()
        .unwrap();
    let b = worker(&server, &config, "b", &state("b"), &purge)
        .spawn()
        .unwrap();
    wait_for_results(&server, dir.path(), 120, Duration::from_secs(60));
    kill(b);
    let b = worker(&server, &config, "b", &state("b"), &purge)
        .spawn()
        .unwrap();
    wait_for_results(&server, dir.path(), n, Duration::from_secs(120));

    let records = collect(&server, dir.path());
    assert_one_result_per_id(&records, n);
    let by = |w: &str| records.iter().filter(|r| r["worker"] == w).count();
    assert!(by("a") > 0 && by("b") > 0, "a {} b {}", by("a"), by("b"));

    let (a_log, b_log) = (stop(a), stop(b));
    assert!(
        b_log.contains("started from the snapshot at"),
        "the restarted worker did not load a snapshot: {b_log}"
    );
    let late = worker(&server, &config, "late", &state("late"), &[])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let late_log = stop(late);
    assert!(
        late_log.contains("started from the snapshot at"),
        "{late_log}"
    );
    let bytes = |name: &str| std::fs::read(state(name)).unwrap();
    assert!(!bytes("a").is_empty());
    assert!(
        bytes("a") == bytes("b"),
        "a and b hold different learners\n{a_log}\n{b_log}"
    );
    assert!(
        bytes("a") == bytes("late"),
        "the late joiner differs\n{late_log}"
    );
}

/// The server killed mid-stream and restarted on its store: the workers
/// reconnect and finish, and nothing is lost or stored twice.
#[test]
fn a_restarted_server_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let n = 300;
    let (input, config) = setup(dir.path(), n);
    let mut server = Server::start();
    publish(&server, &input);
    let state = |name: &str| dir.path().join(format!("{name}.learner"));
    let a = worker(&server, &config, "a", &state("a"), &[])
        .spawn()
        .unwrap();
    let b = worker(&server, &config, "b", &state("b"), &[])
        .spawn()
        .unwrap();
    wait_for_results(&server, dir.path(), 80, Duration::from_secs(60));
    server.restart(Duration::from_millis(500));
    wait_for_results(&server, dir.path(), n, Duration::from_secs(120));
    let records = collect(&server, dir.path());
    assert_one_result_per_id(&records, n);
    stop(a);
    stop(b);
    assert!(std::fs::read(state("a")).unwrap() == std::fs::read(state("b")).unwrap());
}

/// A worker whose expert is down answers its deferred items with the
/// deepest student (`expert_unavailable`), as `cascade run` does; nothing
/// is lost, and its failures add nothing to the shared log.
#[test]
fn an_expert_outage_in_one_worker_falls_back_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let n = 200;
    let (input, config) = setup(dir.path(), n);
    let server = Server::start();
    publish(&server, &input);
    let down = dir.path().join("down.toml");
    std::fs::write(
        &down,
        "base_url = \"http://127.0.0.1:9/v1\"\nmodel = \"gone\"\nmax_attempts = 1\ntimeout_secs = 2.0\n",
    )
    .unwrap();
    let state = |name: &str| dir.path().join(format!("{name}.learner"));
    // The good worker first: a worker whose calls fail at once races through.
    let good = worker(&server, &config, "good", &state("good"), &[])
        .spawn()
        .unwrap();
    wait_for_results(&server, dir.path(), 40, Duration::from_secs(60));
    let mut broken = worker(&server, &config, "broken", &state("broken"), &[]);
    broken
        .args(["--expert", "openai"])
        .arg("--expert-config")
        .arg(&down);
    let broken = broken.spawn().unwrap();
    wait_for_results(&server, dir.path(), n, Duration::from_secs(120));
    let records = collect(&server, dir.path());
    assert_one_result_per_id(&records, n);
    let unavailable: Vec<_> = records
        .iter()
        .filter(|r| r["status"] == "expert_unavailable")
        .collect();
    assert!(
        !unavailable.is_empty(),
        "the broken worker answered nothing"
    );
    assert!(unavailable
        .iter()
        .all(|r| r["worker"] == "broken" && r["label"].is_string()));
    assert!(records
        .iter()
        .any(|r| r["worker"] == "good" && r["answered_by"] == "llm"));
    stop(broken);
    stop(good);
}

/// Workers of one cluster must share config and task: another is refused
/// with an error that names the option, before it touches an item.
#[test]
fn a_worker_with_another_config_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (input, config) = setup(dir.path(), 20);
    let server = Server::start();
    publish(&server, &input);
    let first = worker(&server, &config, "a", &dir.path().join("a"), &[])
        .spawn()
        .unwrap();
    wait_for_results(&server, dir.path(), 20, Duration::from_secs(60));
    let other = worker(
        &server,
        &config,
        "b",
        &dir.path().join("b"),
        &["--mu", "0.01"],
    );
    let out = finish_within(other, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--config does not match cluster `cascade`"),
        "{stderr}"
    );
    stop(first);
}

/// An item must not go to a second worker while the first still waits on
/// its expert: an `--ack-wait-secs` that is not above the expert's longest
/// call (timeout × attempts + backoff) is refused before anything starts.
#[test]
fn an_ack_wait_below_the_experts_longest_call_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_, config) = setup(dir.path(), 1);
    let expert = dir.path().join("slow.toml");
    std::fs::write(
        &expert,
        "base_url = \"http://127.0.0.1:9/v1\"\nmodel = \"m\"\ntimeout_secs = 30.0\nmax_attempts = 3\nbackoff_max_ms = 4000\n",
    )
    .unwrap();
    let mut command = cascade(&["worker", "--nats", "nats://127.0.0.1:9"]);
    command
        .args(["--task", "tasks/imdb.toml", "--expert", "openai"])
        .arg("--config")
        .arg(&config)
        .arg("--expert-config")
        .arg(&expert)
        .args(["--ack-wait-secs", "60"])
        .stderr(Stdio::piped());
    let out = finish_within(command, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--ack-wait-secs 60 is not above the expert's longest call (98 s"),
        "{stderr}"
    );
}

/// A front end started while the server is down (being restarted) waits for
/// it instead of exiting, and says so.
#[test]
fn a_command_started_before_the_server_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let (input, _) = setup(dir.path(), 20);
    let store = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut command = cascade(&["publish", "--nats", &format!("nats://127.0.0.1:{port}")]);
    command
        .arg("--input")
        .arg(&input)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let publisher = command.spawn().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let server = Server {
        child: Server::spawn(port, store.path()),
        port,
        store,
    };
    let out = publisher.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("no NATS server at"), "{stderr}");
    assert!(stderr.contains("20 lines published"), "{stderr}");
    drop(server);
}
