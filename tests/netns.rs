//! Nodes on separate network stacks: each node in its own network namespace, behind a link
//! shaped to 1 Gbit/s (`scripts/netns.sh`), meeting at node 0's address as on a home network.
//! Skipped, with a message, where namespaces cannot be made (they need root).

mod common;

use std::time::{Duration, Instant};

use common::cli::{pp, stdout};
use common::fixture;
use common::nodes::{
    finish, long_run_args, node_args, start_node, stderr, wait_for_steps, Namespaces,
};
use common::processes::{assert_same_weights, text_data};

#[test]
fn nodes_behind_a_1_gbit_link_train_what_one_device_trains() {
    let Some(namespaces) = Namespaces::up("a", 3, "1gbit") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = text_data(tmp.path());
    let single = tmp.path().join("single");
    let model = fixture("llama3-tiny").join("hf").display().to_string();
    stdout(&pp(&[
        "train",
        &model,
        "--data",
        &data,
        "--out",
        &single.display().to_string(),
        "--batch-size",
        "6",
        "--steps",
        "3",
        "--lr",
        "1e-3",
        "--max-grad-norm",
        "0.05",
        "--dtype",
        "f32",
        "--no-shuffle",
        "--micro-batch-size",
        "2",
    ]));
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
    let data = text_data(tmp.path());
    let out = tmp.path().join("run");
    let rendezvous = format!("{}:29400", Namespaces::address(0));
    let mut nodes: Vec<_> = (0..2)
        .map(|i| {
            let args = long_run_args(&data, &out, &rendezvous, i);
            start_node(&args, "secret", Some(&namespaces.name(i)))
        })
        .collect();
    let [node0, node1] = &mut nodes[..] else {
        unreachable!()
    };
    wait_for_steps(&out, &mut [node0, node1]);
    namespaces.cut(1);
    let cut_at = Instant::now();
    let outputs = finish(nodes, Duration::from_secs(60));
    assert!(
        cut_at.elapsed() < Duration::from_secs(30),
        "took {:?}",
        cut_at.elapsed()
    );
    let (host, guest) = (stderr(&outputs[0]), stderr(&outputs[1]));
    assert!(!outputs[0].status.success() && !outputs[1].status.success());
    assert!(
        host.contains("node 1 (") || host.contains("(rank 1)"),
        "{host}"
    );
    assert!(
        guest.contains("lost the rendezvous host") || guest.contains("(rank 0)"),
        "{guest}"
    );
    for text in [host, guest] {
        assert!(!text.contains("panicked"), "{text}");
    }
}
