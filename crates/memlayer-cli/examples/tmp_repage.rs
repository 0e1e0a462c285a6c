fn main() {
    let a: Vec<String> = std::env::args().collect();
    let src = std::path::Path::new(&a[1]);
    let dst = std::path::Path::new(&a[2]);
    let rows: u32 = a[3].parse().unwrap();
    let m = memlayer_train::model_dir::load(src).unwrap();
    std::fs::create_dir_all(dst).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "eval.jsonl"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    memlayer_train::model_dir::write_bank_with(&m.config, &m.store, &dst.join("memory.bank"), memlayer_core::bank::Dtype::F32, rows).unwrap();
}
