//! The examples in `examples/` are part of the API's documentation, so the
//! tests run them: each is compiled here as a module and its `run` called on
//! the test adapter (a failure under `MEMLAYER_REQUIRE_GPU=1` when there is
//! none, a loud skip otherwise).

#[allow(dead_code)] // its `main` is for `cargo run --example`
#[path = "../examples/hello_lookup.rs"]
mod hello_lookup;

#[allow(dead_code)]
#[path = "../examples/paged_generate.rs"]
mod paged_generate;

#[test]
fn hello_lookup_matches_the_oracle() {
    let Some(ctx) = memlayer_wgpu::gpu_for_tests(memlayer_wgpu::GpuOptions::default()) else {
        return;
    };
    let read = hello_lookup::run(&ctx).unwrap_or_else(|e| panic!("hello_lookup: {e}"));
    assert_eq!(
        (read.tokens, read.heads, read.knn, read.rows),
        (8, 4, 16, 4096)
    );
    assert!(read.max_abs_diff <= 1e-4, "{}", read.max_abs_diff);
}

/// The shipped demo model answers its held-out question the same with a
/// quarter of its memory paged from the file and from a URL (HTTP Range on
/// 127.0.0.1) as `memlayer generate` does with all of it.
#[test]
fn paged_generate_streams_the_same_answer_from_a_file_and_a_url() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("models/demo-pkm");
    let mut streamed = String::new();
    let text = paged_generate::run(&dir, None, |p| streamed.push_str(p))
        .unwrap_or_else(|e| panic!("paged_generate: {e}"));
    assert!(text.starts_with(" Difoul Partners"), "{text}");
    assert!(
        streamed.contains(&text) && streamed.contains("hit rate"),
        "{streamed}"
    );
    let server = memlayer_http::Server::start(
        memlayer_http::ServeConfig::new("127.0.0.1:0".parse().unwrap()).mount("/model", &dir),
    )
    .unwrap();
    let url = format!("{}/model/memory.bank", server.url());
    let over_http = paged_generate::run(&dir, Some(&url), |_| {}).unwrap();
    assert_eq!(over_http, text);
}
