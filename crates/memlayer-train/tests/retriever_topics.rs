//! The default retriever separates the facts world's topics: a property of
//! `memlayer-model-dir`'s TF-IDF retriever on `memlayer-train`'s data.

use memlayer_model_dir::retriever::{TfIdfRetriever, cosine};
use memlayer_train::data::facts::{FactsConfig, FactsDataset};

#[test]
fn same_topic_contexts_are_closer() {
    let ds = FactsDataset::generate(&FactsConfig::tiny()).unwrap();
    let texts = ds.texts();
    let r = TfIdfRetriever::fit(&texts, 256).unwrap();
    let emb = r.embed_all(&texts);
    let d = r.dim();
    let n = texts.len().min(600);
    let (mut same, mut ns, mut other, mut no) = (0.0f64, 0usize, 0.0f64, 0usize);
    for i in 0..n {
        for j in i + 1..n {
            let c = cosine(&emb[i * d..(i + 1) * d], &emb[j * d..(j + 1) * d]) as f64;
            if ds.contexts[i].topic == ds.contexts[j].topic {
                same += c;
                ns += 1;
            } else {
                other += c;
                no += 1;
            }
        }
    }
    let (same, other) = (same / ns as f64, other / no as f64);
    assert!(
        same > other + 0.05,
        "same-topic {same:.3}, other {other:.3}"
    );
    // nearest topic centroid recovers the topic for most contexts
    let topics = ds.config.topics;
    let mut cent = vec![0.0f64; topics * d];
    for (c, e) in ds.contexts.iter().zip(emb.chunks_exact(d)) {
        let t = c.topic.unwrap() as usize;
        for (a, &v) in cent[t * d..(t + 1) * d].iter_mut().zip(e) {
            *a += v as f64;
        }
    }
    let correct = ds
        .contexts
        .iter()
        .zip(emb.chunks_exact(d))
        .filter(|(c, e)| {
            let best = (0..topics)
                .max_by(|&a, &b| {
                    let s = |t: usize| -> f64 {
                        cent[t * d..(t + 1) * d]
                            .iter()
                            .zip(e.iter())
                            .map(|(x, &y)| x * y as f64)
                            .sum::<f64>()
                            / cent[t * d..(t + 1) * d]
                                .iter()
                                .map(|x| x * x)
                                .sum::<f64>()
                                .sqrt()
                    };
                    s(a).total_cmp(&s(b))
                })
                .unwrap();
            Some(best as u32) == c.topic
        })
        .count();
    let acc = correct as f64 / ds.contexts.len() as f64;
    assert!(acc > 0.8, "topic accuracy {acc}");
}
