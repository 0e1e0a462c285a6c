//! Prints the machine's copy and read bandwidth (decimal GB/s of bytes read,
//! 256 MiB buffers, best of 5 runs) at 1 and 2 threads, one JSON line each.
//! `cargo run --release -p memlayer-cpu --example bandwidth [threads...]`
use memlayer_cpu::{Cpu, bandwidth};

fn main() {
    let threads: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("thread counts"))
        .collect();
    let threads = if threads.is_empty() {
        vec![1, 2]
    } else {
        threads
    };
    for t in threads {
        let cpu = Cpu::new(t).unwrap();
        let c = cpu.copy_bandwidth(256 << 20, 5);
        let r = cpu.install(|| bandwidth::read_bandwidth(256 << 20, 5));
        println!(
            "{{\"threads\": {t}, \"copy_gbps\": {:.3}, \"read_gbps\": {:.3}, \"bytes\": {}, \"counts\": \"bytes read\"}}",
            c.gbps, r.gbps, c.bytes
        );
    }
}
