//! The rendezvous end to end, on loopback.

use super::*;

fn free_address() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn report(node_rank: Option<usize>, workers: usize, lr: &str) -> NodeJoin {
    NodeJoin {
        node_rank,
        name: format!("host{}", node_rank.map_or("?".into(), |r| r.to_string())),
        workers: (0..workers)
            .map(|i| WorkerInfo {
                port: 40000 + i as u16,
                device: "cpu".into(),
                memory: Some(1 << 30),
                measured: format!("speed {i}"),
            })
            .collect(),
        settings: vec![("stages".into(), "3".into()), ("lr".into(), lr.into())],
        restarts: 0,
        checkpoints: Vec::new(),
        link: None,
    }
}

/// A host for `nodes` nodes that shares no files, giving up after `seconds`.
fn start_host(address: SocketAddr, nodes: usize, seconds: u64) -> RendezvousHost {
    RendezvousHost::start(
        address,
        "secret",
        nodes,
        Duration::from_secs(seconds),
        SharedFiles::default(),
    )
    .unwrap()
}

type Joined = Result<(RendezvousNode, Group), RendezvousError>;

/// Joins every report on its own thread; returns each node's outcome and what it was told
/// while waiting.
fn join_all(
    address: SocketAddr,
    token: &str,
    reports: Vec<(Duration, NodeJoin)>,
) -> Vec<(Joined, Vec<String>)> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = reports
            .into_iter()
            .map(|(delay, join)| {
                scope.spawn(move || {
                    std::thread::sleep(delay);
                    let mut heard = Vec::new();
                    let result = RendezvousNode::join(
                        address,
                        token,
                        join,
                        Duration::from_secs(20),
                        &mut |line| heard.push(line.to_string()),
                    );
                    (result, heard)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// One node's outcome, joining at once.
fn join_one(address: SocketAddr, token: &str, join: NodeJoin) -> Joined {
    join_all(address, token, vec![(Duration::ZERO, join)])
        .pop()
        .unwrap()
        .0
}

#[test]
fn nodes_join_in_any_order_and_learn_the_whole_group() {
    let address = free_address();
    // Node 2 dials before the host listens, node 1 comes late: it is named as missing.
    let late = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        start_host(address, 3, 20)
    });
    let joined = join_all(
        address,
        "secret",
        vec![
            (Duration::ZERO, report(Some(2), 1, "1e-4")),
            (Duration::from_millis(600), report(Some(0), 2, "1e-4")),
            (Duration::from_millis(6500), report(None, 1, "1e-4")),
        ],
    );
    let _host = late.join().unwrap();
    let mut groups = Vec::new();
    for (i, (result, heard)) in joined.into_iter().enumerate() {
        let (node, group) = result.unwrap();
        if i < 2 {
            assert!(
                heard.iter().any(|line| line.contains("missing: node 1")),
                "node {i} heard {heard:?}"
            );
        }
        groups.push((node, group));
    }
    let ranks: Vec<usize> = groups.iter().map(|(_, g)| g.node_rank).collect();
    assert_eq!(ranks, vec![2, 0, 1]);
    let group = &groups[0].1;
    let first: Vec<usize> = group.nodes.iter().map(|n| n.first_rank).collect();
    assert_eq!(first, vec![0, 2, 3]);
    let ports: Vec<u16> = group.worker_addresses().iter().map(|a| a.port()).collect();
    assert_eq!(ports, vec![40000, 40001, 40000, 40000]);
    assert!(groups.iter().all(|(_, g)| g.nodes == group.nodes));

    // Ctrl-C on one node reaches all; then all finish together.
    groups[1].0.report(NodeEvent::Interrupt).unwrap();
    for (node, _) in &groups {
        assert_eq!(
            node.wait(Duration::from_secs(5)),
            Some(GroupEvent::Interrupt { node: 0 })
        );
    }
    for (node, _) in &groups {
        node.report(NodeEvent::Finished).unwrap();
    }
    for (node, _) in &groups {
        assert_eq!(
            node.wait(Duration::from_secs(5)),
            Some(GroupEvent::Finished)
        );
    }
}

#[test]
fn control_requests_reach_every_node() {
    let address = free_address();
    let host = start_host(address, 2, 20);
    let status = |token| {
        control(
            address,
            token,
            ControlRequest::Status,
            Duration::from_secs(5),
        )
    };
    match status("secret").unwrap() {
        ControlReply::Status(status) => assert_eq!(status.phase, Phase::Forming),
        other => panic!("{other:?}"),
    }
    let joined = join_all(
        address,
        "secret",
        vec![
            (Duration::ZERO, report(Some(0), 1, "1e-4")),
            (Duration::ZERO, report(Some(1), 2, "1e-4")),
        ],
    );
    let nodes: Vec<RendezvousNode> = joined.into_iter().map(|(r, _)| r.unwrap().0).collect();
    host.set_progress("step 7".into());
    match status("secret").unwrap() {
        ControlReply::Status(status) => {
            assert_eq!(status.phase, Phase::Running);
            assert_eq!(status.nodes.len(), 2);
            assert_eq!(status.nodes[1].workers.len(), 2);
            assert_eq!(status.progress.as_deref(), Some("step 7"));
        }
        other => panic!("{other:?}"),
    }
    let wrong = status("guess").unwrap_err();
    assert!(
        matches!(
            wrong,
            RendezvousError::Auth {
                error: AuthError::Refused,
                ..
            }
        ),
        "{wrong}"
    );
    let ask = |request| control(address, "secret", request, Duration::from_secs(5)).unwrap();
    assert_eq!(
        ask(ControlRequest::Save),
        ControlReply::Done("told all 2 nodes".into())
    );
    for node in &nodes {
        assert_eq!(node.wait(Duration::from_secs(5)), Some(GroupEvent::Save));
    }
    assert!(matches!(ask(ControlRequest::Stop), ControlReply::Done(_)));
    for node in &nodes {
        assert!(matches!(
            node.wait(Duration::from_secs(5)),
            Some(GroupEvent::Stop { by }) if by == "pp ctl from 127.0.0.1"
        ));
    }
    assert!(matches!(ask(ControlRequest::Abort), ControlReply::Done(_)));
    for node in &nodes {
        assert!(matches!(
            node.wait(Duration::from_secs(5)),
            Some(GroupEvent::Abort(reason)) if reason.contains("aborted by pp ctl")
        ));
    }
}

#[test]
fn a_lost_node_stops_the_others_naming_it() {
    let address = free_address();
    let _host = start_host(address, 3, 20);
    let joined = join_all(
        address,
        "secret",
        vec![
            (Duration::ZERO, report(Some(0), 1, "1e-4")),
            (Duration::ZERO, report(Some(1), 1, "1e-4")),
            (Duration::ZERO, report(Some(2), 1, "1e-4")),
        ],
    );
    let mut nodes: Vec<RendezvousNode> = joined.into_iter().map(|(r, _)| r.unwrap().0).collect();
    drop(nodes.remove(1));
    for node in &nodes {
        match node.wait(Duration::from_secs(15)) {
            Some(GroupEvent::Broken(reason)) => {
                assert!(
                    reason.contains("node 1 (host1 at 127.0.0.1) was lost"),
                    "{reason}"
                )
            }
            other => panic!("expected a stop, got {other:?}"),
        }
    }
}

#[test]
fn nodes_started_differently_or_with_another_token_are_refused() {
    let address = free_address();
    let _host = start_host(address, 2, 20);
    let joined = join_all(
        address,
        "secret",
        vec![
            (Duration::ZERO, report(Some(0), 1, "1e-4")),
            (Duration::ZERO, report(None, 1, "3e-4")),
        ],
    );
    for (result, _) in joined {
        let error = result.err().expect("refused").to_string();
        assert!(
            error.contains("node 1 (host? at 127.0.0.1) was not started like node 0")
                && error.contains("lr is 3e-4 there, 1e-4 on node 0"),
            "{error}"
        );
    }
    // Another token: refused at once, and named to the nodes that wait.
    let address = free_address();
    let _host = start_host(address, 2, 3);
    let error = join_one(address, "guess", report(None, 1, "1e-4"))
        .err()
        .expect("refused");
    assert!(
        matches!(
            error,
            RendezvousError::Auth {
                error: AuthError::Refused,
                ..
            }
        ),
        "{error}"
    );
    let error = join_one(address, "secret", report(Some(0), 1, "1e-4"))
        .err()
        .expect("no group");
    assert!(
        error.to_string().contains("turned away: 127.0.0.1:")
            && error.to_string().contains("(wrong cluster token)"),
        "{error}"
    );
}

#[test]
fn the_host_gives_up_after_the_join_timeout_naming_who_is_missing() {
    let address = free_address();
    let _host = start_host(address, 3, 2);
    let error = join_one(address, "secret", report(Some(0), 1, "1e-4"))
        .err()
        .expect("no group");
    assert!(
        error.to_string().contains("1 of 3 nodes joined")
            && error.to_string().contains("missing: node 1, node 2"),
        "{error}"
    );
}

/// A directory under the system's temporary one, removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(label: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "pp-files-{label}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn shared(path: std::path::PathBuf, name: &str) -> (FileInfo, std::path::PathBuf) {
    let info = FileInfo {
        name: name.into(),
        size: std::fs::metadata(&path).unwrap().len(),
        checksum: checksum_of(&path).unwrap(),
    };
    (info, path)
}

#[test]
fn nodes_fetch_shared_files_checked_and_upload_only_below_the_upload_root() {
    let (here, there) = (TempDir::new("host"), TempDir::new("node"));
    // Larger than one chunk, so the streaming is exercised.
    let contents: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(here.0.join("weights.bin"), &contents).unwrap();
    std::fs::write(here.0.join("config.json"), b"{}").unwrap();
    let address = free_address();
    let mut files = SharedFiles {
        upload_root: Some(here.0.join("out")),
        ..SharedFiles::default()
    };
    for name in ["weights.bin", "config.json"] {
        let (info, path) = shared(here.0.join(name), &format!("model/{name}"));
        files.add(info, path);
    }
    let _host =
        RendezvousHost::start(address, "secret", 2, Duration::from_secs(20), files).unwrap();

    let client =
        FileClient::connect(address, "secret", Duration::from_secs(10), &mut |_| {}).unwrap();
    let listed = client.list().unwrap();
    assert_eq!(
        listed.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
        ["model/config.json", "model/weights.bin"]
    );
    let weights = &listed[1];
    client.fetch(weights, &there.0.join("w.bin")).unwrap();
    assert_eq!(std::fs::read(there.0.join("w.bin")).unwrap(), contents);

    // A file that changed since it was listed is refused, and nothing is left behind.
    let stale = FileInfo {
        checksum: weights.checksum ^ 1,
        ..weights.clone()
    };
    let error = client
        .fetch(&stale, &there.0.join("stale.bin"))
        .unwrap_err();
    assert!(error.to_string().contains("changed on node 0"), "{error}");
    assert!(!there.0.join("stale.bin").exists());
    let unknown = FileInfo {
        name: "model/other".into(),
        ..weights.clone()
    };
    let error = client.fetch(&unknown, &there.0.join("x")).unwrap_err();
    assert!(error.to_string().contains("does not share"), "{error}");
    assert_eq!(std::fs::read_dir(&there.0).unwrap().count(), 1);

    // Uploads land under the upload root, complete; a path out of it is refused.
    client
        .upload(&there.0.join("w.bin"), "checkpoints/step-1/w.bin")
        .unwrap();
    let stored = here.0.join("out/checkpoints/step-1/w.bin");
    assert_eq!(std::fs::read(stored).unwrap(), contents);
    // What lies under the upload root can be read back; nothing above it.
    client
        .fetch_uploaded("checkpoints/step-1/w.bin", &there.0.join("back.bin"))
        .unwrap();
    assert_eq!(std::fs::read(there.0.join("back.bin")).unwrap(), contents);
    let error = client
        .fetch_uploaded("../weights.bin", &there.0.join("x"))
        .unwrap_err();
    assert!(error.to_string().contains("not a relative path"), "{error}");
    let error = client
        .upload(&there.0.join("w.bin"), "../escaped.bin")
        .unwrap_err();
    assert!(error.to_string().contains("not a relative path"), "{error}");
    assert!(!here.0.join("escaped.bin").exists());

    // The link probe sends what it was asked for, timed.
    let rate = client.measure_link(4 << 20).unwrap();
    assert!(rate > 1e6, "{rate} bytes/s on loopback");

    // A wrong token gets no files.
    let refused = FileClient::connect(address, "wrong", Duration::from_secs(5), &mut |_| {});
    assert!(matches!(refused, Err(RendezvousError::Auth { .. })));
}
