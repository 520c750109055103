//! Scale-out, short form: `understudy bench scale` runs the binary as separate roles (2× api,
//! 2× projector, 2× worker, relay, scheduler) on a three-node NATS cluster holding the event
//! stream in three copies, and kills the stream leader's nats-server and one process of each
//! role under load. The bench itself fails when anything was lost or doubled; this test runs it
//! briefly and checks that it says so, and what it did. Latency is the bench's to report, not
//! this test's to assert (see docs/benchmarks.md).

use std::process::Command;

use understudy_tests::{admin_database_url, understudy_bin};

#[test]
fn killing_a_nats_node_and_one_process_of_each_role_loses_and_doubles_nothing() {
    let output = Command::new(understudy_bin())
        .args(["bench", "scale", "--seconds", "6", "--rate", "50", "--branches", "1", "--nats-down-ms", "2000"])
        .current_dir(understudy_tests::repos::root())
        .env("DATABASE_URL", admin_database_url())
        .env_remove("NATS_URL")
        .env("RUST_LOG", "error")
        // Ten processes on the suite's shared Postgres: each keeps to a small pool, so that the
        // tests running beside this one still find connections.
        .env("UNDERSTUDY_DB_POOL", "6")
        .output()
        .expect("run the bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench scale failed\n{stdout}\n{stderr}");
    for killed in ["(stream leader)", "relay at", "projector-0 at", "api-0 at", "worker-0 at", "scheduler at"] {
        assert!(stdout.lines().any(|l| l.starts_with("killed ") && l.contains(killed)), "no kill of {killed}:\n{stdout}");
    }
    assert!(stdout.contains("nothing lost, nothing doubled"), "{stdout}");
    assert!(stdout.contains("2 branches Ready at their commits"), "{stdout}");
    assert!(stdout.contains("p99 ratio faulted / healthy"), "{stdout}");
}
