//! Nodes on separate network stacks: each node in its own network namespace, behind a link
//! shaped to 1 Gbit/s (`scripts/netns.sh`), meeting at node 0's address as on a home network.
//! Skipped, with a message, where namespaces cannot be made (they need root).

mod common;

use std::time::{Duration, Instant};

use common::fixture;
use common::nodes::{finish, node_args, start_node, stderr, LongRun, Namespaces};
use common::processes::{assert_same_weights, text_data, train};

#[test]
fn nodes_behind_a_1_gbit_link_train_what_one_device_trains() {
    let Some(namespaces) = Namespaces::up("a", 3, "1gbit") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = text_data(tmp.path());
    let single = tmp.path().join("single");
    let model = fixture("llama3-tiny").join("hf").display().to_string();
    train(&model, &data, &single, &["--micro-batch-size", "2"]);
    let rendezvous = format!("{}:29400", Namespaces::address(0));
    for nodes in [2usize, 3] {
        let out = tmp.path().join(format!("nodes-{nodes}"));
        // Node 0 hosts because the rendezvous address is its own; the others join in any order.
        let args = node_args(
            &data,
            &out,
            nodes,
            &rendezvous,
            &["--steps", "3", "--microbatches", "3"],
        );
        let launched: Vec<_> = (0..nodes)
            .rev()
            .map(|i| start_node(&args, "secret", Some(&namespaces.name(i))))
            .collect();
        for output in finish(launched, Duration::from_secs(300)) {
            assert!(output.status.success(), "{}", stderr(&output));
            let text = stderr(&output);
            assert!(text.contains("rank 1: node 1 ("), "{text}");
            assert!(
                text.contains(&format!("at {})", Namespaces::address(1))),
                "{text}"
            );
        }
        assert_same_weights(
            &out.join("final"),
            &single.join("final"),
            1e-5,
            &format!("{nodes} nodes through namespaces"),
        );
    }
}

#[test]
fn a_cut_link_stops_both_nodes_within_30_s_naming_the_other() {
    let Some(namespaces) = Namespaces::up("b", 2, "1gbit") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let rendezvous = format!("{}:29400", Namespaces::address(0));
    let run = LongRun::start(tmp.path(), &rendezvous, Some(&namespaces));
    namespaces.cut(1);
    let cut_at = Instant::now();
    let outputs = finish(vec![run.node0, run.node1], Duration::from_secs(60));
    assert!(
        cut_at.elapsed() < Duration::from_secs(30),
        "took {:?}",
        cut_at.elapsed()
    );
    let (host, guest) = (stderr(&outputs[0]), stderr(&outputs[1]));
    assert!(!outputs[0].status.success() && !outputs[1].status.success());
    // Each node's last line, its error, names the other side.
    let last = |text: &str| text.lines().last().unwrap_or_default().to_string();
    assert!(
        last(&host).contains("node 1 (") || last(&host).contains("rank 1"),
        "{host}"
    );
    assert!(
        last(&guest).contains("rendezvous host") || last(&guest).contains("rank 0"),
        "{guest}"
    );
    for text in [host, guest] {
        assert!(!text.contains("panicked"), "{text}");
    }
}
