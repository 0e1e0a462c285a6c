//! The CPU oracle against Meta's own `HashingMemory` (facebookresearch/memory,
//! `lingua/product_key/memory.py`).
//!
//! The fixtures in `tests/fixtures/meta/` were made on CPU with
//! `python3 scripts/make_meta_fixtures.py --meta-repo /path/to/facebookresearch-memory --out tests/fixtures/meta`
//! (torch 2.15.0, facebookresearch/memory commit 7f85280; the script's header
//! says what it stubs). Per fixture `<name>`: `<name>.weights.safetensors` is the
//! layer's `state_dict()`, `<name>.input.safetensors` holds `input`, and
//! `<name>.expected.safetensors` holds Meta's `output`, `last_indices` as
//! `indices` (i64) and `last_scores` as `scores` (pre-softmax), with `knn` in
//! its metadata. Token inputs with a top-k near tie (gap < 1e-4) were skipped by
//! the script, so the indices must match exactly.

use std::path::PathBuf;

use memlayer::core::interop::{self, HashingMemoryLayer, LayerInput};
use safetensors::{Dtype, SafeTensors};

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/meta")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Meta's expected tensors of one fixture.
struct Expected {
    knn: usize,
    output: Vec<f32>,
    output_shape: Vec<usize>,
    output_bag_rounded: Option<Vec<f32>>,
    indices: Vec<i64>,
    scores: Vec<f32>,
    scores_shape: Vec<usize>,
}

fn f32s(st: &SafeTensors<'_>, name: &str) -> (Vec<f32>, Vec<usize>) {
    let v = st.tensor(name).unwrap();
    assert_eq!(v.dtype(), Dtype::F32, "{name}");
    let data = v
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (data, v.shape().to_vec())
}

fn expected(name: &str) -> Expected {
    let bytes = fixture(&format!("{name}.expected.safetensors"));
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let knn = meta.metadata().as_ref().unwrap()["knn"].parse().unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (output, output_shape) = f32s(&st, "output");
    let (scores, scores_shape) = f32s(&st, "scores");
    let iv = st.tensor("indices").unwrap();
    assert_eq!(iv.dtype(), Dtype::I64);
    assert_eq!(iv.shape(), scores_shape.as_slice());
    let indices = iv
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let output_bag_rounded = st
        .tensor("output_bag_rounded")
        .ok()
        .map(|_| f32s(&st, "output_bag_rounded").0);
    Expected {
        knn,
        output,
        output_shape,
        output_bag_rounded,
        indices,
        scores,
        scores_shape,
    }
}

/// max |a - b| / max(1, max |b|)
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// Loads fixture `name`, runs the oracle and checks it against Meta's tensors.
fn check_fixture(name: &str) -> (HashingMemoryLayer, LayerInput, Expected) {
    let exp = expected(name);
    let layer =
        interop::load_hashing_memory(&fixture(&format!("{name}.weights.safetensors")), exp.knn)
            .unwrap();
    let input = interop::load_layer_input(
        &fixture(&format!("{name}.input.safetensors")),
        layer.config.dim,
    )
    .unwrap();
    let fwd = layer.forward(&input.data, input.tokens).unwrap();

    let c = &layer.config;
    assert_eq!(exp.scores_shape, vec![input.tokens, c.heads, c.knn]);
    assert_eq!(
        exp.output_shape, input.shape,
        "output takes the input's shape"
    );
    let indices: Vec<i64> = fwd.indices.iter().map(|&i| i64::from(i)).collect();
    assert_eq!(
        indices, exp.indices,
        "{name}: indices must equal Meta's last_indices"
    );
    let (es, eo) = (
        rel_err(&fwd.scores, &exp.scores),
        rel_err(&fwd.output, &exp.output),
    );
    eprintln!(
        "{name}: {c:?}; tokens {}; scores rel err {es:e}; output rel err {eo:e}",
        input.tokens
    );
    assert!(
        es <= 1e-5,
        "{name}: scores differ from Meta's last_scores by {es}"
    );
    assert!(eo <= 1e-5, "{name}: output differs from Meta's by {eo}");
    (layer, input, exp)
}

#[test]
fn f32_values_match_meta() {
    let (layer, input, _) = check_fixture("pkm_f32");
    let c = &layer.config;
    assert_eq!(
        (c.dim, c.v_dim, c.heads, c.n_keys, c.k_dim, c.knn),
        (32, 32, 2, 16, 16, 4)
    );
    assert!(!c.gated && !c.qk_norm);
    assert_eq!(input.shape, vec![input.tokens, 32]);
}

#[test]
fn bf16_values_gated_vdim_match_meta() {
    let (layer, input, exp) = check_fixture("pkm_bf16_gated");
    let c = &layer.config;
    assert_eq!(
        (c.dim, c.v_dim, c.heads, c.n_keys, c.k_dim, c.knn),
        (24, 40, 4, 12, 8, 8)
    );
    assert!(c.gated && !c.qk_norm);
    assert_eq!(input.shape, vec![1, input.tokens, 24]);

    // Meta stores the values in bf16; they widen to f32 exactly.
    let bytes = fixture("pkm_bf16_gated.weights.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("values.weight").unwrap().dtype(), Dtype::BF16);
    assert!(
        layer
            .values
            .iter()
            .all(|&v| half::bf16::from_f32(v).to_f32() == v)
    );

    // Meta's Triton kernel rounds the bag output to the values' dtype (bf16):
    // the oracle (f32 bag) stays within that rounding of it (and the rounding
    // is visible, so `output` really is the f32-bag variant).
    let fwd = layer.forward(&input.data, input.tokens).unwrap();
    let rounded = exp
        .output_bag_rounded
        .expect("bf16 fixture has output_bag_rounded");
    let e = rel_err(&fwd.output, &rounded);
    eprintln!("pkm_bf16_gated: vs Triton-rounded bag output rel err {e:e}");
    assert!(e > 0.0 && e <= 2f32.powi(-7), "{e}");
}

#[test]
fn f16_and_bf16_inputs_are_widened() {
    // The same input stored as bf16 loads as the bf16 rounding of the f32 input.
    let layer = interop::load_hashing_memory(&fixture("pkm_f32.weights.safetensors"), 4).unwrap();
    let f32_in = interop::load_layer_input(&fixture("pkm_f32.input.safetensors"), 32).unwrap();
    for dtype in [Dtype::BF16, Dtype::F16] {
        let bytes: Vec<u8> = f32_in
            .data
            .iter()
            .flat_map(|&v| match dtype {
                Dtype::BF16 => half::bf16::from_f32(v).to_le_bytes(),
                _ => half::f16::from_f32(v).to_le_bytes(),
            })
            .collect();
        let view =
            safetensors::tensor::TensorView::new(dtype, f32_in.shape.clone(), &bytes).unwrap();
        let file = safetensors::serialize([("input", view)], None).unwrap();
        let x = interop::load_layer_input(&file, 32).unwrap();
        let want: Vec<f32> = f32_in
            .data
            .iter()
            .map(|&v| match dtype {
                Dtype::BF16 => half::bf16::from_f32(v).to_f32(),
                _ => half::f16::from_f32(v).to_f32(),
            })
            .collect();
        assert_eq!(x.data, want);
        assert_eq!(x.tokens, f32_in.tokens);
        assert!(layer.forward(&x.data, x.tokens).is_ok());
    }
}
