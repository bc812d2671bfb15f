//! Throughput of the QUIC transport on loopback next to a plain TCP socket moving the same
//! bytes: `cargo bench -p pp-transport --bench loopback [-- --mib 16 --messages 32]`.
//! Each message is a float32 tensor of the given size, as activations and gradients are.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{flag, quic_group};
use pp_transport::{Kind, Tag, TensorMessage, Transport};

mod common;

fn main() {
    let (mib, messages) = (flag("--mib", 16), flag("--messages", 32));
    let floats = mib * (1 << 20) / 4;
    let bytes = (messages * floats * 4) as f64;
    let quic = quic_seconds(floats, messages);
    let tcp = tcp_seconds(floats, messages);
    for (name, seconds) in [("QUIC (pp-transport)", quic), ("TCP (std::net)", tcp)] {
        println!(
            "{name:<20} {messages} × {mib} MiB in {seconds:.3} s: {:.2} Gbit/s",
            bytes * 8.0 / seconds / 1e9
        );
    }
}

fn tag(microbatch: u32) -> Tag {
    Tag {
        step: 0,
        microbatch,
        stage: 1,
        kind: Kind::Activation,
    }
}

fn quic_seconds(floats: usize, messages: usize) -> f64 {
    let mut group = quic_group(2);
    let (receiver, sender) = (group.pop().unwrap(), group.pop().unwrap());
    let values = vec![0.5f32; floats];
    let started = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            for m in 0..messages {
                let message = TensorMessage {
                    tag: tag(m as u32),
                    shape: vec![floats],
                    values: values.clone(),
                };
                sender.send(1, message).unwrap();
            }
        });
        for m in 0..messages {
            let got = receiver
                .recv(0, tag(m as u32), Duration::from_secs(60))
                .unwrap();
            assert_eq!(got.values.len(), floats);
        }
    });
    started.elapsed().as_secs_f64()
}

fn tcp_seconds(floats: usize, messages: usize) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let payload: Vec<u8> = vec![0.5f32; floats]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let started = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut stream = TcpStream::connect(address).unwrap();
            for _ in 0..messages {
                stream.write_all(&payload).unwrap();
            }
        });
        let (mut stream, _) = listener.accept().unwrap();
        let mut buffer = vec![0u8; payload.len()];
        for _ in 0..messages {
            stream.read_exact(&mut buffer).unwrap();
            // Decoding to floats, as the QUIC receiver does.
            let floats: Vec<f32> = buffer
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            assert_eq!(floats.len() * 4, payload.len());
        }
    });
    started.elapsed().as_secs_f64()
}
