//! The examples in `examples/` are part of the API's documentation, so the
//! tests run them: each is compiled here as a module and its `run` called on
//! the test adapter (a failure under `MEMLAYER_REQUIRE_GPU=1` when there is
//! none, a loud skip otherwise).

#[allow(dead_code)] // its `main` is for `cargo run --example`
#[path = "../examples/hello_lookup.rs"]
mod hello_lookup;

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
